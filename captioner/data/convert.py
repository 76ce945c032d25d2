"""Your captions -> a Karpathy split file (``captioner data convert``).

Readers turn a CSV/TSV table, a JSON Lines file, a folder of images with ``.txt`` captions or a
COCO caption annotation file into :class:`Row` s (image, caption, optional split, where it came
from); :func:`convert_rows` checks them (missing images, empty captions, duplicates), tokenises
the captions, splits the images deterministically and builds the file that ``fit``, ``data
check``, ``evaluate`` and ``features extract`` read (``data.dataset: karpathy``).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from captioner.data.tokenizers import get_tokenizer

FORMATS = ("csv", "tsv", "jsonl", "folder", "coco")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLITS = ("train", "val", "test", "restval")


class ConvertError(ValueError):
    """An input that cannot be read as asked (unreadable file, missing column): names the file."""


@dataclass
class Row:
    image: str  # relative to the image root (or absolute)
    caption: str | None  # None: an image without any caption
    split: str | None
    where: str  # "file:line" for messages
    image_id: int | None = None


@dataclass
class ConvertReport:
    images: int = 0
    captions: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return len(self.missing_images) + len(self.empty_captions) + len(self.duplicates)

    def format_text(self) -> str:
        lines = [f"{self.images} images, {self.captions} captions ("
                 + ", ".join(f"{k} {v}" for k, v in self.splits.items()) + ")"]
        for title, items in (("missing image", self.missing_images),
                             ("empty caption", self.empty_captions),
                             ("duplicate caption", self.duplicates)):
            lines += [f"dropped, {title}: {item}" for item in items]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"images": self.images, "captions": self.captions, "splits": self.splits,
                "missing_images": self.missing_images, "empty_captions": self.empty_captions,
                "duplicates": self.duplicates}


# -- readers ------------------------------------------------------------------------------------
def read_table(path: str | os.PathLike, delimiter: str = ",", image_column: str = "image",
               caption_column: str = "caption", split_column: str = "split") -> list[Row]:
    """A CSV/TSV file with a header row (UTF-8, with or without BOM; quoted fields may hold the
    delimiter and newlines); one row per caption, several rows per image."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in columns]
            if missing:
                raise ConvertError(f"{path}: no column {' or '.join(map(repr, missing))}; found "
                                   f"{', '.join(map(repr, columns)) or 'no header'} (name them with "
                                   "--image-column/--caption-column)")
            has_split = split_column in columns
            return [Row((r[image_column] or "").strip(), r[caption_column] or "",
                        (r[split_column] or "").strip() or None if has_split else None,
                        f"{path}:{reader.line_num}") for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConvertError(f"{path}: cannot read ({err})") from None


def read_jsonl(path: str | os.PathLike, image_key: str = "image", caption_key: str = "caption",
               split_key: str = "split") -> list[Row]:
    """JSON Lines: ``{"image": ..., "caption": ...}`` or ``{"image": ..., "captions": [...]}``."""
    path = Path(path)
    rows: list[Row] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConvertError(f"{where}: not valid JSON ({err})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(image_key), str):
                    raise ConvertError(f"{where}: expected an object with a string {image_key!r}")
                if caption_key in obj:
                    captions = [obj[caption_key]]
                elif isinstance(obj.get(caption_key + "s"), list):
                    captions = obj[caption_key + "s"] or [None]
                else:
                    raise ConvertError(f"{where}: no {caption_key!r} or {caption_key + 's'!r} "
                                       f"(found {', '.join(map(repr, obj))})")
                split = obj.get(split_key)
                for c in captions:
                    rows.append(Row(obj[image_key].strip(), c if isinstance(c, str) else None,
                                    split if isinstance(split, str) and split else None, where))
    except (OSError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path}: cannot read ({err})") from None
    return rows


def read_folder(folder: str | os.PathLike) -> list[Row]:
    """Images (any depth) each with a same-stem ``.txt`` beside it, one caption per line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder")
    rows: list[Row] = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        rel = image.relative_to(folder).as_posix()
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            rows.append(Row(rel, None, None, f"{txt} (not found)"))
            continue
        try:
            lines = txt.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConvertError(f"{txt}: cannot read ({err})") from None
        rows += [Row(rel, line, None, f"{txt}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
        if not any(line.strip() for line in lines):
            rows.append(Row(rel, None, None, str(txt)))
    for txt in sorted(folder.rglob("*.txt")):
        if not any(txt.with_suffix(s).is_file() for s in (*IMAGE_SUFFIXES, *map(str.upper, IMAGE_SUFFIXES))):
            rows.append(Row(txt.relative_to(folder).with_suffix("").as_posix() + ".*", "?", None, str(txt)))
    return rows


def read_coco(path: str | os.PathLike) -> list[Row]:
    """A COCO caption annotation file (``captions_*.json``); images named by ``file_name``."""
    from captioner.data.coco import read_coco_annotations

    try:
        records = read_coco_annotations(path, ".")
    except (OSError, ValueError) as err:
        raise ConvertError(str(err)) from None
    return [Row(r.filename, c, None, f"{path}: image {r.image_id}")
            for r in records for c in (r.raw or [None])]


def read_rows(fmt: str, path: str | os.PathLike, image_column: str = "image",
              caption_column: str = "caption") -> list[Row]:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "folder":
        return read_folder(path)
    if not Path(path).is_file():
        raise ConvertError(f"{path}: not found")
    if fmt in ("csv", "tsv"):
        return read_table(path, "," if fmt == "csv" else "\t", image_column, caption_column)
    if fmt == "jsonl":
        return read_jsonl(path, image_column, caption_column)
    return read_coco(path)


# -- building the split file --------------------------------------------------------------------
def assign_splits(images: list[str], given: dict[str, str], val_fraction: float,
                  test_fraction: float, seed: int) -> dict[str, str]:
    """Images with a given split keep it; the others are shuffled with ``seed`` (in sorted order,
    so the same set of images splits the same way whatever the input order) and the first
    ``test_fraction`` go to test, the next ``val_fraction`` to val (each at least one image when
    its fraction is not 0), the rest to train."""
    rest = sorted(i for i in images if i not in given)
    random.Random(seed).shuffle(rest)
    def count(fraction: float) -> int:  # rounded half up, and at least one image when asked for any
        return min(len(rest), max(1, int(fraction * len(rest) + 0.5))) if fraction > 0 and rest else 0

    n_test, n_val = count(test_fraction), count(val_fraction)
    out = dict(given)
    for k, image in enumerate(rest):
        out[image] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


def convert_rows(rows: Iterable[Row], image_root: str | os.PathLike, tokenizer: str = "simple",
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0) -> tuple[dict, ConvertReport]:
    """Rows -> (Karpathy split file as a dict, report). Dropped: rows whose image is not under
    ``image_root``, captions without words (for ``tokenizer``), the same caption of an image again."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ConvertError("--val-fraction and --test-fraction must be >= 0 and sum to less than 1")
    tok = get_tokenizer(tokenizer)
    root = Path(image_root)
    report = ConvertReport()
    captions: dict[str, list[tuple[str, list[str]]]] = {}
    given: dict[str, str] = {}
    exists: dict[str, bool] = {}
    for row in rows:
        if row.split is not None:
            if row.split not in _SPLITS:
                raise ConvertError(f"{row.where}: split must be one of {', '.join(_SPLITS)}, got {row.split!r}")
            given.setdefault(row.image, row.split)
        if row.image not in exists:
            exists[row.image] = bool(row.image) and (root / row.image).is_file()
            if not exists[row.image]:
                report.missing_images.append(f"{root / row.image} ({row.where})")
        if not exists[row.image]:
            continue
        raw = " ".join((row.caption or "").split())  # newlines inside quoted fields -> spaces
        tokens = tok.tokenize(raw)
        if not tokens:
            report.empty_captions.append(f"{row.where} ({row.image})")
            continue
        seen = captions.setdefault(row.image, [])
        if any(raw == r for r, _ in seen):
            report.duplicates.append(f"{row.where} ({row.image}: {raw!r})")
            continue
        seen.append((raw, tokens))
    splits = assign_splits(list(captions), {k: v for k, v in given.items() if k in captions},
                           val_fraction, test_fraction, seed)
    entries, sentid = [], 0
    for imgid, (image, caps) in enumerate(captions.items()):
        sentences = [{"tokens": t, "raw": r, "imgid": imgid, "sentid": sentid + j}
                     for j, (r, t) in enumerate(caps)]
        entries.append({"filename": image, "imgid": imgid, "split": splits[image],
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        sentid += len(sentences)
    report.images, report.captions = len(entries), sentid
    report.splits = {s: sum(e["split"] == s for e in entries) for s in _SPLITS
                     if any(e["split"] == s for e in entries) or s != "restval"}
    return {"images": entries, "dataset": "custom", "tokenizer": tokenizer}, report


__all__ = ["FORMATS", "ConvertError", "ConvertReport", "Row", "assign_splits", "convert_rows",
           "read_coco", "read_folder", "read_jsonl", "read_rows", "read_table"]
