"""Model folders: a trained model as ``model.safetensors`` + ``config.json`` + ``README.md``.

What ``captioner export`` writes and what every ``--checkpoint`` also accepts. Loading one reads
JSON and safetensors only, never a pickle, so a downloaded folder cannot run code. This module
knows the files and their bytes; :mod:`captioner.checkpoint` knows what ``config.json`` holds and
builds the model from them.

``model.safetensors`` holds the ``Captioner`` module's state dict (no ``model.`` prefix), each
tensor once: a torchvision encoder's frozen blocks are registered twice (``encoder.blocks.*`` and
``encoder.frozen.*`` name the same tensors), and safetensors refuses shared memory, so only the
first name is stored and loading fills in the others (:func:`with_aliases`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


class CheckpointError(Exception):
    """A checkpoint or model folder that is missing, unsafe, damaged or not a captioner model.
    (Defined here, at the bottom of the checkpoint modules; :mod:`captioner.checkpoint` is its home.)"""


def read_folder_config(path: str | os.PathLike) -> Any:
    """The JSON of a model folder's ``config.json``; CheckpointError naming the file."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing: {folder} is not a model folder "
                              "(written by `captioner export`)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: not readable JSON: {err}") from None
    return config


def read_folder_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a model folder's ``model.safetensors``; CheckpointError naming the file."""
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:  # truncated, empty, not safetensors
        raise CheckpointError(f"{weights_path}: not a readable safetensors file "
                              f"(truncated or damaged?): {err}") from None


def _memory(t: torch.Tensor) -> tuple | None:
    """What identifies a tensor's memory (None for an empty one, which has no address)."""
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{name: the first name of the same tensor} for each later name of a tensor in ``state``."""
    first: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        mem = _memory(t)
        if mem is None:
            continue
        if mem in first:
            out[key] = first[mem]
        else:
            first[mem] = key
    return out


def without_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor under its first name only (what ``model.safetensors`` holds)."""
    aliases = _aliases(state)
    return {k: v for k, v in state.items() if k not in aliases}


def with_aliases(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` read from a file, plus the names that share a stored tensor in ``expected`` (the
    model's own state dict)."""
    out = dict(state)
    for alias, name in _aliases(expected).items():
        if alias not in out and name in out:
            out[alias] = out[name]
    return out


def check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                 where: str, vocab_size: int) -> None:
    """CheckpointError with one line when ``state`` does not fit the model built from the config."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match config.json: missing "
                              f"{missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(got.shape)} but config.json (its vocabulary of "
                f"{vocab_size} words and model settings) gives {tuple(want.shape)}")


def write_model_folder(out: str | os.PathLike, config: dict[str, Any],
                       state: Mapping[str, torch.Tensor], card: str) -> Path:
    """Write the three files into a temporary folder beside ``out``, then rename it to ``out``:
    a killed export leaves no folder at ``out`` (at most a hidden ``.out.*.tmp`` one), never a
    half-written one that loads. ``out`` must not exist or be an empty folder."""
    from safetensors.torch import save

    from captioner.files import writing

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in without_aliases(state).items()}
        # serialised here and written by Python (not save_file's own writer), so that a full disk
        # is an OSError that names the file and its size
        files = {WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}), CARD_FILE: card.encode(),
                 # config.json last: a folder without it is not a model folder
                 CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode()}
        for name, data in files.items():
            with writing(out / name, len(data)), open(tmp / name, "wb") as fh:
                fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            with writing(out / f.name, f.stat().st_size), open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a model is meant to be shared
        os.replace(tmp, out)  # atomic; replaces an empty folder on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
