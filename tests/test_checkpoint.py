"""captioner.checkpoint: the format's version is checked on load (a newer one refused in one line,
a version-1 one migrated), a checkpoint laid out by hand the way older captioners wrote it loads,
and the names that moved from captioner.inference still work with a DeprecationWarning."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import captioner.inference
import captioner.system
from captioner import checkpoint
from captioner.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
)
from captioner.cli import main
from captioner.data.vocab import SPECIALS
from captioner.inference import CaptionPipeline
from captioner.models import Captioner, DecoderConfig, EncoderConfig
from captioner.system import CaptioningSystem
from tests.conftest import fit_args


def _with_entry(src: Path, dst: Path, **entry) -> Path:
    """A copy of the checkpoint ``src`` whose ``captioner`` entry is updated with ``entry``
    (a value None removes the key)."""
    ckpt = read_checkpoint(src)
    ckpt["captioner"].update(entry)
    ckpt["captioner"] = {k: v for k, v in ckpt["captioner"].items() if v is not None}
    torch.save(ckpt, dst)
    return dst


def test_fit_writes_the_current_format(tiny_checkpoint) -> None:
    entry = read_checkpoint(tiny_checkpoint)["captioner"]
    assert entry["format"] == CHECKPOINT_FORMAT == 2
    assert set(entry) == {"format", "vocab", "preprocessing", "tokenizer"}


def test_a_newer_format_is_refused_in_one_line(tiny_checkpoint, tmp_path, shapes_dir, capsys) -> None:
    newer = _with_entry(tiny_checkpoint, tmp_path / "newer.ckpt", format=CHECKPOINT_FORMAT + 1)
    expected = (f"{newer}: checkpoint format {CHECKPOINT_FORMAT + 1} is newer than this captioner reads "
                f"({CHECKPOINT_FORMAT}); upgrade captioner")
    with pytest.raises(CheckpointError, match="^" + re.escape(expected) + "$"):
        load_checkpoint(newer)
    image = next((shapes_dir / "images").iterdir())
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(newer), str(image)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [f"captioner: error: {expected}"]
    # export, model.init_from and a resumed run read it through the same check
    assert main(["export", "--checkpoint", str(newer), "--out", str(tmp_path / "folder")]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "folder").exists()
    hp = read_checkpoint(tiny_checkpoint)["hyper_parameters"]
    with pytest.raises(ValueError, match="^model.init_from: " + re.escape(expected)):
        CaptioningSystem(EncoderConfig(**hp["encoder"]), DecoderConfig(**hp["decoder"]),
                         vocab=read_checkpoint(tiny_checkpoint)["captioner"]["vocab"], init_from=str(newer))
    assert main(fit_args(shapes_dir, tmp_path / "run", "--trainer.max_steps", "1", "--ckpt_path", str(newer))) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("stored, expected", [(None, "simple"), ("unicode", "unicode")])
def test_a_version_1_checkpoint_is_migrated(tiny_checkpoint, tmp_path, stored, expected) -> None:
    """Version 1: the tokenizer may be missing (checkpoints from before it was recorded split
    their captions with "simple"); a recorded one is kept."""
    old = _with_entry(tiny_checkpoint, tmp_path / "v1.ckpt", format=1, tokenizer=stored)
    loaded = load_checkpoint(old)
    assert loaded.tokenizer == expected
    assert checkpoint.read_trained(old).tokenizer == expected
    want = load_checkpoint(tiny_checkpoint).model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())
    assert read_checkpoint(old)["captioner"]["format"] == 1  # migrated as read, nothing written back


@pytest.mark.parametrize("version, says", [(0, "checkpoint format 0 is older than this captioner reads (it reads 1 to 2)"),
                                           ("2", "checkpoint format '2' is not a version number")])
def test_an_unreadable_version_is_one_clear_line(tiny_checkpoint, tmp_path, version, says) -> None:
    bad = _with_entry(tiny_checkpoint, tmp_path / "bad.ckpt", format=version)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{bad}: {says}") + "$"):
        load_checkpoint(bad)


def test_a_checkpoint_laid_out_by_hand_the_old_way_loads(tmp_path, shapes_dir) -> None:
    """The dictionary a captioner of format 1 wrote (without a tokenizer, as before it was
    recorded), built by hand: it loads, with its weights, and captions."""
    enc = EncoderConfig(name="shapes_cnn", grid=4, image_size=32, channels=16)
    dec = DecoderConfig(embed_dim=16, attention_dim=16, decoder_dim=16)
    vocab = [*SPECIALS, "a", "red", "circle", "square"]
    model = Captioner(enc, dec, len(vocab), vocab)
    pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}  # no interpolation: older still
    path = tmp_path / "old.ckpt"
    torch.save({"epoch": 3, "global_step": 24, "pytorch-lightning_version": "2.4.0",
                "state_dict": {**{f"model.{k}": v for k, v in model.state_dict().items()},
                               "reward_baseline": torch.zeros(())},
                "hyper_parameters": {"encoder": asdict(enc), "decoder": asdict(dec), "decoding": {"beam_size": 2}},
                "captioner": {"format": 1, "vocab": vocab, "preprocessing": pre}}, path)
    loaded = load_checkpoint(path)
    assert loaded.tokenizer == "simple" and loaded.vocab.to_list() == vocab and loaded.decoding == {"beam_size": 2}
    # read as it was made: bicubic, JPEGs decoded at full size
    assert loaded.preprocessing.to_dict() == {**pre, "interpolation": "bicubic", "jpeg_dct_scaling": False}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    caption = CaptionPipeline(loaded)(next((shapes_dir / "images").iterdir()))
    assert all(w in vocab for w in caption.words)
    # and a model folder exported from it holds the tokenizer it was migrated to
    folder = checkpoint.export_model_folder(path, tmp_path / "folder")
    assert load_checkpoint(folder).tokenizer == "simple"


@pytest.mark.parametrize("name", ["CheckpointError", "LoadedModel", "export_model_folder", "load_checkpoint",
                                  "read_checkpoint"])
def test_the_names_moved_from_inference_warn_and_still_work(name) -> None:
    with pytest.warns(DeprecationWarning, match=f"captioner.inference.{name} is deprecated: use "
                                                f"captioner.checkpoint.{name}"):
        alias = getattr(captioner.inference, name)
    assert alias is getattr(checkpoint, name)


def test_checkpoint_format_moved_from_system_warns() -> None:
    with pytest.warns(DeprecationWarning, match="captioner.checkpoint.CHECKPOINT_FORMAT"):
        assert captioner.system.CHECKPOINT_FORMAT == CHECKPOINT_FORMAT


def test_the_package_root_names_come_from_checkpoint() -> None:
    import captioner as root

    assert root.load_checkpoint is load_checkpoint and root.CheckpointError is CheckpointError
