"""Time per training epoch of a COCO-sized split, from a feature cache or from JPEG files.

A synthetic Karpathy split (``images`` training images of COCO's size, five captions each, random
words) is trained with ``configs/coco.yaml`` (random encoder weights: nothing is downloaded) for
``warmup + steps`` optimiser steps; the time of the last ``steps`` is extrapolated to the steps of
one COCO epoch. Files are few and repeated under many names, so that writing them stays cheap;
they are read from the page cache either way, as a second epoch would read them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import peak_rss_mb, write_images

ROOT = Path(__file__).resolve().parent.parent
# COCO's Karpathy training split with restval: 113,287 images; five captions each are counted
# (a few images have six or seven).
COCO_TRAIN_IMAGES = 113_287
CAPTIONS_PER_IMAGE = 5
WORDS = 10_000  # about COCO's vocabulary at min_count 5


class StepClock(L.Callback):
    """The wall time of the optimiser steps after the first ``warmup`` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.timed = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.warmup and self.start is None:
            _sync(pl_module.device)
            self.start = time.perf_counter()
        elif self.start is not None and step > self.warmup + self.timed:
            _sync(pl_module.device)
            self.end = time.perf_counter()
            self.timed = step - self.warmup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_split(root: Path, images: int, distinct: int, source_size: tuple[int, int], seed: int = 0) -> list[str]:
    """A Karpathy split file of ``images`` training images (plus 8 val and 8 test) over
    ``distinct`` JPEG files written once and linked under every name -> the ``data.karpathy``
    overrides that read it."""
    import random

    rng = random.Random(seed)
    files = write_images(root / "distinct", min(distinct, images), source_size)
    words = [f"w{i}" for i in range(WORDS)]
    entries = []
    for i in range(images + 16):
        split = "train" if i < images else ("val" if i < images + 8 else "test")
        name = Path("train2014") / f"COCO_train2014_{i:012d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(files[i % len(files)], root / name)
        sentences = []
        for _ in range(CAPTIONS_PER_IMAGE):
            tokens = rng.choices(words, k=rng.randint(8, 14))
            sentences.append({"tokens": tokens, "raw": " ".join(tokens)})
        entries.append({"filepath": str(name.parent), "filename": name.name, "cocoid": i, "split": split,
                        "sentences": sentences})
    split_file = root / "dataset_synthetic.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return ["--data.karpathy.split_file", str(split_file), "--data.karpathy.image_root", str(root)]


def _settings(data: list[str], run: Path, device: str, batch_size: int, num_workers: int,
              encoder: str, image_size: int) -> list[str]:
    """configs/coco.yaml on the synthetic split, random encoder weights, no validation or logs."""
    return ["--config", str(ROOT / "configs" / "coco.yaml"), *data,
            "--model.encoder.name", encoder, "--model.encoder.image_size", str(image_size),
            "--model.encoder.pretrained", "false", "--data.min_count", "1",
            "--data.batch_size", str(batch_size), "--data.num_workers", str(num_workers),
            "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1",
            *(["--trainer.precision", "bf16-mixed"] if device == "cuda" else []),
            "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
            "--last_checkpoint.every_n_steps", "1000000"]


def extract_features(settings: list[str], out: Path, device: str, batch_size: int) -> float:
    """``captioner features extract`` of the split into ``out``: seconds taken."""
    from captioner.cli import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its summary: stdout is the benchmark's report
        code = main(["features", "extract", *settings, "--out", str(out), "--device", device,
                     "--batch-size", str(batch_size)])
    if code:
        raise RuntimeError(f"features extract ended with status {code}")
    return time.perf_counter() - start


def time_fit(settings: list[str], warmup: int, steps: int) -> dict:
    """``fit`` for ``warmup + steps`` optimiser steps (in this process, as ``captioner fit`` runs
    it): seconds per timed step and peak GPU memory."""
    from captioner.commands.config import CaptionerCLI

    cli = CaptionerCLI([*settings, "--trainer.max_steps", str(warmup + steps)], run=False)
    clock = StepClock(warmup)
    cli.trainer.callbacks.append(clock)
    cuda = cli.trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if clock.start is None or not clock.timed:
        raise RuntimeError(f"fewer than {warmup + 1} steps ran: give more --images or fewer steps")
    per_step = (clock.end - clock.start) / clock.timed
    return {"s_per_step": per_step, "timed_steps": clock.timed, "fit_wall_s": time.perf_counter() - started,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def bench_epoch(*, source: str = "cache", images: int = 2048, distinct: int = 256, warmup: int = 10,
                steps: int = 50, batch_size: int = 64, num_workers: int = 8, device: str = "cuda",
                encoder: str = "resnet101", image_size: int = 256,
                source_size: tuple[int, int] = (640, 480)) -> dict:
    """Seconds per step of ``fit`` (global batch ``batch_size``, one device) reading ``source``
    (``cache``: features made by ``features extract`` first; ``jpeg``: the files, encoded every
    step), and that time extrapolated to one COCO epoch."""
    if source not in ("cache", "jpeg"):
        raise ValueError(f"source must be cache or jpeg, got {source!r}")
    with tempfile.TemporaryDirectory(prefix="captioner-epoch-") as tmp:
        root = Path(tmp)
        data = synthetic_split(root / "data", images, distinct, source_size)
        settings = _settings(data, root / "run", device, batch_size, num_workers, encoder, image_size)
        figures: dict = {}
        if source == "cache":
            cache = root / "features"
            seconds = extract_features(settings, cache, device, batch_size)
            figures["extract_images_per_s"] = (images + 16) / seconds
            settings += ["--data.feature_cache", str(cache)]
        figures.update(time_fit(settings, warmup, steps))
    epoch_steps = math.ceil(COCO_TRAIN_IMAGES * CAPTIONS_PER_IMAGE / batch_size)
    return {**figures, "coco_epoch_steps": epoch_steps, "coco_epoch_min": figures["s_per_step"] * epoch_steps / 60,
            "peak_rss_mb": peak_rss_mb()}
