"""``captioner data check``: count a data set, size its vocabulary and find every broken file.

The CLI is a thin wrapper: it calls ``run_data_check``, prints ``format_text()`` or ``to_json()``,
and exits 1 when ``problems`` is not empty.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from captioner.data.coco import read_coco_annotations
from captioner.data.images import ImageLoadError, load_image
from captioner.data.karpathy import read_karpathy
from captioner.data.records import SPLITS, ImageRecord
from captioner.data.vocab import Vocabulary

logger = logging.getLogger(__name__)

# Decoding is mostly I/O and C code that releases the GIL, so a few threads give most of the speed-up.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class CheckReport:
    """What ``check_dataset`` found. ``problems`` holds ``{"path", "error"}`` dicts in a fixed order."""

    splits: dict[str, dict[str, int]]
    vocab_size: int
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "splits": {k: dict(v) for k, v in self.splits.items()},
            "vocab_size": self.vocab_size,
            "problems": [dict(p) for p in self.problems],
        }

    def format_text(self) -> str:
        rows = [(name, str(c["images"]), str(c["captions"])) for name, c in self.splits.items()]
        rows.append((
            "total",
            str(sum(c["images"] for c in self.splits.values())),
            str(sum(c["captions"] for c in self.splits.values())),
        ))
        header = ("split", "images", "captions")
        w = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines = [f"{header[0]:<{w[0]}}  {header[1]:>{w[1]}}  {header[2]:>{w[2]}}"]
        lines += [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
        lines.append(f"vocabulary size: {self.vocab_size} (from the train split, with 4 specials)")
        if not self.problems:
            lines.append("no problems found")
        else:
            n = len(self.problems)
            lines.append(f"{n} problem{'s' if n != 1 else ''}:")
            lines += [f"  {p['path']}: {p['error']}" for p in self.problems]
        return "\n".join(lines)


def check_dataset(
    records_by_split: Mapping[str, Sequence[ImageRecord]],
    min_count: int = 5,
    verify_images: bool = True,
    workers: int = DEFAULT_WORKERS,
) -> CheckReport:
    """Count images and captions per split, build the train vocabulary and list every problem.

    Problems, in split then record order: a missing or unreadable image file (with ``load_image``'s
    reason; without ``verify_images`` only existence is checked), an image with no captions or with
    empty captions, and an image path listed more than once.
    """
    splits = {
        name: {"images": len(recs), "captions": sum(len(r.captions) for r in recs)}
        for name, recs in records_by_split.items()
    }
    train = records_by_split.get("train", [])
    vocab_size = len(Vocabulary.build((c for r in train for c in r.captions), min_count=min_count))

    records = [r for recs in records_by_split.values() for r in recs]
    keys = [os.path.normpath(str(r.path)) for r in records]
    first: dict[str, ImageRecord] = {}
    for key, rec in zip(keys, records, strict=True):
        first.setdefault(key, rec)
    unique = list(first)
    checker = _verify_file if verify_images else _stat_file
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # map keeps input order, so the report is the same however the threads are scheduled.
        file_errors = dict(zip(unique, pool.map(checker, unique), strict=True))

    problems: list[dict[str, str]] = []
    for key, rec in zip(keys, records, strict=True):
        path = str(rec.path)
        orig = first[key]
        if orig is not rec:
            problems.append({
                "path": path,
                "error": f"duplicate image path (also in split {orig.split!r} as image {orig.image_id})",
            })
        elif file_errors[key] is not None:
            problems.append({"path": path, "error": file_errors[key]})
        if not rec.captions:
            problems.append({"path": path, "error": f"image {rec.image_id} has no captions"})
        else:
            empty = [i for i, c in enumerate(rec.captions) if not c]
            if empty:
                which = ", ".join(str(i) for i in empty)
                problems.append({
                    "path": path,
                    "error": f"image {rec.image_id}: empty caption (no tokens) at index {which}",
                })
    logger.info("checked %d images: %d problems", len(records), len(problems))
    return CheckReport(splits=splits, vocab_size=vocab_size, problems=problems)


def _verify_file(path: str) -> str | None:
    try:
        load_image(path)
    except ImageLoadError as e:
        return e.reason
    return None


def _stat_file(path: str) -> str | None:
    p = Path(path)
    if p.is_file():
        return None
    return "is a directory, not an image file" if p.is_dir() else "file not found"


def _split_from_name(path: Path) -> str:
    """``captions_val2014.json`` -> ``val``; anything without a split name counts as training data."""
    name = path.name.lower()
    return next((s for s in ("train", "val", "test") if s in name), "train")


def _read_coco_file(path: Path, root: Path) -> dict[str, list[ImageRecord]]:
    split = _split_from_name(path)
    return {split: read_coco_annotations(path, root, split)}


def run_data_check(
    karpathy_json: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    coco_annotations: str | os.PathLike | None = None,
    min_count: int = 5,
    restval_to_train: bool = True,
    verify_images: bool = True,
) -> CheckReport:
    """Read a Karpathy split file and/or a COCO captions file, then ``check_dataset`` the result.

    ``image_root`` defaults to the folder of the annotation file. A COCO file's records go to the
    split its name contains (``captions_val2014.json`` -> ``val``; otherwise ``train``). A file that
    cannot be read becomes a problem naming it, rather than an exception.
    """
    if karpathy_json is None and coco_annotations is None:
        raise ValueError("give karpathy_json and/or coco_annotations")
    records: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    read_problems: list[dict[str, str]] = []
    # Each file with the reader that understands it: (path, image root) -> records per split.
    sources: list[tuple[Path, Callable[[Path, Path], dict[str, list[ImageRecord]]]]] = []
    if karpathy_json is not None:
        sources.append((Path(karpathy_json), partial(read_karpathy, restval_to_train=restval_to_train)))
    if coco_annotations is not None:
        sources.append((Path(coco_annotations), _read_coco_file))
    for path, read in sources:
        root = Path(image_root) if image_root is not None else path.parent
        try:
            found = read(path, root)
        except (OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                error = "file not found"
            elif isinstance(e, OSError):
                error = f"cannot read file ({e.strerror or e})"
            else:
                # Reader messages start with the path, which the problem already names.
                error = str(e).removeprefix(f"{path}: ")
            read_problems.append({"path": str(path), "error": error})
            continue
        for split, recs in found.items():
            records.setdefault(split, []).extend(recs)
    report = check_dataset(records, min_count=min_count, verify_images=verify_images)
    report.problems[:0] = read_problems
    return report
