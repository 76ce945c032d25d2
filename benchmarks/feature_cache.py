"""An int8 feature cache against a float16 one: feature error, greedy captions, loader cost.

``python -m benchmarks.feature_cache [--images 600] [--steps 300] [--threads 1] [--work DIR]``

1. makes a ``shapes`` data set (5 captions per image) and trains ``configs/shapes.yaml`` on it for
   ``--steps`` steps (its ``shapes_cnn`` encoder end to end);
2. encodes the data set with that encoder, now frozen, into two caches, float16 and int8
   (``extract_features``, as ``features extract --dtype`` does);
3. the relative error of the int8 features, ||int8 - fp16|| / ||fp16|| per image (mean and
   largest), and that of other scale granularities for comparison (one scale per image and
   region, one per image);
4. greedy-decodes the test (and train) split from each cache with the trained model and counts
   the identical captions, and the distinct ones (a model that says one thing of every image
   would agree trivially);
5. the loader's cost of a batch of 64 images at 196 x 2048 (ResNet-101's grid), see
   :func:`loader_ms`.

Hub weights are out of reach offline, and a torchvision ResNet with random weights gives
features that hardly differ between images (pooled, 3 % of their mean): a model trained on them
says one caption of every image. A trained encoder's features are the real-ish ones here.
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

from benchmarks import timing
from captioner.checkpoint import load_checkpoint
from captioner.cli import main as captioner
from captioner.data.datamodule import CaptionDataModule
from captioner.data.features import FeatureStore, dequantize, extract_features, quantize
from captioner.data.shapes import ShapesConfig, generate_shapes
from captioner.decoding.greedy import greedy
from captioner.models import Captioner

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


def same_greedy_captions(model: Captioner, fp16: FeatureStore, int8: FeatureStore, splits: list[str]) -> dict:
    """Greedy captions of ``splits`` from each cache with one trained model: the share that are
    equal, and how many distinct captions the float16 features gave (a model that says one thing
    of every image would agree trivially)."""
    figures = {}
    for split in splits:
        ids = fp16.splits[split]
        captions = []
        for store in (fp16, int8):
            feats = torch.stack([store.get(i).float() for i in ids])  # (B, N, D)
            captions.append(greedy(model.decoder, feats, max_length=20).tokens.tolist())
        same = sum(a == b for a, b in zip(*captions, strict=True))
        figures[split] = {"captions": len(ids), "identical": same, "identical_share": same / len(ids),
                          "distinct_fp16_captions": len({tuple(c) for c in captions[0]})}
    return figures


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


def bench_feature_cache(*, images: int = 600, image_size: int = 64, steps: int = 300, work: Path) -> dict:
    data = work / "shapes"
    if not (data / "dataset.json").exists():
        generate_shapes(data, ShapesConfig(num_images=images, seed=0, image_size=image_size))
    run = work / "run"
    args = ["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), "--seed_everything", "0",
            "--data.shapes.data_dir", str(data), "--data.shapes.image_size", str(image_size),
            "--data.shapes.num_images", str(images), "--data.num_workers", "0",
            "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]
    if captioner(args) != 0:
        raise RuntimeError("captioner fit failed")
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    # its encoder, trained and now frozen, encodes the data set into a cache of each dtype
    dm = CaptionDataModule(dataset="shapes", shapes={"data_dir": str(data), "image_size": image_size,
                                                     "num_images": images},
                           num_workers=0, preprocessing=loaded.preprocessing)
    splits = {s: dm.split_records(s) for s in ("train", "val", "test")}
    caches = {}
    for dtype in ("float16", "int8"):
        caches[dtype] = work / f"cache-{dtype}"
        extract_features(splits, loaded.model.encoder, caches[dtype], loaded.preprocessing,
                         {"name": "shapes_cnn (trained)"}, batch_size=64, dtype=dtype)
    fp16, int8 = FeatureStore(caches["float16"]), FeatureStore(caches["int8"])
    disk = {d: sum(p.stat().st_size for p in c.glob("*.npy")) for d, c in caches.items()}
    return {"cache_bytes": disk, "int8_over_fp16": disk["int8"] / disk["float16"],
            "grid": list(fp16.grid), "dim": fp16.dim,
            "features": feature_errors(fp16, int8),
            "greedy": same_greedy_captions(loaded.model, fp16, int8, ["test", "train"]),
            "loader_ms_per_batch_of_64_at_196x2048": loader_ms()}


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.feature_cache", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="training steps of the model (configs/shapes.yaml)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--work", type=Path, default=None, help="a folder for the data, caches and run (default: a temp)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = bench_feature_cache(images=a.images, image_size=a.image_size, steps=a.steps, work=work)
    figures["settings"] = {k: str(v) for k, v in vars(a).items()}
    sys.stdout.write(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run())
