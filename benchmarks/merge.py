"""Peak resident memory of the merge at the end of ``captioner caption`` on many processes.

A synthetic chunk set, as ``world`` processes write it (blocks of ``block`` images dealt
round-robin, every ``chunk`` images of a process one file), is made for each size; the merge then
runs alone in a fresh child process, which reports its peak resident memory: ``ru_maxrss``, and
on Linux ``VmHWM`` reset after the imports (``merge_peak_mb``: the merge's own peak; the
imports' peak, about 730 MB with torch, would otherwise hide anything below it).
The file list is what ``--files-from`` reads; a checkout whose caption code predates it merges
from the list held in memory, as its ``caption`` did.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import peak_rss_mb

CAPTION = "a red circle to the left of a small blue square"


def write_chunk_set(folder: Path, rows: int, world: int, block: int, chunk: int) -> Path:
    """``rows`` images' chunks in ``folder/out.jsonl.parts`` and their list in ``folder/files.txt``
    (one caption row per image); returns the output's path."""
    out = folder / "out.jsonl"
    parts = out.with_name(out.name + ".parts")  # as ChunkFolder names them
    parts.mkdir()
    words = CAPTION.split()
    with open(folder / "files.txt", "w") as listed:
        for i in range(rows):
            listed.write(f"photos/{i // 1000:04d}/img{i:07d}.jpg\n")
    for rank in range(world):
        mine = [i for k in range(rank, (rows + block - 1) // block, world)
                for i in range(k * block, min(rows, (k + 1) * block))]
        for c in range(0, len(mine), chunk):
            part = mine[c:c + chunk]
            with open(parts / f"chunk-{part[0]:09d}-{len(part):06d}.jsonl", "w") as f:
                for i in part:
                    image = f"photos/{i // 1000:04d}/img{i:07d}.jpg"
                    row = {"image": image, "rank": 1, "caption": CAPTION, "score": -3.25, "mean_logprob": -0.32,
                           "word_probs": [0.9] * len(words)}
                    f.write(json.dumps({"i": i, "image": image, "rows": [row]}) + "\n")
    return out


def _merge(out: str, block: int, result) -> None:
    from captioner.commands.caption_output import ChunkRows

    listed = Path(out).with_name("files.txt")
    try:
        from captioner.data.images import FileList
        from captioner.data.records import Deal

        paths = Deal(FileList(listed), block)
    except ImportError:  # before --files-from: the walked list, held by every process
        with open(listed) as f:
            paths = [Path(line.strip()) for line in f]
    before = peak_rss_mb()
    since = _reset_peak()
    started = time.perf_counter()
    ChunkRows(Path(out), "jsonl", paths, resume=False).merge()
    seconds = time.perf_counter() - started
    result.put({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "before_mb": before,
                **({"merge_peak_mb": _hwm_mb(), "start_mb": since} if since is not None else {})})


def _reset_peak() -> float | None:
    """Reset the kernel's peak resident size of this process (Linux: ``clear_refs`` 5), so that
    ``VmHWM`` afterwards is the merge's own peak, not the imports'; the resident size then
    (MB), or None where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def _hwm_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def bench_merge(*, rows: Sequence[int] = (10_000, 100_000, 1_000_000), world: int = 8, block: int = 16,
                chunk: int = 256) -> dict:
    """Peak RSS of the merge of ``rows`` images (each size in its own child process) and its
    growth from the smallest size to the largest."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak is the merge's alone
    figures: dict[str, dict] = {}
    for n in rows:
        with tempfile.TemporaryDirectory(prefix="captioner-merge-") as tmp:
            out = write_chunk_set(Path(tmp), n, world, block, chunk)
            result = ctx.Queue()
            child = ctx.Process(target=_merge, args=(str(out), block, result))
            child.start()
            got = result.get()
            child.join()
            with open(out) as f:
                lines = sum(1 for _ in f)
            assert lines == n, f"{lines} rows merged of {n}"
        figures[str(n)] = {k: round(v, 1) for k, v in got.items()}
    first, last = str(rows[0]), str(rows[-1])
    key = "merge_peak_mb" if "merge_peak_mb" in figures[first] else "peak_rss_mb"
    return {"world": world, "merge": figures,
            "peak_growth_mb": round(figures[last][key] - figures[first][key], 1)}
