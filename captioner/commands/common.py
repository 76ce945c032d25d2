"""What the sub-commands share: the usage error, the options every decoding command takes, and
loading a checkpoint for them. Imports nothing heavy at module level, so that ``captioner --help``
stays fast; the CLI sits above this module, never below it."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# What `captioner fit` saves in its run folder: the resolved config.
CONFIG_NAME = "config.yaml"


class UsageError(Exception):
    """A user's mistake (bad arguments, a missing file, an unknown setting): the CLI prints one
    line and exits with status 2, no traceback."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_old_flags(args: Sequence[str], old: dict[str, str]) -> None:
    """A flag of an earlier release -> UsageError naming what replaced it."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in old:
            raise UsageError(f"{flag} is gone: give {old[flag]}")


class LazyChoices:
    """argparse ``choices`` read from a registry or constant of the library when first needed
    (checking a value, printing help), so that building the parser does not import torch."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _values(self) -> Sequence[str]:
        import importlib

        values = getattr(importlib.import_module(self.module), self.name)
        return values.names() if hasattr(values, "names") else tuple(values)

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self):
        return iter(self._values())


QUANTIZE = LazyChoices("captioner.models.quantize", "QUANTIZE")
JPEG_DECODE = LazyChoices("captioner.inference", "JPEG_DECODE")


def add_device_argument(p) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model runs (auto: cuda when available)")


def add_quantize_argument(p) -> None:
    p.add_argument("--quantize", choices=QUANTIZE, default="none", metavar="SCHEME",
                   help="none (default) or int8: decode with int8 weights, faster beam search "
                   "(CPU only)")


def add_decoding_arguments(p) -> None:
    """``--beam-size`` and ``--max-length`` of the commands that caption without a config."""
    p.add_argument("--beam-size", type=positive_int, default=None,
                   help="beam width (1 = greedy); default: the checkpoint's decoding.beam_size")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="most tokens per caption; default: the checkpoint's decoding.max_length, else "
                   "its tokenizer's (20 for simple, 50 for unicode and char)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, decoding, ``--device`` and ``--quantize``: ``caption`` and ``attend``."""
    p.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `captioner fit`, a model folder (`captioner export`) or hf://OWNER/NAME")
    add_decoding_arguments(p)
    add_device_argument(p)
    add_quantize_argument(p)


def load_model(checkpoint: Path, device: str):
    """A checkpoint on ``auto|cpu|cuda`` -> LoadedModel, or UsageError (exit 2) with one line."""
    from captioner.checkpoint import CheckpointError, load_checkpoint
    from captioner.inference import resolve_device

    try:
        return load_checkpoint(checkpoint, resolve_device(device))
    except (ValueError, CheckpointError) as err:
        raise UsageError(" ".join(str(err).split())) from None


def load_pipeline(checkpoint: Path, device: str = "auto", quantize: str = "none", **decoding):
    """A checkpoint and decoding options (``beam_size``, ``max_length``, ``length_penalty``, ...;
    None keeps the checkpoint's) -> CaptionPipeline, or UsageError (exit 2) with one line."""
    from captioner.inference import CaptionPipeline

    loaded = load_model(checkpoint, device)
    try:
        return CaptionPipeline(loaded, quantize=quantize, **decoding)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--quantize {quantize}: {err}") from None


def run_config(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` that ``fit`` saved in the checkpoint's run folder, if any
    (``<root>/checkpoints/best.ckpt`` -> ``<root>/config.yaml``)."""
    for folder in Path(checkpoint).resolve().parents[:2]:
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None
