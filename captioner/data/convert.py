"""Your captions -> a Karpathy split file (``captioner data convert``).

Readers turn a CSV/TSV table, a JSON Lines file, a folder of images with ``.txt`` captions or a
COCO caption annotation file into :class:`Row` s (image, caption, optional split, where it came
from); :func:`convert_rows` checks them (missing images, empty captions, duplicates), tokenises
the captions, splits the images deterministically and builds the file that ``fit``, ``data
check``, ``evaluate`` and ``features extract`` read (``data.dataset: karpathy``).

Tables are read in the encoding and with the delimiter a spreadsheet writes: UTF-8 (with or
without BOM), UTF-16 with a BOM, else Windows-1252 (Excel's "CSV" on a Western Windows), and
``,`` ``;`` (Excel where the decimal mark is a comma) tab or ``|`` (:func:`table_dialect`).
Each image's id is derived from its path (:func:`path_image_id`), so converting an edited or
reordered table again gives every image the id it had, and a feature cache keyed by ids stays
right.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import regex

from captioner.data.tokenizers import get_tokenizer, lost_letters_warning, normalize

logger = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "jsonl", "folder", "coco")
_SPLITS = ("train", "val", "test", "restval")
DELIMITERS = (",", ";", "\t", "|")
# Scripts a caption's letters are counted in (Unicode Script property); the rest is "other".
_SCRIPTS = {"Latin": "Latin", "Han": "Han", "Hiragana": "Hiragana/Katakana",
            "Katakana": "Hiragana/Katakana", "Hangul": "Hangul", "Cyrillic": "Cyrillic", "Greek": "Greek",
            "Arabic": "Arabic", "Hebrew": "Hebrew", "Devanagari": "Devanagari", "Bengali": "Bengali",
            "Tamil": "Tamil", "Thai": "Thai", "Georgian": "Georgian", "Armenian": "Armenian",
            "Ethiopic": "Ethiopic"}
_SCRIPT_RE = regex.compile("|".join(f"(?P<{k}>\\p{{Script={k}}}+)" for k in _SCRIPTS) + r"|(?P<other>\p{L}+)")
ID_BYTES = 6  # path ids < 2**48: exact as JSON numbers in JavaScript (2**53) and as int64


class ConvertError(ValueError):
    """An input that cannot be read as asked (unreadable file, missing column): names the file."""


@dataclass
class Row:
    image: str  # relative to the image root (or absolute)
    caption: str | None  # None: an image without any caption
    split: str | None
    where: str  # "file:line" for messages
    image_id: int | None = None  # the source's own id (COCO's); None: derived from the path


def path_image_id(image: str) -> int:
    """A stable id for an image: the first 6 bytes of the SHA-256 of its path as the split file
    writes it (relative, POSIX), as an int below 2**48."""
    return int.from_bytes(hashlib.sha256(image.encode("utf-8")).digest()[:ID_BYTES], "big")


def dominant_script(text: str) -> str:
    """The script most of ``text``'s letters are written in ("Latin", "Han", "Hiragana/Katakana",
    "Cyrillic", ...; "other" for the rest, "none" without letters)."""
    counts: Counter[str] = Counter()
    for m in _SCRIPT_RE.finditer(text):
        counts[_SCRIPTS.get(m.lastgroup, "other")] += len(m.group())
    return counts.most_common(1)[0][0] if counts else "none"


@dataclass
class ConvertReport:
    images: int = 0
    captions: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    scripts: dict[str, int] = field(default_factory=dict)  # kept captions per dominant script
    lost_letters: int = 0  # captions whose words lost letters (the simple tokenizer on "âgé")
    warnings: list[str] = field(default_factory=list)
    encoding: str | None = None  # how a table was read (set by the caller that sniffed it)
    delimiter: str | None = None

    @property
    def dropped(self) -> int:
        return len(self.missing_images) + len(self.empty_captions) + len(self.duplicates)

    def format_text(self) -> str:
        lines = [f"{self.images} images, {self.captions} captions ("
                 + ", ".join(f"{k} {v}" for k, v in self.splits.items()) + ")"]
        if self.scripts:
            lines.append("captions by script: " + ", ".join(f"{k} {v}" for k, v in self.scripts.items()))
        if self.encoding:
            lines.append(f"read as {self.encoding}" + ("" if self.encoding.startswith("utf")
                                                        else " (not UTF-8; --encoding sets it)")
                         + (f", delimiter {self.delimiter!r}" if self.delimiter else ""))
        for title, items in (("missing image", self.missing_images),
                             ("empty caption", self.empty_captions),
                             ("duplicate caption", self.duplicates)):
            lines += [f"dropped, {title}: {item}" for item in items]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"images": self.images, "captions": self.captions, "splits": self.splits,
                "scripts": self.scripts, "encoding": self.encoding, "delimiter": self.delimiter,
                "missing_images": self.missing_images, "empty_captions": self.empty_captions,
                "duplicates": self.duplicates, "lost_letters": self.lost_letters,
                "warnings": self.warnings}


# -- readers ------------------------------------------------------------------------------------
def sniff_encoding(data: bytes) -> str:
    """UTF-8 with a BOM, UTF-16 with a BOM, UTF-8, else Windows-1252 (what Excel writes on a
    Western Windows: "é" is one byte, 0xE9)."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _read_text(path: Path, encoding: str | None, fallback: bool) -> tuple[str, str]:
    """(text, encoding used); without ``encoding`` it is sniffed, and a file that is not UTF-8 is
    read as cp1252 only with ``fallback``."""
    data = path.read_bytes()
    used = encoding or sniff_encoding(data)
    if used == "cp1252" and not (encoding or fallback):
        raise ConvertError(f"{path}: not UTF-8; give its encoding with --encoding (e.g. cp1252, shift_jis, gbk)")
    try:
        return data.decode(used), used
    except UnicodeDecodeError as err:
        hint = "" if encoding else "; give its encoding with --encoding (e.g. shift_jis, gbk)"
        raise ConvertError(f"{path}: cannot read as {used} ({err}){hint}") from None
    except LookupError:
        raise ConvertError(f"--encoding {encoding}: no such encoding") from None


def _delimiter(text: str, default: str, image_column: str, caption_column: str) -> str:
    """The one of ``DELIMITERS`` that splits the header into the image and caption columns, else
    ``csv.Sniffer``'s choice among them, else ``default``."""
    sample = text[:65536]
    header = sample.splitlines()[0] if sample.strip() else ""
    fits = [d for d in DELIMITERS
            if {image_column, caption_column} <= {c.strip() for c in next(csv.reader([header], delimiter=d), [])}]
    if len(fits) == 1:
        return fits[0]
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(fits or DELIMITERS)).delimiter
    except csv.Error:
        return default


def _check_delimiter(delimiter: str) -> None:
    if len(delimiter) != 1:
        raise ConvertError(f"--delimiter must be one character, got {delimiter!r}")


def table_dialect(path: str | os.PathLike, encoding: str | None = None, delimiter: str | None = None,
                  default_delimiter: str = ",", image_column: str = "image",
                  caption_column: str = "caption") -> tuple[str, str]:
    """The (encoding, delimiter) to read a table with: the given ones, else sniffed (the
    delimiter that splits the header into the image and caption columns, else ``csv.Sniffer``'s
    choice among ``DELIMITERS``, else ``default_delimiter``)."""
    path = Path(path)
    try:
        text, encoding = _read_text(path, encoding, fallback=True)
    except OSError as err:
        raise ConvertError(f"{path}: cannot read ({err})") from None
    if delimiter is not None:
        _check_delimiter(delimiter)
        return encoding, delimiter
    return encoding, _delimiter(text, default_delimiter, image_column, caption_column)


def read_table(path: str | os.PathLike, delimiter: str | None = None, image_column: str = "image",
               caption_column: str = "caption", split_column: str = "split",
               encoding: str | None = None, default_delimiter: str = ",") -> list[Row]:
    """A CSV/TSV file with a header row (quoted fields may hold the delimiter and newlines); one
    row per caption, several rows per image. ``encoding``/``delimiter`` None: sniffed
    (:func:`table_dialect`)."""
    path = Path(path)
    try:
        text, encoding = _read_text(path, encoding, fallback=True)
        if delimiter is None:
            delimiter = _delimiter(text, default_delimiter, image_column, caption_column)
        _check_delimiter(delimiter)
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in columns]
            if missing:
                raise ConvertError(f"{path}: no column {' or '.join(map(repr, missing))}; found "
                                   f"{', '.join(map(repr, columns)) or 'no header'} (name them with "
                                   "--image-column/--caption-column, --delimiter)")
            has_split = split_column in columns
            return [Row((r[image_column] or "").strip(), r[caption_column] or "",
                        (r[split_column] or "").strip() or None if has_split else None,
                        f"{path}:{reader.line_num}") for r in reader]
    except (OSError, csv.Error) as err:
        raise ConvertError(f"{path}: cannot read ({err})") from None


def read_jsonl(path: str | os.PathLike, image_key: str = "image", caption_key: str = "caption",
               split_key: str = "split", encoding: str | None = None) -> list[Row]:
    """JSON Lines: ``{"image": ..., "caption": ...}`` or ``{"image": ..., "captions": [...]}``;
    UTF-8 (or UTF-16 with a BOM) unless ``encoding`` says otherwise."""
    path = Path(path)
    rows: list[Row] = []
    try:
        text, _ = _read_text(path, encoding, fallback=False)
    except OSError as err:
        raise ConvertError(f"{path}: cannot read ({err})") from None
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
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
    return rows


def read_folder(folder: str | os.PathLike, encoding: str | None = None) -> list[Row]:
    """Images (any depth) each with a same-stem ``.txt`` beside it, one caption per line; UTF-8
    (or UTF-16 with a BOM) unless ``encoding`` says otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder")
    from captioner.data.images import IMAGE_EXTENSIONS, is_image_path  # here: PIL only for folders

    rows: list[Row] = []
    images = sorted(p for p in folder.rglob("*") if is_image_path(p) and p.is_file())
    for image in images:
        rel = image.relative_to(folder).as_posix()
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            rows.append(Row(rel, None, None, f"{txt} (not found)"))
            continue
        try:
            lines = _read_text(txt, encoding, fallback=False)[0].splitlines()
        except OSError as err:
            raise ConvertError(f"{txt}: cannot read ({err})") from None
        rows += [Row(rel, line, None, f"{txt}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
        if not any(line.strip() for line in lines):
            rows.append(Row(rel, None, None, str(txt)))
    for txt in sorted(folder.rglob("*.txt")):
        if not any(txt.with_suffix(s).is_file() for s in (*IMAGE_EXTENSIONS, *map(str.upper, IMAGE_EXTENSIONS))):
            rows.append(Row(txt.relative_to(folder).with_suffix("").as_posix() + ".*", "?", None, str(txt)))
    return rows


def read_coco(path: str | os.PathLike) -> list[Row]:
    """A COCO caption annotation file (``captions_*.json``); images named by ``file_name``, with
    COCO's ids (what COCO's evaluation files use)."""
    from captioner.data.coco import read_coco_annotations

    try:
        records = read_coco_annotations(path, ".")
    except (OSError, ValueError) as err:
        raise ConvertError(str(err)) from None
    return [Row(r.filename, c, None, f"{path}: image {r.image_id}", image_id=r.image_id)
            for r in records for c in (r.raw or [None])]


def read_rows(fmt: str, path: str | os.PathLike, image_column: str = "image",
              caption_column: str = "caption", encoding: str | None = None,
              delimiter: str | None = None) -> list[Row]:
    """``encoding``/``delimiter`` None: sniffed for tables (``tsv`` falls back to a tab), UTF-8
    for the other text inputs."""
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "folder":
        return read_folder(path, encoding)
    if not Path(path).is_file():
        raise ConvertError(f"{path}: not found")
    if fmt in ("csv", "tsv"):
        return read_table(path, delimiter, image_column, caption_column, encoding=encoding,
                          default_delimiter="," if fmt == "csv" else "\t")
    if fmt == "jsonl":
        return read_jsonl(path, image_column, caption_column, encoding=encoding)
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


def convert_rows(rows: Iterable[Row], image_root: str | os.PathLike, tokenizer: str = "unicode",
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0) -> tuple[dict, ConvertReport]:
    """Rows -> (Karpathy split file as a dict, report). Dropped: rows whose image is not under
    ``image_root``, captions without words (for ``tokenizer``), the same caption of an image again.
    Each image's ``imgid`` is its row's ``image_id``, else :func:`path_image_id` of its path; two
    images with one id are a ``ConvertError``. A tokenizer that drops letters (``simple`` on
    "âgé") is logged once, with the count of captions and an example."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ConvertError("--val-fraction and --test-fraction must be >= 0 and sum to less than 1")
    tok = get_tokenizer(tokenizer)
    root = Path(image_root)
    report = ConvertReport()
    captions: dict[str, list[tuple[str, list[str]]]] = {}
    given: dict[str, str] = {}
    exists: dict[str, bool] = {}
    ids: dict[str, int] = {}
    tokenised: list[tuple[str, list[str]]] = []  # every caption read, for the lost-letters check
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
        if row.image not in ids and row.image_id is not None:
            ids[row.image] = row.image_id
        raw = " ".join((row.caption or "").split())  # newlines inside quoted fields -> spaces
        tokens = tok.tokenize(raw)
        tokenised.append((raw, tokens))
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
    entries, sentid, owners = [], 0, {}
    for image, caps in captions.items():
        imgid = ids[image] if image in ids else path_image_id(image)
        if owners.setdefault(imgid, image) != image:
            raise ConvertError(f"images {owners[imgid]!r} and {image!r} get the same id {imgid}; rename one")
        sentences = [{"tokens": t, "raw": r, "imgid": imgid, "sentid": sentid + j}
                     for j, (r, t) in enumerate(caps)]
        entries.append({"filename": image, "imgid": imgid, "split": splits[image],
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        sentid += len(sentences)
    report.images, report.captions = len(entries), sentid
    report.splits = {s: sum(e["split"] == s for e in entries) for s in _SPLITS
                     if any(e["split"] == s for e in entries) or s != "restval"}
    scripts = Counter(dominant_script(normalize(r)) for caps in captions.values() for r, _ in caps)
    report.scripts = dict(scripts.most_common())
    report.lost_letters, warning = lost_letters_warning(
        tok, tokenised, "--tokenizer unicode (any alphabet, the default) or char (Chinese, Japanese) keeps them")
    if warning:
        logger.warning("%s", warning)
        report.warnings.append(warning)
    return {"images": entries, "dataset": "custom", "tokenizer": tokenizer}, report


__all__ = ["DELIMITERS", "FORMATS", "ConvertError", "ConvertReport", "Row", "assign_splits",
           "convert_rows", "dominant_script", "path_image_id", "read_coco", "read_folder", "read_jsonl",
           "read_rows", "read_table", "sniff_encoding", "table_dialect"]


def __getattr__(name: str):
    # Deprecated for one release: the image suffixes live in captioner.data.images.
    if name == "IMAGE_SUFFIXES":
        import warnings

        from captioner.data.images import IMAGE_EXTENSIONS

        warnings.warn("captioner.data.convert.IMAGE_SUFFIXES is captioner.data.images.IMAGE_EXTENSIONS; import "
                      "that (the old name goes in the next release)", DeprecationWarning, stacklevel=2)
        return IMAGE_EXTENSIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
