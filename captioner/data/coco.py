"""Reader for official COCO caption annotation files (``captions_train2014.json`` and friends)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

from pycocotools.coco import COCO

from captioner.data.records import ImageRecord
from captioner.data.vocab import tokenize

logger = logging.getLogger(__name__)


def _load_coco(annotations_json: str | os.PathLike) -> COCO:
    """Index the file with pycocotools, quietly, turning its asserts and KeyErrors into ValueErrors."""
    path = Path(annotations_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO annotation file not found")
    try:
        # pycocotools prints progress to stdout; a library must not.
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except AssertionError:
        raise ValueError(f"{path}: expected a COCO annotation object at the top level") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed COCO annotations (missing or bad field {e})") from None
    if "images" not in coco.dataset:
        raise ValueError(f"{path}: missing 'images'")
    for ann in coco.anns.values():
        if not isinstance(ann.get("caption"), str):
            raise ValueError(
                f"{path}: annotation {ann.get('id')!r} has no 'caption' string "
                "(is this a captions_*.json file?)"
            )
    return coco


def read_coco_annotations(
    annotations_json: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str = "train",
) -> list[ImageRecord]:
    """One ``ImageRecord`` per image in the file, sorted by COCO id, image at ``image_root/file_name``.

    Captions are ordered by annotation id (kept as ``sentids``); images without captions are kept
    with an empty caption list, so ``data check`` can report them.
    """
    path = Path(annotations_json)
    coco = _load_coco(path)
    root = Path(image_root)
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        file_name = info.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(f"{path}: image {image_id} has no 'file_name'")
        anns = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a.get("id", 0))
        raw = [a["caption"].strip() for a in anns]
        records.append(ImageRecord(
            image_id=int(image_id),
            path=root / file_name,
            split=split,
            captions=[tokenize(r) for r in raw],
            raw=raw,
            sentids=[int(a["id"]) for a in anns] if all("id" in a for a in anns) else [],
            filename=file_name,
        ))
    logger.info("%s: %d images, %d captions", path, len(records), len(coco.anns))
    return records


def coco_references(annotations_json: str | os.PathLike) -> dict[int, list[str]]:
    """Raw reference captions per COCO image id, for evaluation (images without captions omitted)."""
    coco = _load_coco(annotations_json)
    refs: dict[int, list[str]] = {}
    for image_id in sorted(coco.imgToAnns):
        anns = sorted(coco.imgToAnns[image_id], key=lambda a: a.get("id", 0))
        if anns:
            refs[int(image_id)] = [a["caption"].strip() for a in anns]
    return refs
