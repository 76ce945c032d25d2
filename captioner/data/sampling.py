"""A sampler that shards across processes itself, reshuffles per epoch and can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys: the epoch lets a data set draw per-epoch choices (which
    reference caption) from ``(seed, epoch, index)`` alone, so they are identical whatever the
    number of workers or processes, and after a resume.

    Training (``shuffle=True``): a fresh permutation per epoch from ``seed + epoch``; under
    ``torch.distributed`` each rank takes every world-size-th index and the tail that does not
    divide evenly is dropped, so no image is seen twice in an epoch across ranks.
    Evaluation (``shuffle=False``): every index in order; ranks are padded with repeats to the same
    length (results are de-duplicated by image id after gathering).
    ``skip`` drops the first items of the next iteration (resume mid-epoch), once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        rank, world = _rank_world()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            usable = (self.size // world) * world if world > 1 else self.size
            return order[:usable][rank::world]
        order = list(range(self.size))
        per_rank = -(-self.size // world)  # ceil
        order += order[: per_rank * world - self.size]
        return order[rank::world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self._indices()[self.skip :]
        self.skip = 0
        return iter([(i, self.epoch) for i in idx])

    def __len__(self) -> int:
        return len(self._indices())
