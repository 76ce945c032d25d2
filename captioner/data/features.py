"""A cache of region features on disk, so that a frozen encoder runs once per image, not per epoch.

Layout of a cache folder::

    index.json            what was extracted, from what, and how (see below)
    shard-00000.npy       float16 (S, N, D): the region features of S images, in index order
    shard-00001.npy       ...
    scale-00000.npy       int8 caches only: float32 (S, D), each image's scale per channel
    parts/                while an extraction runs: which rows are written (see below)

``index.json`` holds ``format``, ``complete``, ``dtype``, ``grid`` (h, w), ``num_regions`` (N),
``dim`` (D), ``shard_size`` (S); what the features were made from: ``encoder`` (the settings
that shape them and ``weights``, the sha256 of the encoder's tensors), ``preprocessing`` (resize
and normalisation) and ``images`` (the sha256 of the image list: every id with its path);
``splits`` (split -> image ids), ``counts`` (split -> number of images, plus ``images``: the
distinct ones), ``shards`` (file and rows of each), ``done`` (the shards known whole),
``index`` (image id -> [shard, row]) and ``paths`` (image id -> its path under ``image_root``,
the folder all the images share). :meth:`FeatureStore.check` compares all of it with what a
run asks for before it trains.

An extraction needs no more disk than the finished cache: the first process makes every shard
file at its final size (reserved with ``posix_fallocate`` where the file system has it, so a
disk that is too small fails at once), and each process writes its features straight into
their rows, every few hundred images flushed to disk and then recorded in a small
``parts/chunk-<first position>-<images>.json`` (:class:`FeatureChunks`). A row counts only once
its chunk's record is there, so an interrupted extraction is resumed by running it again: the
recorded images are skipped. ``complete`` is set only after every shard has been checked (its
shape, and every row recorded), and :class:`FeatureStore` refuses a cache that is not complete.
Shards are opened memory-mapped: a worker reads only the rows it serves, and many workers share
the page cache.

``dtype`` (:data:`CODECS`) is how the features are stored: ``float16``, or ``int8`` (half the
disk): symmetric int8 with one float32 scale per image and channel, the channel's largest
magnitude over the image's regions / 127, kept in ``scale-<shard>.npy`` beside each shard and
written with its rows. :meth:`FeatureStore.get` returns float features either way.

The encoder is passed in (any module mapping images (B, 3, S, S) to ((B, N, D), (h, w))), so this
module does not depend on ``captioner.models``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captioner.data.chunks import ChunkFolder
from captioner.data.fingerprint import differences, sha256_json
from captioner.data.images import read_image
from captioner.data.records import ImageRecord, blocks
from captioner.data.transforms import Preprocessing
from captioner.files import DiskFullError, atomic_write_json, free_bytes

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
# 2: the index records what the features were made from (weights, image list) and the shards are
# filled in place (no merge at the end); a cache of format 1 is extracted again.
FORMAT = 2
DEFAULT_SHARD_SIZE = 1024
# Images per chunk of a running extraction: what a kill can lose (ResNet-101: 200 MB of features).
DEFAULT_CHUNK_SIZE = 256


class FeatureCacheError(ValueError):
    """A feature cache that is missing, incomplete, inconsistent, lacks an image, or was made
    from other settings, weights or images than a run asks for (a user's error: exit 2)."""


class Codec:
    """How a cache stores an image's features (N, D): the arrays of one image (``parts``: file
    prefix -> shape of a row and its dtype, one file per part and shard), made from a batch of
    encoder output (:meth:`pack`) and turned back into floats (:meth:`unpack`)."""

    name: str

    def parts(self, n: int, d: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        raise NotImplementedError

    def pack(self, feats: Tensor) -> list[tuple[np.ndarray, ...]]:
        """feats (B, N, D) on any device -> per image, one array per part (on the CPU)."""
        raise NotImplementedError

    def unpack(self, rows: tuple[np.ndarray, ...]) -> Tensor:
        """One image's arrays -> its features (N, D) as a float Tensor."""
        raise NotImplementedError

    def item(self, rows: tuple[np.ndarray, ...]) -> dict[str, Tensor]:
        """One image's arrays as a training item carries them (:func:`batch_features` of a
        collated batch makes them float features on the device)."""
        raise NotImplementedError


CODECS: dict[str, Codec] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls()
    return cls


def _half(feats: Tensor) -> Tensor:
    half = feats.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise FeatureCacheError(
            f"encoder features exceed the float16 range (max |x| = {feats.abs().max().item():.3g}); "
            "is the encoder's preprocessing right?")
    return half


@register_codec
class Float16(Codec):
    """float16 keeps 3 significant digits, plenty for post-ReLU CNN features: ResNet-101 at
    14x14x2048 is 802,816 bytes per image."""

    name = "float16"

    def parts(self, n: int, d: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"shard": ((n, d), np.dtype(np.float16))}

    def pack(self, feats: Tensor) -> list[tuple[np.ndarray, ...]]:
        return [(row,) for row in _half(feats).cpu().numpy()]

    def unpack(self, rows: tuple[np.ndarray, ...]) -> Tensor:
        return torch.from_numpy(np.array(rows[0]))  # a copy: the map is read-only

    def item(self, rows: tuple[np.ndarray, ...]) -> dict[str, Tensor]:
        return {"features": self.unpack(rows)}


@register_codec
class Int8(Codec):
    """Symmetric int8, one scale per (image, channel): x ~ q * s, s = max_n |x[n, d]| / 127, so
    every value is within s / 2 of the original. Per channel because a CNN's channels differ in
    range by orders of magnitude (one scale per region would give the quiet channels a few levels);
    per image because a scale for the whole data set would need a pass over it before the first
    row is written. The scales cost D float32 (8 KB at D = 2048, 2 % of the int8 rows)."""

    name = "int8"

    def parts(self, n: int, d: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"shard": ((n, d), np.dtype(np.int8)), "scale": ((d,), np.dtype(np.float32))}

    def pack(self, feats: Tensor) -> list[tuple[np.ndarray, ...]]:
        q, scale = quantize(_half(feats).float())  # the float16 range check of the other codec
        return list(zip(q.cpu().numpy(), scale.cpu().numpy()))

    def unpack(self, rows: tuple[np.ndarray, ...]) -> Tensor:
        return batch_features(self.item(rows))

    def item(self, rows: tuple[np.ndarray, ...]) -> dict[str, Tensor]:
        # int8 to the device (half fp16's bytes), dequantised there: the loader's work is a copy
        q, scale = rows
        return {"features": torch.from_numpy(np.array(q)), "feature_scales": torch.from_numpy(np.array(scale))}


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, N, D) float -> (int8 (B, N, D), float32 scales (B, D)), |x - q * s| <= s / 2."""
    scale = x.abs().amax(dim=1).float() / 127  # (B, D)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: q = 0
    q = torch.round(x.float() / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)  # (B, N, D)
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """int8 (..., N, D) and scales (..., D) -> float32 (..., N, D)."""
    return q.float() * scale.unsqueeze(-2)


def batch_features(batch: Mapping[str, Tensor]) -> Tensor:
    """The float features (..., N, D) of an item or a collated batch of a feature cache: int8
    ones (with ``feature_scales``) dequantised, float16 ones as they are."""
    if "feature_scales" in batch:
        return dequantize(batch["features"], batch["feature_scales"])
    return batch["features"]


def codec(dtype: str) -> Codec:
    try:
        return CODECS[dtype]
    except KeyError:
        raise FeatureCacheError(f"feature cache dtype {dtype!r}: this captioner stores {', '.join(CODECS)}") from None


def bytes_per_image(num_regions: int, dim: int, dtype: str = "float16") -> int:
    """Disk per image of a cache of ``dtype``, its scales included."""
    return sum(int(np.prod(shape)) * t.itemsize for shape, t in codec(dtype).parts(num_regions, dim).values())


def weights_sha256(module: torch.nn.Module) -> str:
    """The sha256 of a module's state (its tensors' dtypes, shapes and bytes, in order, each shared
    tensor once): which weights made a set of features. Names are left out, so a wrapper hashes as
    what it wraps. ResNet-101's 170 MB take under a second."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for t in module.state_dict(keep_vars=True).values():
        if id(t) in seen:  # a module registered twice (a torchvision encoder's frozen blocks)
            continue
        seen.add(id(t))
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def image_paths(records: Sequence[ImageRecord]) -> tuple[str, dict[str, str]]:
    """The folder all of ``records``' images share and each id's path below it ('/'-separated):
    what a cache records, so that a data set whose ids now name other files is refused, while
    the same files in a moved folder are not."""
    try:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(r.path)) for r in records])
    except ValueError:  # paths on different drives
        root = ""
    return root, {str(r.image_id): (os.path.relpath(os.path.abspath(r.path), root) if root
                                    else os.path.abspath(r.path)).replace(os.sep, "/") for r in records}


# the key of a shard's entry in the index that names the file of each part
_ENTRY_KEYS = {"shard": "file", "scale": "scales"}


def _shard_entry(codec: Codec, i: int, rows: int) -> dict:
    """A shard's entry in the index: its files (``shard-<i>.npy`` and, for int8,
    ``scale-<i>.npy``) and rows; a float16 cache's entries are those of earlier releases."""
    return {**{_ENTRY_KEYS[part]: f"{part}-{i:05d}.npy" for part in codec.parts(1, 1)}, "rows": rows}


def _open_shard(path: Path) -> np.memmap | None:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None


def _shard_ok(path: Path, rows: int, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    arr = _open_shard(path)
    return arr is not None and arr.shape == (rows, *shape) and arr.dtype == dtype


def _make_shard(path: Path, rows: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """An .npy file of (rows, *shape) ``dtype`` at its final size, its rows to be filled in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *shape))
    size = arr.offset + arr.nbytes
    del arr
    fd = os.open(tmp, os.O_RDWR)
    try:
        _reserve(fd, size, path)
        os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _reserve(fd: int, size: int, path: Path) -> None:
    """Reserve a file's blocks, so that a disk too small for the cache fails at once, not hours
    later. Without ``posix_fallocate`` (macOS, Windows) or a file system that cannot (EOPNOTSUPP)
    the file stays sparse and fills as it is written."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path, size, free_bytes(path.parent)) from None


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


# The fields of an index that say what a cache was made from, in the order messages name them,
# then those that follow from them (named only when none of the first differs).
_CAUSES = ("format", "encoder", "preprocessing", "images", "splits", "shard_size", "dtype")
_EFFECTS = ("grid", "num_regions", "dim")


class CachePlan:
    """What a cache in ``out`` is to hold: the index of a complete cache but for ``done`` and
    ``complete``. :meth:`check` compares it with a cache already there (read only, so every rank
    of a distributed extraction can call it); :class:`FeatureChunks` writes it.

    ``encoder_config``: what decides the encoder's features (``captioner.models.encoder_fingerprint``:
    its name, the settings that shape them and ``weights``, the sha256 of its tensors)."""

    def __init__(self, out: str | os.PathLike, splits: Mapping[str, Sequence[ImageRecord]],
                 records: Sequence[ImageRecord], grid: tuple[int, int], num_regions: int, dim: int,
                 preprocessing: Preprocessing, encoder_config: Mapping | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float16") -> None:
        self.out = Path(out)
        self.records = list(records)
        self.n, self.d, self.shard_size = num_regions, dim, shard_size
        self.codec = codec(dtype)
        self.parts = self.codec.parts(num_regions, dim)
        self.image_root, self.paths = image_paths(self.records)
        self.settings = {
            "format": FORMAT,
            "dtype": self.codec.name,
            "grid": list(grid),
            "num_regions": num_regions,
            "dim": dim,
            "shard_size": shard_size,
            "encoder": dict(encoder_config or {}),
            "preprocessing": preprocessing.to_dict(),
            # the image list: a re-converted split file whose ids name other files differs here
            "images": sha256_json(self.paths),
            "splits": {s: [r.image_id for r in recs] for s, recs in splits.items()},
        }
        self.shards = [_shard_entry(self.codec, i, min(shard_size, len(self.records) - s))
                       for i, s in enumerate(range(0, len(self.records), shard_size))]

    @property
    def index_path(self) -> Path:
        return self.out / INDEX_FILE

    def _old_index(self) -> dict | None:
        try:
            return json.loads(self.index_path.read_text()) if self.index_path.exists() else None
        except ValueError:
            return {}  # not a cache's index: a different folder's file

    def differs(self, old: dict | None = None) -> list[str]:
        """How the cache already in ``out`` (its index ``old``, read when not given) differs from
        this plan: ``field cache's vs planned`` for each field (none: no cache there, or the same)."""
        old = self._old_index() if old is None else old
        if old is None:
            return []
        if old.get("format") != FORMAT:
            return differences(old, self.settings, ["format"])
        diff = differences(old, self.settings, _CAUSES)
        diff = diff or differences(old, self.settings, _EFFECTS)
        return diff or (["shards"] if old.get("shards") != self.shards else [])

    def check(self, overwrite: bool = False) -> set[int]:
        """The shards of an earlier run of the same plan known whole (read only: every rank of a
        distributed extraction may call it). A folder that holds a different cache ->
        FeatureCacheError naming each field that differs, unless ``overwrite``: then none (it
        will be replaced)."""
        old = self._old_index()  # read once: it holds every image's row (megabytes for COCO)
        diff = self.differs(old)
        if diff and not overwrite:
            raise FeatureCacheError(
                f"{self.out}: the feature cache there was made from something else (the cache's vs now: "
                f"{', '.join(diff)}); extract into another folder, or pass overwrite (--overwrite) to replace it")
        if diff or old is None:
            return set()
        return {i for i in old.get("done", []) if self.shard_ok(i)}

    def shard_path(self, i: int, part: str = "shard") -> Path:
        return self.out / self.shards[i][_ENTRY_KEYS[part]]

    def shard_ok(self, i: int) -> bool:
        return all(_shard_ok(self.shard_path(i, part), self.shards[i]["rows"], shape, dtype)
                   for part, (shape, dtype) in self.parts.items())

    def make_shard(self, i: int) -> None:
        for part, (shape, dtype) in self.parts.items():
            _make_shard(self.shard_path(i, part), self.shards[i]["rows"], shape, dtype)

    def shard_positions(self, i: int) -> range:
        return range(i * self.shard_size, i * self.shard_size + self.shards[i]["rows"])

    def index(self, done: set[int]) -> dict:
        return {
            **self.settings,
            "complete": False,
            "counts": {**{s: len(ids) for s, ids in self.settings["splits"].items()}, "images": len(self.records)},
            "bytes_per_image": bytes_per_image(self.n, self.d, self.codec.name),
            "shards": self.shards,
            "done": sorted(done),
            "index": {str(r.image_id): [i // self.shard_size, i % self.shard_size]
                      for i, r in enumerate(self.records)},
            "image_root": self.image_root,
            "paths": self.paths,
        }

    def todo(self, done_shards: set[int], chunks: FeatureChunks | None) -> list[int]:
        """The positions (rows of ``records``) neither in a finished shard nor in a chunk."""
        have = {i for s in done_shards for i in self.shard_positions(s)}
        if chunks is not None:
            have |= chunks.done()
        return [i for i in range(len(self.records)) if i not in have]


class FeatureChunks:
    """The rows written so far. The first process makes the shard files at their final size
    (:meth:`start`); every process then writes its features straight into their rows, flushes
    them to disk and records them in ``<out>/parts/chunk-<first position>-<images>.json``
    (their positions, and the unreadable ones: position -> why). A row counts once its record
    is there; :meth:`merge` (the first process, at the end) checks that every row is recorded
    and marks the cache complete. The disk never holds more than the finished cache."""

    def __init__(self, plan: CachePlan) -> None:
        self.plan = plan
        self.chunks = ChunkFolder(plan.out / "parts", "json")
        self.folder = self.chunks.folder
        self.failed: dict[int, str] = {}  # after merge: the positions no chunk has features of

    def start(self, fresh: bool) -> None:
        """Write the index (with the shards an earlier run finished, unless ``fresh``: a
        different cache being replaced, whose records go) and make every shard file that is not
        there whole, forgetting the records of rows in a shard file made anew."""
        plan = self.plan
        self.chunks.start(fresh)
        done = set() if fresh else plan.check()
        atomic_write_json(plan.index_path, plan.index(done))
        if fresh:  # shards of the replaced cache beyond this one's
            planned = {s[key] for s in plan.shards for key in _ENTRY_KEYS.values() if key in s}
            for part in _ENTRY_KEYS:
                for old in plan.out.glob(f"{part}-*.npy"):
                    if old.name not in planned:
                        old.unlink()
        made: set[int] = set()  # the rows of shard files made anew: their records go, in one pass
        for i in range(len(plan.shards)):
            if i not in done and (fresh or not plan.shard_ok(i)):
                plan.make_shard(i)
                made.update(plan.shard_positions(i))
        if made:
            self._forget(made)

    def _chunks(self) -> list[tuple[Path, dict]]:
        out = []
        for meta in self.chunks.files():
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue  # not there any more (finished) or not ours
            out.append((meta, info))
        return out

    def _forget(self, positions: set[int]) -> None:
        for meta, info in self._chunks():
            kept = [i for i in info["positions"] if i not in positions]
            failed = {k: v for k, v in info["failed"].items() if int(k) not in positions}
            if len(kept) < len(info["positions"]) or len(failed) < len(info["failed"]):
                atomic_write_json(meta, {"positions": kept, "failed": failed})

    def done(self) -> set[int]:
        """The positions whose rows are written and recorded (in shard files that are there)."""
        plan = self.plan
        have = {i for _, info in self._chunks() for i in info["positions"]}
        ok = {s for s in {i // plan.shard_size for i in have} if plan.shard_ok(s)}
        return {i for i in have if i // plan.shard_size in ok}

    def written(self) -> int:
        return self.chunks.written()

    def write(self, rank: int, results: list[tuple[int, object, str | None]]) -> None:
        """Write the features of ``results`` (per image, the arrays of :meth:`Codec.pack`) into
        their rows, flush them to disk, then record them (the record last: a row counts only once
        it is on disk)."""
        plan = self.plan
        files: dict[tuple[int, str], tuple[object, int]] = {}
        try:
            for i, x, error in results:
                if error is not None:
                    continue
                s, row = divmod(i, plan.shard_size)
                for (part, (shape, dtype)), value in zip(plan.parts.items(), x, strict=True):
                    if (s, part) not in files:
                        files[s, part] = self._open(plan.shard_path(s, part))
                    f, offset = files[s, part]
                    rows = np.ascontiguousarray(value, dtype=dtype)
                    assert rows.shape == shape, f"{part} {rows.shape} for a {shape} cache"
                    f.seek(offset + row * rows.nbytes)
                    f.write(memoryview(rows).cast("B"))
            for f, _ in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f, _ in files.values():
                f.close()
        meta = {"positions": [i for i, _, e in results if e is None],
                "failed": {str(i): e for i, _, e in results if e is not None}}
        # the rows count from now on
        atomic_write_json(self.chunks.path(min(i for i, _, _ in results), len(results)), meta)

    @staticmethod
    def _open(path: Path) -> tuple[object, int]:
        """A shard file opened for writing in place, and where its rows begin."""
        shard = _open_shard(path)
        if shard is None:
            raise FeatureCacheError(f"{path}: shard file missing (removed while the extraction ran?); "
                                    "run the same command again")
        offset = shard.offset
        del shard
        return open(path, "r+b"), offset  # noqa: SIM115 (closed by write)

    def merge(self) -> dict:
        """Mark every shard whose rows are all recorded as done, then check the cache and mark it
        complete (the records go). Returns the index; ``failed`` holds the images that kept it
        from being complete."""
        plan = self.plan
        done = plan.check()
        have: set[int] = set()
        self.failed = {}
        for _, info in self._chunks():
            have.update(info["positions"])
            self.failed.update({int(k): v for k, v in info["failed"].items()})
        self.failed = {i: e for i, e in self.failed.items() if i not in have}
        done |= {s for s in range(len(plan.shards))
                 if all(i in have for i in plan.shard_positions(s)) and plan.shard_ok(s)}
        index = plan.index(done)
        atomic_write_json(plan.index_path, index)
        if len(done) < len(plan.shards):
            missing = sum(len(plan.shard_positions(s)) for s in range(len(plan.shards)) if s not in done)
            logger.warning("%s: %d of %d shards finished; %d images in the others lack features",
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
        self.chunks.remove()
        logger.info("feature cache %s complete: %d images, %d shards, %s bytes per image",
                    plan.out, len(plan.records), len(plan.shards), f"{index['bytes_per_image']:,}")
        return index


def encode(encoder: Callable[[Tensor], tuple[Tensor, tuple[int, int]]], images: Tensor,
           dtype: str = "float16") -> list[tuple[np.ndarray, ...]]:
    """images (B, 3, S, S) -> per image, its features stored as ``dtype`` (:meth:`Codec.pack`,
    quantised on the encoder's device) on the CPU; FeatureCacheError when they do not fit float16."""
    with torch.inference_mode():
        feats, _ = encoder(images)  # (B, N, D)
        return codec(dtype).pack(feats)


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
    dtype: str = "float16",
) -> dict:
    """Encode every image of ``splits`` once in this process and write the cache to ``out_dir``;
    returns the index (``captioner features extract`` does the same on many processes).

    ``encoder`` must be frozen (features of a training encoder go stale); it is put in eval mode.
    ``encoder_config``: what decides its features (``captioner.models.encoder_fingerprint``); the
    sha256 of ``encoder``'s tensors is added as ``weights`` when it has none.
    The features are kept every ``chunk_size`` images, so re-running with the same arguments
    resumes: what was extracted is kept. ``dtype``: how the features are stored (:data:`CODECS`:
    float16, or int8 at half the disk). A folder that holds a different cache is refused unless
    ``overwrite`` (which replaces only a different cache: the same one is resumed). Unreadable
    images are logged by path and left out; the cache is then not complete (the index says which
    shards are finished) until they are mended and it is run again.
    """
    records = unique_records(splits)
    device = torch.device(device)
    encoder_config = dict(encoder_config or {})
    if "weights" not in encoder_config and isinstance(encoder, torch.nn.Module):
        encoder_config["weights"] = weights_sha256(encoder)
    encoder.eval().to(device)
    grid, n, d = probe(encoder, records, preprocessing, device)
    plan = CachePlan(out_dir, splits, records, grid, n, d, preprocessing, encoder_config, shard_size, dtype)
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
        feats = encode(encoder, torch.stack([x for _, x in good]).to(device), dtype) if good else []
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


def _same_file(path: str | os.PathLike, recorded: str) -> bool:
    """Whether ``path`` is the file recorded (relative to the cache's image root) as ``recorded``,
    wherever the data folder is now."""
    here = os.path.abspath(path).replace(os.sep, "/")
    return here == recorded or here.endswith("/" + recorded)


class FeatureStore:
    """Read access to a complete cache: ``get(image_id)`` -> float Tensor (N, D) (float16 from a
    float16 cache, float32 dequantised from an int8 one)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FeatureCacheError(f"{self.path}: no feature cache here (no {INDEX_FILE}); "
                                    "make one with `captioner features extract --config CFG --out DIR`")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise FeatureCacheError(
                f"{self.path}: feature cache format {index.get('format')!r}, made by an earlier captioner "
                f"(this one reads format {FORMAT}, which records what the features were made from); "
                "extract it again: `captioner features extract --config CFG --out DIR` into another folder")
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
        self.paths: dict[str, str] = index["paths"]
        self.splits: dict[str, list[int]] = index["splits"]
        self.counts: dict[str, int] = index["counts"]
        self.dtype: str = index.get("dtype", "float16")
        try:
            self._codec = codec(self.dtype)
        except FeatureCacheError as err:
            raise FeatureCacheError(f"{self.path}: {err} (made by a newer captioner? upgrade it)") from None
        parts = self._codec.parts(self.num_regions, self.dim)
        self._files = [tuple(s[_ENTRY_KEYS[part]] for part in parts) for s in index["shards"]]
        self._where = {int(k): (v[0], v[1]) for k, v in index["index"].items()}
        self._shards: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._where

    def check(self, encoder: Mapping | None, preprocessing: Preprocessing | None,
              records: Sequence[ImageRecord]) -> None:
        """Refuse (FeatureCacheError, one line naming each difference) to serve ``records`` with
        features made by another encoder (``encoder``: its fingerprint, as the cache records it;
        only its fields are compared), other ``preprocessing``, or for ids that now name other
        image files (a re-converted split file) or that the cache lacks. None: not compared."""
        problems = []
        diff = differences(self.encoder, encoder) if encoder is not None else []
        if preprocessing is not None:
            # as read today: a field an older cache lacks is what it was made with (from_dict)
            diff += differences(self.preprocessing.to_dict(), preprocessing.to_dict())
        if diff:
            problems.append(f"it was made with another encoder (the cache's vs this run's): {', '.join(diff)}")
        missing = [r for r in records if int(r.image_id) not in self._where]
        moved = [r for r in records if int(r.image_id) in self._where
                 and not _same_file(r.path, self.paths[str(r.image_id)])]
        if moved:
            r = moved[0]
            problems.append(f"{len(moved)} image id(s) name other files than when it was made (image "
                            f"{r.image_id}: {self.paths[str(r.image_id)]} then, {r.path} now)")
        if missing:
            r = missing[0]
            problems.append(f"{len(missing)} image(s) are not in it (the first: image {r.image_id}, {r.path}; "
                            f"it holds the splits {', '.join(self.splits)})")
        if problems:
            raise FeatureCacheError(f"{self.path}: the feature cache does not match this run: "
                                    f"{'; '.join(problems)}; extract a new cache into another folder")

    def _shard(self, i: int) -> tuple[np.ndarray, ...]:
        arrs = self._shards.get(i)
        if arrs is None:
            arrs = self._shards[i] = tuple(np.load(self.path / f, mmap_mode="r") for f in self._files[i])
        return arrs

    def get(self, image_id: int) -> Tensor:
        """The region features (N, D) of one image, as floats."""
        return self._codec.unpack(self._rows(image_id))

    def item(self, image_id: int) -> dict[str, Tensor]:
        """The features of one image as a training batch carries them: ``features`` (N, D),
        float16 or int8, and for int8 ``feature_scales`` (D,) (:func:`batch_features`)."""
        return self._codec.item(self._rows(image_id))

    def _rows(self, image_id: int) -> tuple[np.ndarray, ...]:
        try:
            shard, row = self._where[int(image_id)]
        except KeyError:
            raise FeatureCacheError(
                f"image {image_id} is not in the feature cache {self.path} (it holds the splits "
                f"{', '.join(self.splits)}); extract the missing split(s) into a new folder") from None
        return tuple(arr[row] for arr in self._shard(shard))

    def __getstate__(self) -> dict:
        # DataLoader workers get the index, not the maps (pickling a memmap copies its data).
        state = dict(self.__dict__)
        state["_shards"] = {}
        state["paths"] = {}  # checked before training (check); workers only read rows
        return state
