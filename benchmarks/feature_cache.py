"""An int8 feature cache against a float16 one: feature error, greedy captions, loader cost.

``python -m benchmarks.feature_cache [--images 600] [--steps 300] [--work DIR] [--json]``

1. makes a ``shapes`` data set (5 captions per image) and encodes it with a frozen torchvision
   encoder into two caches, ``features extract --dtype fp16`` and ``--dtype int8``;
2. the relative error of the int8 features, ||int8 - fp16|| / ||fp16|| per image (mean and
   largest), and that of the other scale granularities for comparison (one scale per image and
   region, one per image);
3. trains a model ``--steps`` steps from the float16 cache (``captioner fit``), greedy-decodes the
   test split from each cache and counts the identical captions;
4. the loader's cost of a batch of 64 images at 196 x 2048 (ResNet-101's grid), see
   :func:`loader_ms`.

Hub weights are out of reach offline: the encoder has random weights (seed 0), so its features
are post-ReLU activations of a real ResNet shape but not those of ImageNet training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks import timing
from captioner.checkpoint import load_checkpoint
from captioner.cli import main as captioner
from captioner.data.features import FeatureStore, dequantize, quantize
from captioner.data.shapes import ShapesConfig, generate_shapes
from captioner.decoding.greedy import greedy

ROOT = Path(__file__).resolve().parent.parent


def _quantised(x: np.ndarray, over: tuple[int, ...]) -> np.ndarray:
    """Symmetric int8 of x (N, D) with one scale per the max over ``over``, back to floats."""
    scale = np.abs(x).max(axis=over, keepdims=True) / 127
    scale[scale == 0] = 1
    return np.clip(np.round(x / scale), -127, 127) * scale


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def feature_errors(fp16: FeatureStore, int8: FeatureStore) -> dict:
    """The int8 cache's error against the float16 one, per image; and, computed from the float16
    features, what one scale per (image, region) or per image would give."""
    stored, per_region, per_image = [], [], []
    for image_id in sorted({i for ids in fp16.splits.values() for i in ids}):
        ref = fp16.get(image_id).float().numpy()  # (N, D)
        stored.append(_relative(int8.get(image_id).numpy(), ref))
        per_region.append(_relative(_quantised(ref, (1,)), ref))
        per_image.append(_relative(_quantised(ref, (0, 1)), ref))
    return {"images": len(stored), "relative_error_mean": statistics.fmean(stored),
            "relative_error_max": max(stored),
            "per_image_region_scale_error_mean": statistics.fmean(per_region),
            "per_image_scale_error_mean": statistics.fmean(per_image)}


def same_greedy_captions(checkpoint: Path, fp16: FeatureStore, int8: FeatureStore, split: str) -> dict:
    """Greedy captions of ``split`` from each cache with one trained model: the share that are equal."""
    model = load_checkpoint(checkpoint).model
    ids = fp16.splits[split]
    captions = []
    for store in (fp16, int8):
        feats = torch.stack([store.get(i).float() for i in ids])  # (B, N, D)
        captions.append(greedy(model.decoder, feats, max_length=20).tokens.tolist())
    same = sum(a == b for a, b in zip(*captions, strict=True))
    return {"split": split, "captions": len(ids), "identical": same, "identical_share": same / len(ids)}


def loader_ms(batch: int = 64, regions: int = 196, dim: int = 2048, repeats: int = 5) -> dict:
    """Milliseconds per batch to turn stored rows into what a step gets: float16 rows stacked and
    made float32 in the loader (a float16 cache); int8 rows dequantised per image in the loader;
    int8 rows and scales only stacked in the loader (what an int8 cache does), and then the
    dequantisation that follows on the device (here the CPU)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, regions, dim, generator=g)  # (B, N, D)
    half = [r.numpy() for r in x.half()]
    q, s = quantize(x)
    q_rows, s_rows = [r.numpy() for r in q], [r.numpy() for r in s]
    stacked = (q, s)

    def fp16() -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.array(r)) for r in half]).float()

    def int8_dequantised_per_image() -> torch.Tensor:
        return torch.stack([dequantize(torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b)))
                            for a, b in zip(q_rows, s_rows, strict=True)])

    def int8_stacked() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([torch.from_numpy(np.array(a)) for a in q_rows]),
                torch.stack([torch.from_numpy(np.array(b)) for b in s_rows]))

    def int8_dequantise_batch() -> torch.Tensor:
        return dequantize(*stacked)

    fns = (fp16, int8_dequantised_per_image, int8_stacked, int8_dequantise_batch)
    times = timing.alternating(fns, repeats, torch.device("cpu"))
    return {f"{fn.__name__}_ms": 1000 * statistics.median(t) for fn, t in zip(fns, times, strict=True)}


def bench_feature_cache(*, images: int = 600, image_size: int = 128, encoder: str = "resnet50", grid: int = 4,
                        steps: int = 300, work: Path) -> dict:
    data = work / "shapes"
    if not (data / "dataset.json").exists():
        generate_shapes(data, ShapesConfig(num_images=images, seed=0, image_size=image_size))
    enc = {"name": encoder, "grid": grid, "image_size": image_size, "trainable_blocks": 0}
    cfg = work / "extract.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"encoder": enc}, "data": {
        "dataset": "shapes", "shapes": {"data_dir": str(data), "image_size": image_size, "num_images": images},
        "min_count": 1, "num_workers": 0}}))
    caches = {}
    for dtype in ("fp16", "int8"):
        out = work / f"cache-{dtype}"
        if captioner(["features", "extract", "--config", str(cfg), "--out", str(out), "--dtype", dtype,
                      "--device", "cpu", "--batch-size", "32"]) != 0:
            raise RuntimeError(f"features extract --dtype {dtype} failed")
        caches[dtype] = out
    fp16, int8 = FeatureStore(caches["fp16"]), FeatureStore(caches["int8"])
    disk = {d: sum(p.stat().st_size for p in c.glob("*.npy")) for d, c in caches.items()}
    run = work / "run"
    args = ["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), "--seed_everything", "0",
            "--data.shapes.data_dir", str(data), "--data.shapes.image_size", str(image_size),
            "--data.shapes.num_images", str(images), "--data.feature_cache", str(caches["fp16"]),
            "--data.num_workers", "0", "--data.batch_size", "32", "--data.min_count", "1",
            *[a for k, v in enc.items() for a in (f"--model.encoder.{k}", str(v))],
            "--model.optim.warmup_steps", "20", "--model.optim.scheduler", "none",
            "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]
    if captioner(args) != 0:
        raise RuntimeError("captioner fit from the float16 cache failed")
    checkpoint = max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return {"cache_bytes": disk, "int8_over_fp16": disk["int8"] / disk["fp16"],
            "features": feature_errors(fp16, int8),
            "greedy": same_greedy_captions(checkpoint, fp16, int8, "test"),
            "loader_ms_per_batch_of_64_at_196x2048": loader_ms()}


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.feature_cache", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="training steps from the float16 cache")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--work", type=Path, default=None, help="a folder for the data, caches and run (default: a temp)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = bench_feature_cache(images=a.images, image_size=a.image_size, encoder=a.encoder, grid=a.grid,
                                      steps=a.steps, work=work)
    figures["settings"] = {k: str(v) for k, v in vars(a).items()}
    sys.stdout.write(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run())
