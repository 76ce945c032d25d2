"""A cache of region features on disk, so that a frozen encoder runs once per image, not per epoch.

Layout of a cache folder::

    index.json            what was extracted and how (see below); written first, updated per shard
    shard-00000.npy       float16 (S, N, D): the region features of S images, in index order
    shard-00001.npy       ...
    parts/                while an extraction runs: what each process has encoded (see below)

``index.json`` holds ``format``, ``complete``, ``dtype``, ``grid`` (h, w), ``num_regions`` (N),
``dim`` (D), ``shard_size`` (S), the ``encoder`` settings and ``preprocessing`` they were made
with, ``splits`` (split -> image ids), ``counts`` (split -> number of images, plus ``images``: the
distinct ones), ``shards`` (file and rows of each), ``done`` (the shards written so far) and
``index`` (image id -> [shard, row]).

While an extraction runs, each process keeps what it has encoded every few hundred images in
``parts/`` (:class:`FeatureChunks`, each chunk written whole: to a temporary name, then renamed),
and at the end the chunks are merged into the shards, each written whole too. An interrupted
extraction is resumed by running it again: the images in chunks and finished shards are skipped.
``complete`` is set only after every shard has been checked (its shape and the total count), and
:class:`FeatureStore` refuses a cache that is not complete. Shards are opened memory-mapped: a
worker reads only the rows it serves, and many workers share the page cache.

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
from captioner.data.images import ImageLoadError, load_image
from captioner.data.records import ImageRecord, blocks
from captioner.data.transforms import Preprocessing

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT = 1
DEFAULT_SHARD_SIZE = 1024
# Images per chunk of a running extraction: what a kill can lose (ResNet-101: 200 MB of features).
DEFAULT_CHUNK_SIZE = 256
# float16 keeps 3 significant digits, plenty for post-ReLU CNN features, and halves the disk and
# page-cache footprint: ResNet-101 at 14x14x2048 is 802,816 bytes per image.
DTYPE = np.float16


class FeatureCacheError(ValueError):
    """A feature cache that is missing, incomplete, inconsistent or lacks an image. A ValueError:
    the command line ends with its one line and exit status 2 (``fit`` given an incomplete cache)."""


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


def read_image(path: str | os.PathLike, preprocessing: Preprocessing) -> tuple[Tensor | None, str | None]:
    """(the preprocessed image (3, S, S), None), or (None, why the file could not be read)."""
    try:
        return preprocessing(load_image(path)), None
    except ImageLoadError as err:
        return None, err.reason
    except Exception as err:  # never let one file end the run
        return None, f"{type(err).__name__}: {err}"


def unique_records(splits: Mapping[str, Sequence[ImageRecord]]) -> list[ImageRecord]:
    """The images of ``splits``, each once, in order: the cache's rows."""
    records: list[ImageRecord] = []
    seen: set[int] = set()
    for recs in splits.values():
        for r in recs:
            if r.image_id not in seen:
                seen.add(r.image_id)
                records.append(r)
    if not records:
        raise FeatureCacheError("no images to extract (are the splits empty?)")
    return records


def probe(encoder: Callable[[Tensor], tuple[Tensor, tuple[int, int]]], records: Sequence[ImageRecord],
          preprocessing: Preprocessing, device: torch.device) -> tuple[tuple[int, int], int, int]:
    """The grid (h, w), regions N and feature size D of ``encoder``, from the first readable image."""
    for r in records:
        image, _ = read_image(r.path, preprocessing)
        if image is not None:
            with torch.inference_mode():
                features, grid = encoder(image.unsqueeze(0).to(device))  # (1, N, D)
            return tuple(grid), features.shape[1], features.shape[2]
    raise FeatureCacheError(f"none of the {len(records)} images could be read (the first: {records[0].path})")


class CachePlan:
    """What a cache in ``out`` is to hold: the index of a complete cache but for ``done`` and
    ``complete``. :meth:`check` compares it with a cache already there (read only, so every rank
    of a distributed extraction can call it); :meth:`start` writes the index."""

    def __init__(self, out: str | os.PathLike, splits: Mapping[str, Sequence[ImageRecord]],
                 records: Sequence[ImageRecord], grid: tuple[int, int], num_regions: int, dim: int,
                 preprocessing: Preprocessing, encoder_config: Mapping | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        self.out = Path(out)
        self.records = list(records)
        self.n, self.d, self.shard_size = num_regions, dim, shard_size
        self.settings = {
            "format": FORMAT,
            "dtype": np.dtype(DTYPE).name,
            "grid": list(grid),
            "num_regions": num_regions,
            "dim": dim,
            "shard_size": shard_size,
            "encoder": dict(encoder_config or {}),
            "preprocessing": preprocessing.to_dict(),
            "splits": {s: [r.image_id for r in recs] for s, recs in splits.items()},
        }
        self.shards = [{"file": _shard_name(i), "rows": min(shard_size, len(self.records) - s)}
                       for i, s in enumerate(range(0, len(self.records), shard_size))]

    @property
    def index_path(self) -> Path:
        return self.out / INDEX_FILE

    def _old_index(self) -> dict | None:
        return json.loads(self.index_path.read_text()) if self.index_path.exists() else None

    def differs(self, old: dict | None = None) -> list[str]:
        """The settings in which the cache already in ``out`` (its index ``old``, read when not
        given) differs from this plan (none: no cache there, or the same)."""
        old = self._old_index() if old is None else old
        if old is None:
            return []
        diff = sorted(k for k, v in self.settings.items() if old.get(k) != v)
        return diff or (["shards"] if old.get("shards") != self.shards else [])

    def check(self, overwrite: bool = False) -> set[int]:
        """The shards of an earlier run of the same plan that are written and whole (read only:
        every rank of a distributed extraction may call it). A folder that holds a different
        cache -> FeatureCacheError, unless ``overwrite``: then none (it will be replaced)."""
        old = self._old_index()  # read once: it holds every image's row (megabytes for COCO)
        diff = self.differs(old)
        if diff and not overwrite:
            raise FeatureCacheError(
                f"{self.out} holds a different feature cache (differs in: {', '.join(diff)}); "
                "choose another folder or pass overwrite (--overwrite) to replace it")
        if diff or old is None:
            return set()
        return {i for i in old.get("done", []) if self.shard_ok(i)}

    def shard_ok(self, i: int) -> bool:
        return _shard_ok(self.out / self.shards[i]["file"], self.shards[i]["rows"], self.n, self.d)

    def shard_positions(self, i: int) -> range:
        return range(i * self.shard_size, i * self.shard_size + self.shards[i]["rows"])

    def index(self, done: set[int]) -> dict:
        return {
            **self.settings,
            "complete": False,
            "counts": {**{s: len(ids) for s, ids in self.settings["splits"].items()}, "images": len(self.records)},
            "bytes_per_image": bytes_per_image(self.n, self.d),
            "shards": self.shards,
            "done": sorted(done),
            "index": {str(r.image_id): [i // self.shard_size, i % self.shard_size]
                      for i, r in enumerate(self.records)},
        }

    def todo(self, done_shards: set[int], chunks: FeatureChunks | None) -> list[int]:
        """The positions (rows of ``records``) neither in a written shard nor in a chunk."""
        have = {i for s in done_shards for i in self.shard_positions(s)}
        if chunks is not None:
            have |= chunks.done()
        return [i for i in range(len(self.records)) if i not in have]


class FeatureChunks:
    """The features extracted so far, in ``<out>/parts/``, before they are merged into shards:
    ``chunk-<first position>-<images>.npy`` (float16 (k, N, D), the rows of the readable images)
    and beside it, written after it, ``.json`` with their positions and the unreadable ones
    (position -> why). A chunk counts once its ``.json`` is there. Every rank of a distributed
    extraction writes chunks of its own; :meth:`merge` (rank 0, at the end) writes the shards."""

    def __init__(self, plan: CachePlan) -> None:
        self.plan = plan
        self.folder = plan.out / "parts"
        self.failed: dict[int, str] = {}  # after merge: the positions no chunk has features of

    def start(self, fresh: bool) -> None:
        """Write the index (with the shards an earlier run wrote, unless ``fresh``) and clear
        the chunks of an earlier run if ``fresh`` (a different cache being replaced)."""
        import shutil

        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        done = set() if fresh else self.plan.check()
        atomic_write_json(self.plan.index_path, self.plan.index(done))

    def _chunks(self) -> list[tuple[Path, dict]]:
        out = []
        for meta in sorted(self.folder.glob("chunk-*.json")):
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue  # not there any more (merged) or not ours
            out.append((meta.with_suffix(".npy"), info))
        return out

    def done(self) -> set[int]:
        return {i for _, info in self._chunks() for i in info["positions"]}

    def written(self) -> int:
        return sum(int(p.stem.rsplit("-", 1)[1]) for p in self.folder.glob("chunk-*.json"))

    def write(self, rank: int, results: list[tuple[int, object, str | None]]) -> None:
        good = [(i, x) for i, x, e in results if e is None]
        name = f"chunk-{min(i for i, _, _ in results):09d}-{len(results):06d}"
        rows = (np.stack([x for _, x in good]) if good
                else np.empty((0, self.plan.n, self.plan.d), dtype=DTYPE))
        atomic_write(self.folder / f"{name}.npy", lambda f: np.save(f, rows))
        meta = {"positions": [i for i, _ in good], "failed": {str(i): e for i, _, e in results if e is not None}}
        atomic_write_json(self.folder / f"{name}.json", meta)  # the chunk counts from now on

    def merge(self) -> dict:
        """Every shard whose images are all extracted -> written (each atomically, the index
        updated after each); the chunks go once every shard is written and checked. Returns the
        index; ``failed`` holds the images that kept it from being complete."""
        import shutil

        plan = self.plan
        done = plan.check()
        where: dict[int, tuple[Path, int]] = {}
        self.failed = {}
        for npy, info in self._chunks():
            for row, i in enumerate(info["positions"]):
                where[i] = (npy, row)
            self.failed.update({int(k): v for k, v in info["failed"].items()})
        self.failed = {i: e for i, e in self.failed.items() if i not in where}
        index = plan.index(done)
        maps: dict[Path, np.ndarray] = {}
        for s in range(len(plan.shards)):
            positions = plan.shard_positions(s)
            if s in done or not all(i in where for i in positions):
                continue
            buf = np.empty((len(positions), plan.n, plan.d), dtype=DTYPE)
            for k, i in enumerate(positions):
                npy, row = where[i]
                if npy not in maps:
                    maps[npy] = np.load(npy, mmap_mode="r")
                buf[k] = maps[npy][row]
            atomic_write(plan.out / plan.shards[s]["file"], lambda f: np.save(f, buf))  # noqa: B023 (called at once)
            done.add(s)
            index["done"] = sorted(done)
            atomic_write_json(plan.index_path, index)
            logger.info("shard %d/%d written (%d images)", len(done), len(plan.shards), len(positions))
        maps.clear()
        if len(done) < len(plan.shards):
            missing = sum(len(plan.shard_positions(s)) for s in range(len(plan.shards)) if s not in done)
            logger.warning("%s: %d of %d shards written; %d images in the others lack features",
                           plan.out, len(done), len(plan.shards), missing)
            return index
        # Verify before declaring the cache usable: every shard present, with the planned shape.
        bad = [s["file"] for i, s in enumerate(plan.shards) if not plan.shard_ok(i)]
        total = sum(s["rows"] for s in plan.shards)
        if bad or total != len(plan.records) or len(index["index"]) != len(plan.records):
            raise FeatureCacheError(f"{plan.out}: verification failed (bad shards: {bad or 'none'}, "
                                    f"{total} rows for {len(plan.records)} images)")
        index["complete"] = True
        atomic_write_json(plan.index_path, index)
        shutil.rmtree(self.folder, ignore_errors=True)
        logger.info("feature cache %s complete: %d images, %d shards, %s bytes per image",
                    plan.out, len(plan.records), len(plan.shards), f"{index['bytes_per_image']:,}")
        return index


def encode(encoder: Callable[[Tensor], tuple[Tensor, tuple[int, int]]], images: Tensor) -> np.ndarray:
    """images (B, 3, S, S) -> float16 features (B, N, D) on the CPU; FeatureCacheError when they
    do not fit float16."""
    with torch.inference_mode():
        feats, _ = encoder(images)  # (B, N, D)
    half = feats.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise FeatureCacheError(
            f"encoder features exceed the float16 range (max |x| = {feats.abs().max().item():.3g}); "
            "is the encoder's preprocessing right?")
    return half.cpu().numpy()


class _Images(Dataset):
    def __init__(self, records: Sequence[ImageRecord], preprocessing: Preprocessing) -> None:
        self.records = records
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        return (i, *read_image(self.records[i].path, self.preprocessing))


def _as_list(items):
    return items


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
    """Encode every image of ``splits`` once in this process and write the cache to ``out_dir``;
    returns the index (``captioner features extract`` does the same on many processes).

    ``encoder`` must be frozen (features of a training encoder go stale); it is put in eval mode.
    The features are kept every ``chunk_size`` images, so re-running with the same arguments
    resumes: what was extracted is kept. A folder that holds a different cache is refused unless
    ``overwrite`` (which replaces only a different cache: the same one is resumed). Unreadable images are logged by path and left out; the cache is then not
    complete (the index says which shards are written) until they are mended and it is run again.
    """
    records = unique_records(splits)
    device = torch.device(device)
    encoder.eval().to(device)
    grid, n, d = probe(encoder, records, preprocessing, device)
    plan = CachePlan(out_dir, splits, records, grid, n, d, preprocessing, encoder_config, shard_size)
    fresh = bool(plan.differs())  # with overwrite; without, check refuses it
    done = plan.check(overwrite)
    chunks = FeatureChunks(plan)
    chunks.start(fresh)
    todo = plan.todo(done, chunks)
    if len(todo) < len(records):
        logger.info("resuming %s: %d of %d images already extracted", plan.out, len(records) - len(todo),
                    len(records))
    # batches of consecutive rows, as the distributed extraction makes them
    loader = DataLoader(_Images(records, preprocessing), batch_sampler=blocks(todo, batch_size),
                        num_workers=num_workers, collate_fn=_as_list)
    pending: list = []
    for items in loader:
        good = [(i, x) for i, x, e in items if e is None]
        feats = encode(encoder, torch.stack([x for _, x in good]).to(device)) if good else []
        rows = dict(zip([i for i, _ in good], feats))
        for i, _x, e in items:
            if e is not None:
                logger.warning("%s: %s", records[i].path, e)
            pending.append((i, rows.get(i), e))
        if len(pending) >= chunk_size:
            chunks.write(0, pending)
            pending = []
    if pending:
        chunks.write(0, pending)
    index = chunks.merge()
    if chunks.failed:
        raise FeatureCacheError(unreadable(chunks.failed, records))
    return index


def unreadable(failed: Mapping[int, str], records: Sequence[ImageRecord]) -> str:
    """The message of an extraction that could not read some images."""
    first = min(failed)
    return (f"{len(failed)} image(s) could not be read (the first: {records[first].path}: {failed[first]}); "
            "the cache is not complete: mend or replace them and run the same command again "
            "(only they are left to do)")


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
