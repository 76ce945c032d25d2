"""Reader for Karpathy's split files (``dataset_coco.json``, ``dataset_flickr8k.json``, ...)."""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path
from typing import Any

from captioner.data.records import SPLITS, ImageRecord
from captioner.data.vocab import tokenize

logger = logging.getLogger(__name__)

_FILE_SPLITS = (*SPLITS, "restval")


def read_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    restval_to_train: bool = True,
) -> dict[str, list[ImageRecord]]:
    """Read a Karpathy split file into ``{"train": [...], "val": [...], "test": [...]}``.

    COCO entries carry ``filepath`` (``train2014`` / ``val2014``), so their image is
    ``image_root/filepath/filename``; Flickr entries have none and live at ``image_root/filename``.
    ``image_id`` is ``cocoid`` when present (what COCO evaluation expects), else ``imgid``.
    Karpathy's 30k ``restval`` COCO images are training data in the usual setup; with
    ``restval_to_train=False`` they are kept apart under the key ``"restval"``.
    Records keep the file's order. Raises ``ValueError`` naming the file and field when malformed.
    """
    json_path = Path(json_path)
    root = Path(image_root)
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected a Karpathy split file, an object with an 'images' list")

    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    if not restval_to_train:
        out["restval"] = []
    for i, entry in enumerate(data["images"]):
        rec = _parse_entry(entry, f"{json_path}: images[{i}]", root)
        if rec.split == "restval" and restval_to_train:
            rec.split = "train"
        out[rec.split].append(rec)
    logger.info("%s: %s", json_path, ", ".join(f"{k} {len(v)}" for k, v in out.items()))
    return out


def recorded_tokenizer(json_path: str | os.PathLike) -> str | None:
    """The ``tokenizer`` a split file records (``data convert`` writes it), None when it has
    none (Karpathy's own files). Files without the word "tokenizer" are not parsed, so asking a
    150 MB ``dataset_coco.json`` costs a scan of its bytes."""
    json_path = Path(json_path)
    with open(json_path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(b'"tokenizer"') < 0:
                return None
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    name = data.get("tokenizer") if isinstance(data, dict) else None
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{json_path}: 'tokenizer' must be a tokenizer's name, got {name!r}")
    return name


def _parse_entry(entry: Any, where: str, root: Path) -> ImageRecord:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"{where}: missing or empty 'filename'")
    split = entry.get("split")
    if split not in _FILE_SPLITS:
        raise ValueError(f"{where} ({filename}): 'split' must be one of {_FILE_SPLITS}, got {split!r}")
    image_id = entry.get("cocoid", entry.get("imgid"))
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ValueError(f"{where} ({filename}): needs an integer 'cocoid' or 'imgid', got {image_id!r}")
    filepath = entry.get("filepath")
    if filepath is not None and not isinstance(filepath, str):
        raise ValueError(f"{where} ({filename}): 'filepath' must be a string, got {filepath!r}")
    sentences = entry.get("sentences", [])
    if not isinstance(sentences, list):
        raise ValueError(f"{where} ({filename}): 'sentences' must be a list")

    captions, raws, sentids = [], [], []
    for j, s in enumerate(sentences):
        swhere = f"{where} ({filename}): sentences[{j}]"
        if not isinstance(s, dict):
            raise ValueError(f"{swhere}: expected an object")
        tokens, raw = s.get("tokens"), s.get("raw")
        if tokens is not None and not (
            isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
        ):
            raise ValueError(f"{swhere}: 'tokens' must be a list of strings")
        if raw is not None and not isinstance(raw, str):
            raise ValueError(f"{swhere}: 'raw' must be a string")
        if tokens is None and raw is None:
            raise ValueError(f"{swhere}: needs 'tokens' or 'raw'")
        # Karpathy's tokens win when present; an empty list with raw text falls back to tokenising it.
        captions.append(list(tokens) if tokens else tokenize(raw or ""))
        raws.append(raw if raw is not None else " ".join(tokens or []))
        sentids.append(s.get("sentid"))
    if not all(isinstance(x, int) for x in sentids):
        listed = entry.get("sentids")
        ok = isinstance(listed, list) and len(listed) == len(sentences)
        sentids = list(listed) if ok else []

    return ImageRecord(
        image_id=image_id,
        path=root / filepath / filename if filepath else root / filename,
        split=split,
        captions=captions,
        raw=raws,
        sentids=sentids,
        filename=filename,
    )
