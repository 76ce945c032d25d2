"""A cache of region features on disk, so that a frozen encoder runs once per image, not per epoch.

Layout of a cache folder::

    index.json            what was extracted and how (see below); written first, updated per shard
    shard-00000.npy       float16 (S, N, D): the region features of S images, in index order
    shard-00001.npy       ...

``index.json`` holds ``format``, ``complete``, ``dtype``, ``grid`` (h, w), ``num_regions`` (N),
``dim`` (D), ``shard_size`` (S), the ``encoder`` settings and ``preprocessing`` they were made
with, ``splits`` (split -> image ids), ``counts`` (split -> number of images, plus ``images``: the
distinct ones), ``shards`` (file and rows of each), ``done`` (the shards written so far) and
``index`` (image id -> [shard, row]).

Shards are written whole (to a temporary name, then renamed), so an interrupted extraction is
resumed by running it again: finished shards are kept and skipped. ``complete`` is set only after
every shard has been checked (its shape and the total count), and :class:`FeatureStore` refuses a
cache that is not complete. Shards are opened memory-mapped: a worker reads only the rows it
serves, and many workers share the page cache.

The encoder is passed in (any module mapping images (B, 3, S, S) to ((B, N, D), (h, w))), so this
module does not depend on ``captioner.models``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captioner.data.atomic import atomic_write, atomic_write_json
from captioner.data.images import load_image
from captioner.data.records import ImageRecord
from captioner.data.transforms import Preprocessing

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT = 1
DEFAULT_SHARD_SIZE = 1024
# float16 keeps 3 significant digits, plenty for post-ReLU CNN features, and halves the disk and
# page-cache footprint: ResNet-101 at 14x14x2048 is 802,816 bytes per image.
DTYPE = np.float16


class FeatureCacheError(Exception):
    """A feature cache that is missing, incomplete, inconsistent or lacks an image."""


def bytes_per_image(num_regions: int, dim: int) -> int:
    return num_regions * dim * np.dtype(DTYPE).itemsize


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def _shard_ok(path: Path, rows: int, n: int, d: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, n, d) and arr.dtype == DTYPE


class _Images(Dataset):
    def __init__(self, records: Sequence[ImageRecord], preprocessing: Preprocessing) -> None:
        self.records = records
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Tensor:
        return self.preprocessing(load_image(self.records[i].path))


def extract_features(
    splits: Mapping[str, Sequence[ImageRecord]],
    encoder: Callable[[Tensor], tuple[Tensor, tuple[int, int]]],
    out_dir: str | os.PathLike,
    preprocessing: Preprocessing,
    encoder_config: Mapping | None = None,
    batch_size: int = 32,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
) -> dict:
    """Encode every image of ``splits`` once and write the cache to ``out_dir``; returns the index.

    ``encoder`` must be frozen (features of a training encoder go stale); it is put in eval mode.
    Re-running with the same arguments resumes: shards already written are kept. A folder that
    holds a different cache is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    seen: set[int] = set()
    for recs in splits.values():
        for r in recs:
            if r.image_id not in seen:
                seen.add(r.image_id)
                records.append(r)
    if not records:
        raise FeatureCacheError("no images to extract (are the splits empty?)")
    device = torch.device(device)
    encoder.eval().to(device)

    # The grid and feature size come from the encoder itself.
    with torch.inference_mode():
        probe, grid = encoder(_Images(records[:1], preprocessing)[0].unsqueeze(0).to(device))
    n, d = probe.shape[1], probe.shape[2]
    plan = {
        "format": FORMAT,
        "dtype": np.dtype(DTYPE).name,
        "grid": list(grid),
        "num_regions": n,
        "dim": d,
        "shard_size": shard_size,
        "encoder": dict(encoder_config or {}),
        "preprocessing": preprocessing.to_dict(),
        "splits": {s: [r.image_id for r in recs] for s, recs in splits.items()},
    }
    starts = list(range(0, len(records), shard_size))
    shards = [{"file": _shard_name(i), "rows": min(shard_size, len(records) - s)} for i, s in enumerate(starts)]
    index_path = out / INDEX_FILE
    done: set[int] = set()
    if index_path.exists() and not overwrite:
        old = json.loads(index_path.read_text())
        if any(old.get(k) != v for k, v in plan.items()) or old.get("shards") != shards:
            diff = sorted(k for k, v in plan.items() if old.get(k) != v) or ["shards"]
            raise FeatureCacheError(
                f"{out} holds a different feature cache (differs in: {', '.join(diff)}); "
                "choose another folder or pass overwrite (--overwrite) to replace it")
        done = {i for i in old.get("done", []) if _shard_ok(out / shards[i]["file"], shards[i]["rows"], n, d)}
        if done:
            logger.info("resuming %s: %d of %d shards already written", out, len(done), len(shards))
    index = {
        **plan,
        "complete": False,
        "counts": {**{s: len(ids) for s, ids in plan["splits"].items()}, "images": len(records)},
        "bytes_per_image": bytes_per_image(n, d),
        "shards": shards,
        "done": sorted(done),
        "index": {str(r.image_id): [i // shard_size, i % shard_size] for i, r in enumerate(records)},
    }
    atomic_write_json(index_path, index)  # a crash leaves the previous index

    todo = [i for i in range(len(shards)) if i not in done]
    batches = [list(range(b, min(b + batch_size, starts[i] + shards[i]["rows"])))
               for i in todo for b in range(starts[i], starts[i] + shards[i]["rows"], batch_size)]
    loader = DataLoader(_Images(records, preprocessing), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    batch_iter = iter(loader)
    for i in todo:
        rows = shards[i]["rows"]
        buf = np.empty((rows, n, d), dtype=DTYPE)
        filled = 0
        while filled < rows:
            images = next(batch_iter)
            with torch.inference_mode():
                feats, _ = encoder(images.to(device, non_blocking=True))  # (b, N, D)
            half = feats.to(torch.float16)
            if not bool(torch.isfinite(half).all()):
                raise FeatureCacheError(
                    f"encoder features exceed the float16 range (max |x| = {feats.abs().max().item():.3g}) "
                    f"in shard {i}; is the encoder's preprocessing right?")
            buf[filled : filled + len(half)] = half.cpu().numpy()
            filled += len(half)
        atomic_write(out / shards[i]["file"], lambda f: np.save(f, buf))  # noqa: B023 (called at once)
        done.add(i)
        index["done"] = sorted(done)
        atomic_write_json(index_path, index)
        logger.info("shard %d/%d written (%d images)", len(done), len(shards), rows)

    # Verify before declaring the cache usable: every shard present, with the planned shape.
    bad = [s["file"] for s in shards if not _shard_ok(out / s["file"], s["rows"], n, d)]
    total = sum(s["rows"] for s in shards)
    if bad or total != len(records) or len(index["index"]) != len(records):
        raise FeatureCacheError(f"{out}: verification failed (bad shards: {bad or 'none'}, "
                                f"{total} rows for {len(records)} images)")
    index["complete"] = True
    atomic_write_json(index_path, index)
    logger.info("feature cache %s complete: %d images, %d shards, %s bytes per image",
                out, len(records), len(shards), f"{index['bytes_per_image']:,}")
    return index


class FeatureStore:
    """Read access to a complete cache: ``get(image_id)`` -> float16 Tensor (N, D)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FeatureCacheError(f"{self.path}: no feature cache here (no {INDEX_FILE}); "
                                    "make one with `captioner features extract --config CFG --out DIR`")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise FeatureCacheError(f"{self.path}: feature cache format {index.get('format')!r}, "
                                    f"this version of captioner reads format {FORMAT}")
        if not index.get("complete"):
            raise FeatureCacheError(
                f"{self.path}: the feature cache is incomplete ({len(index.get('done', []))} of "
                f"{len(index.get('shards', []))} shards written); run the same "
                "`captioner features extract` command again to finish it")
        self.grid: tuple[int, int] = tuple(index["grid"])
        self.num_regions: int = index["num_regions"]
        self.dim: int = index["dim"]
        self.encoder: dict = index["encoder"]
        self.preprocessing = Preprocessing.from_dict(index["preprocessing"])
        self.splits: dict[str, list[int]] = index["splits"]
        self.counts: dict[str, int] = index["counts"]
        self._files = [s["file"] for s in index["shards"]]
        self._where = {int(k): (v[0], v[1]) for k, v in index["index"].items()}
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._where

    def _shard(self, i: int) -> np.ndarray:
        arr = self._shards.get(i)
        if arr is None:
            arr = self._shards[i] = np.load(self.path / self._files[i], mmap_mode="r")
        return arr

    def get(self, image_id: int) -> Tensor:
        """The float16 region features (N, D) of one image."""
        try:
            shard, row = self._where[int(image_id)]
        except KeyError:
            raise FeatureCacheError(
                f"image {image_id} is not in the feature cache {self.path} (it holds the splits "
                f"{', '.join(self.splits)}); extract the missing split(s) into a new folder") from None
        return torch.from_numpy(np.array(self._shard(shard)[row]))  # a copy: the map is read-only

    def __getstate__(self) -> dict:
        # DataLoader workers get the index, not the maps (pickling a memmap copies its data).
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state
