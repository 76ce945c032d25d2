"""Results and reference files: a COCO results file, references from a Karpathy split file or
a COCO caption annotation file, and the two restricted to the same images."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.data.records import ImageRecord
from captioner.metrics import check_ids

logger = logging.getLogger(__name__)


class ResultsFormatError(ValueError):
    """A results file that is not ``[{"image_id": int, "caption": str}, ...]``; names file and field."""


class ImageIdMismatch(ValueError):
    """Predictions and references cover different images."""


def load_results(path: str | os.PathLike) -> dict[int, str]:
    """Read a COCO results file into ``{image_id: caption}`` (file order).

    Raises ``FileNotFoundError``, or :class:`ResultsFormatError` naming the file and the entry's
    field for anything but a non-empty list of ``{"image_id": int, "caption": str}`` objects with
    one caption per image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsFormatError(f"{path}: not valid JSON ({err})") from None
    expected = 'a COCO results list [{"image_id": int, "caption": str}, ...]'
    if not isinstance(data, list):
        raise ResultsFormatError(f"{path}: expected {expected}, got a JSON {_json_type(data)}")
    if not data:
        raise ResultsFormatError(f"{path}: the results list is empty")
    out: dict[int, str] = {}
    first_at: dict[int, int] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry [{i}]"
        if not isinstance(entry, dict):
            raise ResultsFormatError(f"{where}: expected an object with 'image_id' and 'caption', "
                                     f"got a JSON {_json_type(entry)}")
        for key in ("image_id", "caption"):
            if key not in entry:
                raise ResultsFormatError(f"{where}: missing field '{key}'")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            hint = " (a string: write the id as a JSON number)" if isinstance(image_id, str) else ""
            raise ResultsFormatError(f"{where}: field 'image_id' must be an integer, "
                                     f"got {image_id!r}{hint}")
        if not isinstance(caption, str):
            raise ResultsFormatError(f"{where}: field 'caption' must be a string, got {caption!r}")
        if image_id in out:
            raise ResultsFormatError(f"{where}: image_id {image_id} appears again (first at "
                                     f"[{first_at[image_id]}]); give one caption per image")
        out[image_id] = caption
        first_at[image_id] = i
    return out


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


@dataclass
class References:
    """Reference captions per image id: raw text (what is scored) and tokens (exact match)."""

    raw: dict[int, list[str]]
    tokens: dict[int, list[list[str]]]
    source: str

    def subset(self, ids: Iterable[int]) -> References:
        ids = list(ids)
        return References({k: self.raw[k] for k in ids}, {k: self.tokens[k] for k in ids},
                          self.source)


def references_from_records(records: Sequence[ImageRecord], source: str,
                            tokenized: bool = False) -> References:
    """``tokenized``: score the captions' words joined by spaces instead of their raw text (for
    tokenizers other than ``simple``: the scorers' PTB tokenizer splits only English)."""
    raw = {r.image_id: [" ".join(c) for c in r.captions] if tokenized or not r.raw else list(r.raw)
           for r in records}
    return References(raw, {r.image_id: [list(c) for c in r.captions] for r in records}, source)


def karpathy_references(path: str | os.PathLike, split: str) -> tuple[References, list[ImageRecord]]:
    """References of one split of a Karpathy split file (``ValueError`` if it has no images)."""
    from captioner.data.karpathy import read_karpathy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file not found")
    # Image paths are not needed for scoring; the root only completes the records.
    records = read_karpathy(path, path.parent, restval_to_train=split != "restval").get(split, [])
    records = [r for r in records if r.captions]
    if not records:
        raise ValueError(f"{path}: split {split!r} has no images with captions")
    return references_from_records(records, str(path)), records


def coco_annotation_references(path: str | os.PathLike) -> tuple[References, list[ImageRecord]]:
    """References from a COCO caption annotation file (images without captions left out)."""
    from captioner.data.coco import read_coco_annotations

    path = Path(path)
    records = [r for r in read_coco_annotations(path, path.parent) if r.captions]
    if not records:
        raise ValueError(f"{path}: no image has captions")
    return references_from_records(records, str(path)), records


def align_ids(
    predictions: Mapping[int, str], references: References, allow_missing: bool = False
) -> tuple[dict[int, str], References, dict[str, int]]:
    """Predictions and references restricted to the same images (the references' order).

    Without ``allow_missing`` any difference raises :class:`ImageIdMismatch` with counts and
    examples; with it, only the images in both are kept (warning) and the counts are returned.
    """
    try:
        check_ids(predictions.keys(), references.raw.keys())
    except ValueError as err:
        if not allow_missing:
            raise ImageIdMismatch(str(err)) from None
        common = [k for k in references.raw if k in predictions]
        if not common:
            raise ImageIdMismatch(f"{err}; no image is in both") from None
        counts = {"missing_predictions": len(references.raw) - len(common),
                  "extra_predictions": len(predictions) - len(common)}
        logger.warning("%s; scoring only the %d images in both", err, len(common))
        return {k: predictions[k] for k in common}, references.subset(common), counts
    return {k: predictions[k] for k in references.raw}, references, {}


__all__ = [
    "ImageIdMismatch", "References", "ResultsFormatError", "align_ids",
    "coco_annotation_references", "karpathy_references", "load_results", "references_from_records",
]
