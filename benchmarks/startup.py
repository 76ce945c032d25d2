"""Time to the first caption: ``captioner caption --checkpoint CKPT IMAGE`` and the Python API
(``CaptionPipeline.from_pretrained(CKPT)(IMAGE)``), each a fresh interpreter timed from its
start to its exit, against ``python -c "import torch"`` (the floor). With ``baseline_root`` (a
checkout of other code, e.g. ``git worktree add /tmp/before main``) the same commands run on that
code too, with the same Python, taking turns within each round, so that their ratio holds on a
machine whose speed drifts."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(checkpoint: Path, image: Path) -> dict[str, list[str]]:
    api = ("from captioner import CaptionPipeline; "
           f"print(CaptionPipeline.from_pretrained({str(checkpoint)!r})({str(image)!r}).text)")
    return {"caption": [sys.executable, "-m", "captioner.cli", "caption", "--checkpoint", str(checkpoint), str(image)],
            "api": [sys.executable, "-c", api]}


def _wall(cmd: list[str], code_root: Path, threads: int | None) -> float:
    """Wall seconds of ``cmd`` with ``code_root`` first on the import path (and ``threads``
    intra-op threads, where given); it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(code_root), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=code_root, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (PYTHONPATH={code_root}) failed:\n{done.stderr[-2000:]}")
    return seconds


def _figures(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def bench_startup(*, checkpoint: Path, image: Path | None = None, baseline_root: Path | None = None,
                  repeats: int = 5, threads: int | None = None) -> dict:
    """Median, min and max wall seconds of each command over ``repeats`` rounds (after one
    untimed round: disk caches warm); with ``baseline_root``, the per-round ratio
    baseline / this code of each command (above 1: this code starts faster). ``threads``: torch's
    intra-op threads in each process (OMP_NUM_THREADS; default: torch's, one per core). On a
    machine shared with other jobs, 1 keeps a thread that waits for a busy core from stretching
    each operation of the model."""
    with tempfile.TemporaryDirectory(prefix="captioner-startup-") as tmp:
        if image is None:
            from benchmarks.common import write_images

            image = write_images(Path(tmp), 1, (64, 64), fmt="PNG")[0]
        runs: dict[str, tuple[list[str], Path]] = {"import_torch": ([sys.executable, "-c", "import torch"], ROOT)}
        for name, cmd in _commands(Path(checkpoint).resolve(), Path(image).resolve()).items():
            runs[name] = (cmd, ROOT)
            if baseline_root is not None:
                runs[f"{name}_baseline"] = (cmd, Path(baseline_root).resolve())
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(repeats + 1):
            for name, (cmd, code) in runs.items():
                seconds = _wall(cmd, code, threads)
                if round_:
                    times[name].append(seconds)
    report = {name: _figures(t) for name, t in times.items()}
    for name in _commands(Path(), Path()):
        if baseline_root is not None:
            ratios = [b / a for a, b in zip(times[name], times[f"{name}_baseline"], strict=True)]
            report[f"{name}_speedup"] = round(statistics.median(ratios), 2)
    return {"repeats": repeats, **report}
