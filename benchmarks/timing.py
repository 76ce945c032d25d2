"""Wall-clock timing: warm-up, then timed rounds (the functions taking turns within each)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    return statistics.median(alternating((fn,), repeats, device)[0])


def alternating(fns: Sequence[Callable[[], object]], repeats: int, device: torch.device) -> list[list[float]]:
    """Wall seconds of each of ``fns`` per round, the functions taking turns within each of
    ``repeats`` rounds, after one warm-up run of each."""
    for fn in fns:
        fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return times
