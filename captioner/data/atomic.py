"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it over
    ``path``, whenever the writer dies. The file gets the permissions a plain ``open`` would give
    (mkstemp makes owner-only files, but data files and checkpoints are meant to be shared)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(part: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make a file written progressively beside ``path`` appear as ``path`` in one step: flushed
    to disk, then renamed over it (a reader sees the old file or the whole new one)."""
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, path)


def finite_json(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None``, recursively (strict JSON has no NaN);
    tuples become lists, as ``json`` writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def atomic_write_json(
    path: str | os.PathLike,
    data: Any,
    indent: int | None = None,
    *,
    sort_keys: bool = False,
    separators: tuple[str, str] | None = None,
    newline: bool = False,
) -> Path:
    """Write ``data`` as strict JSON (NaN/inf as ``null``) through :func:`atomic_write`, creating
    the folder; return the path. ``indent``, ``sort_keys`` and ``separators`` are ``json.dumps``'s;
    ``newline`` ends the file with one."""
    options = {"indent": indent, "sort_keys": sort_keys, "separators": separators, "allow_nan": False}
    try:  # json.dumps in one shot (its C encoder); the recursive conversion only when needed
        text = json.dumps(data, **options)
    except ValueError:  # a NaN or inf somewhere
        text = json.dumps(finite_json(data), **options)
    body = (text + "\n" if newline else text).encode()
    atomic_write(path, lambda f: f.write(body))
    return Path(path)
