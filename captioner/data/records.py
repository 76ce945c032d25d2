"""The one in-memory form every reader produces: an image with its reference captions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image and all its reference captions.

    ``image_id`` is what evaluation files use: the COCO id when the data set has one, else ``imgid``.
    ``captions`` are tokenised (lower-case words, no punctuation); ``raw`` keeps the original text.
    """

    image_id: int
    path: Path
    split: str
    captions: list[list[str]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    sentids: list[int] = field(default_factory=list)
    filename: str = ""
    # Word-region grounding where the data set has it (``shapes``): ``image_size``, ``objects``
    # (their geometry) and ``token_objects``, per caption the object index of each token or -1.
    grounding: dict | None = None


def blocks(todo: Iterable[int], size: int) -> list[list[int]]:
    """Input positions -> blocks of the positions that share ``position // size``, in order.
    Positions already done leave holes; a block is never filled up from the next one, so that
    a batch holds the same images in every run."""
    out: list[list[int]] = []
    last = None
    for i in sorted(todo):
        if i // size != last:
            out.append([])
            last = i // size
        out[-1].append(i)
    return out
