"""The one in-memory form every reader produces: an image with its reference captions."""

from __future__ import annotations

from collections.abc import Container, Iterable
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


class Deal:
    """One process's share of a list of inputs, read in one pass: the positions of the blocks
    (:func:`blocks`) dealt to it round-robin (the ``rank``-th of every ``world``), leaving out
    the items whose ``str`` is in ``skip`` (done by an earlier run), with the counts of the whole
    list. ``items`` is iterated again for each :meth:`deal` to another rank, so a file list read
    anew (:class:`captioner.data.images.FileList`) is never held whole: only the share is."""

    def __init__(self, items: Iterable, size: int, skip: Container[str] = frozenset()) -> None:
        self.items, self.size, self.skip = items, size, skip
        self.mine: dict = {}  # position -> item, of the rank's blocks, in order
        self.total = self.todo = 0  # items in the list; those not skipped
        self.dealt: tuple[int, int] | None = None

    def deal(self, rank: int, world: int) -> Deal:
        """Read the list and keep ``rank``'s share (nothing is read when it is kept already)."""
        if self.dealt == (rank, world):
            return self
        mine, total, todo, block, k = {}, 0, 0, None, -1
        for i, item in enumerate(self.items):
            total += 1
            if str(item) in self.skip:
                continue
            todo += 1
            if i // self.size != block:  # a block with something to do: the next one dealt
                block, k = i // self.size, k + 1
            if k % world == rank:
                mine[i] = item
        self.mine, self.total, self.todo, self.dealt = mine, total, todo, (rank, world)
        return self

    def positions(self) -> list[int]:
        """The input positions of this rank's share, in order."""
        return list(self.mine)

    def __getitem__(self, i: int):
        return self.mine[i]
