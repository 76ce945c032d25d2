"""The checkpoint format: what ``fit`` saves, what ``export`` writes, and how either becomes a model.

The only module that knows the keys. Everything else asks it: ``fit`` (:func:`write_entry`, from
``on_save_checkpoint``), ``model.init_from`` (:func:`read_trained`), a resumed run
(:func:`stored_settings`), and every ``--checkpoint`` (:func:`load_checkpoint`, which takes a
``.ckpt``, a model folder or ``hf://owner/name``). See docs/checkpoints.md.

A ``.ckpt`` is Lightning's dictionary, read with ``torch.load(weights_only=True)``::

    state_dict:       {"model.<name>": tensor}   # the Captioner's weights (+ the system's buffers)
    hyper_parameters: {"encoder": {...}, "decoder": {...}, "decoding": {...}, "optim", "loss", "scst"}
    captioner:        {"format": 2, "vocab": [...], "preprocessing": {...}, "tokenizer": "simple"}
    (+ Lightning's entries and the system's training state: rng_state, scst)

``captioner.format`` versions: 1, checkpoints until the tokenizer was recorded may lack
``tokenizer`` (their captions were split with ``simple``); 2, ``tokenizer`` is always there.
A version-1 checkpoint is migrated on load (:data:`_MIGRATIONS`); a newer one than
:data:`CHECKPOINT_FORMAT` is refused with one line. A model folder's ``config.json`` (its own
``format_version``, :data:`FOLDER_FORMAT_VERSION`; a newer one is refused) holds the same::

    {"format": "captioner-model", "format_version": 1,
     "encoder": {...}, "decoder": {...}, "decoding": {...},   # the dataclasses' settings
     "preprocessing": {"image_size": ..., "mean": [...], "std": [...], "interpolation": "bicubic"},
     "tokenizer": "simple", "vocab": ["<pad>", "<start>", "<end>", "<unk>", ...]}

beside ``model.safetensors`` (the Captioner's state dict) and a ``README.md`` model card; the
files themselves are :mod:`captioner.model_folder`'s, the Hub's transport :mod:`captioner.hub`'s.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captioner.data.tokenizers import TOKENIZERS
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import Vocabulary
from captioner.decoding import DecodingConfig
from captioner.hub import download, hub_repo_id
from captioner.model_folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_shapes,
    read_folder_config,
    read_folder_weights,
    with_aliases,
    write_model_folder,
)
from captioner.models import Captioner, DecoderConfig, EncoderConfig

__all__ = ["CHECKPOINT_FORMAT", "FOLDER_FORMAT", "FOLDER_FORMAT_VERSION", "CheckpointError", "LoadedModel",
           "export_model_folder", "load_checkpoint", "read_checkpoint", "StoredModel", "read_trained", "stored_settings",
           "stored_vocab", "write_entry"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # the .ckpt's captioner.format written now; older ones are migrated
FOLDER_FORMAT = "captioner-model"
FOLDER_FORMAT_VERSION = 1
# The .ckpt's entry of our own, and the Captioner's weights' prefix in its state_dict.
_ENTRY = "captioner"
_PREFIX = "model."
# What a model is built from: top-level entries of a .ckpt, and those inside the dicts they name.
_CHECKPOINT_KEYS = {"state_dict": (), "hyper_parameters": ("encoder", "decoder"), _ENTRY: ("vocab", "preprocessing")}
# What a loader needs from config.json; the rest (a card's details) is optional.
_FOLDER_KEYS = ("encoder", "decoder", "decoding", "preprocessing", "vocab")
_SETTINGS = ("encoder", "decoder", "decoding")  # a model folder's share of the hyper-parameters
_DEFAULT_TOKENIZER = "simple"  # how captions were split before the tokenizer was recorded


@dataclass
class LoadedModel:
    """A trained model, ready to caption: the ``Captioner`` (in eval mode), its vocabulary, the
    tokenizer that split its captions, its image preprocessing and its settings (``hparams``:
    ``encoder``, ``decoder``, ``decoding``, ...), read from ``path``."""

    model: Captioner
    vocab: Vocabulary
    preprocessing: Preprocessing
    hparams: dict
    path: Path
    tokenizer: str = _DEFAULT_TOKENIZER  # captioner.data.tokenizers name

    @property
    def decoding(self) -> dict:
        """The decoding defaults it was trained (or exported) with."""
        return self.hparams.get("decoding", {})


# -- writing ----------------------------------------------------------------------------------
def write_entry(checkpoint: dict, vocab: Vocabulary, preprocessing: Preprocessing, tokenizer: str) -> None:
    """Fill in what ``fit`` saves beside Lightning's entries (``on_save_checkpoint``): the
    vocabulary, the preprocessing, the tokenizer (so that captioning joins words back the same
    way) and the format version."""
    checkpoint[_ENTRY] = {"format": CHECKPOINT_FORMAT, "vocab": vocab.to_list(),
                          "preprocessing": preprocessing.to_dict(), "tokenizer": tokenizer}


def export_model_folder(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, metrics: dict | None = None,
    run_config: str | os.PathLike | None = None,
) -> Path:
    """Write the model of a ``.ckpt`` as a model folder (``model.safetensors``, ``config.json``,
    ``README.md``; see :mod:`captioner.model_folder`). ``metrics``: a ``captioner evaluate
    --output`` dictionary for the card; ``run_config``: the run's ``config.yaml``, whose ``data``
    and ``model`` sections the card quotes. Raises CheckpointError, FileExistsError (``out`` is
    not empty) or ValueError (an unreadable ``run_config``)."""
    import yaml

    path = Path(checkpoint)
    if path.is_dir() or hub_repo_id(path) is not None:
        raise CheckpointError(f"{checkpoint}: export takes a .ckpt written by `captioner fit`")
    loaded = load_checkpoint(path)  # checks it builds before anything is written
    config = {
        "format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION,
        "encoder": loaded.hparams["encoder"], "decoder": loaded.hparams["decoder"],
        "decoding": loaded.decoding,
        "preprocessing": loaded.preprocessing.to_dict(),
        "tokenizer": loaded.tokenizer,
        "vocab": loaded.vocab.to_list(),
    }
    run = None
    if run_config is not None:
        try:
            run = yaml.safe_load(Path(run_config).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{run_config}: not a readable config: {err}") from None
        if not isinstance(run, dict):
            raise ValueError(f"{run_config}: not a run config (no sections)")
    card = model_card(config, name=Path(out).name, metrics=metrics, run_config=run)
    return write_model_folder(out, config, loaded.model.state_dict(), card)


# -- reading a .ckpt ----------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw dictionary of a ``.ckpt``: ``torch.load(weights_only=True)``, tensors and plain
    containers only, never code. Its version is not checked: :func:`load_checkpoint` does that."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            # a file pickled outside torch.save: torch notes its protocol, then refuses it below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning,
                                    module=r"torch\._weights_only_unpickler")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects or code that a safe "
            f"(weights_only) load does not allow; only load checkpoints you trust. ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # truncated file, not a torch file at all, ...
        raise CheckpointError(f"{path}: not a readable checkpoint: {err}") from None


def _tokenizer_recorded(entry: dict) -> dict:
    """1 -> 2: a checkpoint from before the tokenizer was recorded split with ``simple``."""
    return {**entry, "tokenizer": entry.get("tokenizer", _DEFAULT_TOKENIZER)}


# {version: the step from it to the next}; a version without one cannot be read.
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _tokenizer_recorded}


def _current(entry: Any, path: str | os.PathLike) -> Any:
    """A ``.ckpt``'s ``captioner`` entry at :data:`CHECKPOINT_FORMAT`: an older one migrated
    step by step, a newer or unknown one refused. An entry without ``format`` is version 1 (hand-made:
    ``fit`` always wrote one); a missing entry is left to the caller."""
    if not isinstance(entry, dict):
        return entry
    version = entry.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: checkpoint format {version!r} is not a version number")
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this captioner reads "
                              f"({CHECKPOINT_FORMAT}); upgrade captioner")
    while version < CHECKPOINT_FORMAT:
        if version not in _MIGRATIONS:
            raise CheckpointError(f"{path}: checkpoint format {version} is older than this captioner reads "
                                  f"(it reads {min(_MIGRATIONS)} to {CHECKPOINT_FORMAT})")
        entry = {**_MIGRATIONS[version](entry), "format": version + 1}
        version += 1
    return entry


def _lacks(ckpt: dict) -> list[str]:
    """The keys of :data:`_CHECKPOINT_KEYS` that ``ckpt`` lacks (``captioner.vocab``, ...)."""
    missing = []
    for key, inner in _CHECKPOINT_KEYS.items():
        value = ckpt.get(key)
        if not isinstance(value, dict):
            missing.append(key)
        else:
            missing += [f"{key}.{k}" for k in inner if k not in value]
    return missing


@dataclass
class StoredModel:
    """What a ``.ckpt`` holds of a model, at the current format."""

    settings: dict  # the hyper-parameters
    vocab: list[str]
    preprocessing: dict
    tokenizer: str
    weights: dict[str, torch.Tensor]  # the Captioner's state dict (no "model." prefix)


def read_trained(path: str | os.PathLike) -> StoredModel:
    """A ``.ckpt`` written by ``fit``, checked and migrated (CheckpointError naming ``path``): its
    settings, vocabulary, preprocessing, tokenizer and the ``Captioner``'s weights."""
    ckpt = read_checkpoint(path)
    missing = _lacks(ckpt)
    if missing:
        raise CheckpointError(f"{path}: not a captioner checkpoint: it lacks {', '.join(missing)}")
    entry = _current(ckpt[_ENTRY], path)
    weights = {k[len(_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(_PREFIX)}
    return StoredModel(ckpt["hyper_parameters"], entry["vocab"], entry["preprocessing"], entry["tokenizer"], weights)


def stored_settings(path: str | os.PathLike) -> tuple[dict, Any]:
    """(hyper-parameters, global step) of a ``.ckpt``, for a run resumed from it: ``({}, "?")``
    where it has none. CheckpointError for an unreadable file or a newer format."""
    ckpt = read_checkpoint(path)
    _current(ckpt.get(_ENTRY), path)
    return ckpt.get("hyper_parameters") or {}, ckpt.get("global_step", "?")


def stored_vocab(checkpoint: Mapping) -> list[str] | None:
    """The vocabulary in a checkpoint dictionary Lightning has loaded (None where it has none)."""
    entry = checkpoint.get(_ENTRY)
    return entry["vocab"] if isinstance(entry, dict) and "vocab" in entry else None


# -- loading a model ----------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a trained model (in eval mode) from a ``.ckpt`` written by ``captioner fit``, a
    model folder written by ``captioner export``, or a Hub id (``hf://owner/name``, or a bare
    ``owner/name`` that is no local path; needs ``captioner[hub]``). Nothing is unpickled but a
    ``.ckpt``'s tensors and plain containers."""
    repo_id = hub_repo_id(path)
    if repo_id is not None:
        return _load_folder(download(repo_id), device)
    if Path(path).is_dir():
        return _load_folder(Path(path), device)
    trained = read_trained(path)
    try:
        model, vocab, preprocessing = _build(trained.settings, trained.vocab, trained.preprocessing)
        model.load_state_dict(trained.weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: checkpoint does not match this version of captioner: {err}") from None
    _check_tokenizer(trained.tokenizer, path)
    return LoadedModel(model.eval().to(device), vocab, preprocessing, trained.settings, Path(path), trained.tokenizer)


def _load_folder(folder: Path, device: str | torch.device) -> LoadedModel:
    config_path = folder / CONFIG_FILE
    config = read_folder_config(folder)
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise CheckpointError(f"{config_path}: not a captioner model config (no \"format\": \"{FOLDER_FORMAT}\")")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{config_path}: format_version {version!r} is not a version number")
    if version > FOLDER_FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format version {version} is newer than this captioner "
                              f"reads ({FOLDER_FORMAT_VERSION}); upgrade captioner")
    missing = [k for k in _FOLDER_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{config_path}: lacks {', '.join(missing)}")
    state = read_folder_weights(folder)
    try:
        model, vocab, preprocessing = _build(config, config["vocab"], config["preprocessing"])
        DecodingConfig.from_dict(config["decoding"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: settings this version of captioner cannot "
                              f"build a model from: {err}") from None
    expected = model.state_dict()
    state = with_aliases(state, expected)
    check_shapes(state, expected, str(folder / WEIGHTS_FILE), len(vocab))
    model.load_state_dict(state)
    tokenizer = config.get("tokenizer", _DEFAULT_TOKENIZER)
    _check_tokenizer(tokenizer, config_path)
    return LoadedModel(model.eval().to(device), vocab, preprocessing, {k: config[k] for k in _SETTINGS}, folder,
                       tokenizer)


def _build(settings: Mapping, words: list[str], preprocessing: dict) -> tuple[Captioner, Vocabulary, Preprocessing]:
    """The model the settings describe, without its pretrained weights: the saved state replaces
    them, so loading never downloads (an offline machine can caption with a timm/CLIP checkpoint)."""
    vocab = Vocabulary(words)
    encoder = EncoderConfig(**{**settings["encoder"], "pretrained": False, "weights_path": None})
    model = Captioner(encoder, DecoderConfig(**settings["decoder"]), len(vocab), vocab.to_list())
    return model, vocab, Preprocessing.from_dict(preprocessing)


def _check_tokenizer(name: str, where: str | os.PathLike) -> None:
    if name not in TOKENIZERS:
        raise CheckpointError(f"{where}: unknown tokenizer {name!r} (this version of captioner has "
                              f"{', '.join(TOKENIZERS.names())})")


# -- the model card ---------------------------------------------------------------------------
def _table(metrics: Mapping[str, Any]) -> list[str]:
    """The scores of a ``captioner evaluate --output`` file as a Markdown table."""
    rows = [(k, v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in (
                "num_images", "beam_size", "max_length", "length_penalty", "nltk_corpus_bleu4")]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    how = ", ".join(f"{k} {metrics[k]}" for k in ("split", "num_images", "beam_size") if k in metrics)
    if how:
        lines += ["", f"Scored by `captioner evaluate` ({how})."]
    return lines


def model_card(config: Mapping[str, Any], *, name: str, metrics: Mapping[str, Any] | None = None,
               run_config: Mapping[str, Any] | None = None) -> str:
    """A ``README.md`` model card for a folder's ``config.json``: front matter for the Hub, the
    data set, the scores, the training settings (the run's ``data`` and ``model`` sections) and
    how to use it."""
    import yaml

    data = (run_config or {}).get("data") or {}
    dataset = data.get("dataset", "unknown") if isinstance(data, dict) else "unknown"
    enc, dec = config["encoder"], config["decoder"]
    lines = [
        "---", "library_name: captioner", "pipeline_tag: image-to-text",
        "tags: [image-captioning, show-attend-tell]", "---", "",
        f"# {name}", "",
        "An image captioning model (Show, Attend and Tell) exported by `captioner export`: "
        f"encoder `{enc.get('name', '?')}`, {dec.get('attention', 'soft')} attention, "
        f"{len(config['vocab'])} words, images resized to {config['preprocessing']['image_size']} px.",
        "", f"Data set: `{dataset}`.", "", "## Scores", "",
    ]
    lines += _table(metrics) if metrics else ["Not evaluated at export (`captioner export --metrics`)."]
    lines += ["", "## Training", ""]
    if run_config is not None:
        quoted = {k: run_config[k] for k in ("data", "model") if k in run_config}
        lines += ["Trained with `captioner fit --config config.yaml`, where the run's `config.yaml` "
                  "had these `data` and `model` sections:", "", "```yaml",
                  yaml.safe_dump(quoted, sort_keys=False).rstrip(), "```"]
    else:
        lines += ["The run's `config.yaml` was not found beside the checkpoint."]
    lines += ["", "## Use", "", "```bash", "pip install 'captioner[hub]'",
              "captioner caption --checkpoint hf://OWNER/NAME photo.jpg   # or this folder's path",
              "```", "", "```python", "from captioner import CaptionPipeline", "",
              'pipe = CaptionPipeline.from_pretrained("hf://OWNER/NAME")',
              'print(pipe("photo.jpg").text)', "```", ""]
    return "\n".join(lines)
