"""What a cache was made from: content hashes, and the one line that says how two records differ.

The feature cache (``index.json``) and the vocabulary cache (``made_from``) record what decided
their contents; a run compares that record with what its config asks for before it uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping

# how fields are named in messages (others: their key with spaces)
_LABELS = {"weights": "weights sha256", "images": "images (ids and paths) sha256", "name": "encoder"}


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks: COCO's 150 MB split file in ~0.3 s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: object) -> str:
    """The sha256 of a JSON-able value, its mappings' keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def short(value: object) -> str:
    """A value as a message shows it: a sha256 cut to 8 digits, a long list or mapping counted."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:8] + ".."
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= 40:
        return text.strip('"') if isinstance(value, str) else text
    return f"({len(value)} entries)" if isinstance(value, list | dict) else text[:37] + "..."


def differences(recorded: Mapping, expected: Mapping, keys: Iterable[str] | None = None) -> list[str]:
    """``field recorded vs expected`` for each field of ``keys`` (default: those of ``expected``)
    whose values differ (``?`` for one the record lacks); mappings are compared field by field."""
    out = []
    for k in keys if keys is not None else expected:
        a, b = recorded.get(k), expected.get(k)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, sorted({*a, *b}))
        else:
            label = _LABELS.get(k, k.replace("_", " "))
            out.append(f"{label} {short(a) if k in recorded else '?'} vs {short(b)}")
    return out
