"""Attention grounding of generated captions, where the data set has word-region grounding
(``shapes``: a ``grounding.json`` beside the data). The metrics themselves are
:func:`captioner.metrics.evaluate_grounding`; their table :func:`captioner.metrics.format_grounding_table`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from captioner.data.datamodule import CaptionDataModule
from captioner.inference import Caption
from captioner.metrics import evaluate_grounding


def grounding_file(dm: CaptionDataModule) -> Path | None:
    """The data set's grounding file, or ``None`` when its source has none (or it is missing)."""
    path = dm.source.grounding_file()
    return path if path is not None and path.is_file() else None


def score_grounding(captions: Iterable[Caption], path: str | os.PathLike) -> dict[str, Any]:
    """Attention correctness, pointing game and caption grounding of ``captions`` (with their
    attention maps) against the grounding file at ``path``."""
    from captioner.data.shapes import load_grounding

    samples = ({"image_id": c.image, "tokens": c.words, "attention": c.alphas} for c in captions)
    return evaluate_grounding(samples, load_grounding(path))


__all__ = ["grounding_file", "score_grounding"]
