"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

A write that finds the disk full raises :class:`DiskFullError`, whose message names the file, the
space the write needed and the space left; the CLI prints it as its one line (exit 2). Every
writer of the package goes through :func:`atomic_write` or the :func:`writing` guard, so the
translation lives here only. The module sits below every layer (as ``registry.py`` does): data,
viz, checkpoints and commands all write through it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# What a full disk (or an exhausted quota) sets as errno.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What a failed write says when no errno is attached: torch.save's zip writer ("unexpected pos",
# "file write failed") and numpy's tofile ("N requested and M written"). These count as a full
# disk only when the free space is below what the write needed.
_SHORT_WRITE = ("unexpected pos", "file write failed", "requested and")


class DiskFullError(OSError):
    """No room on the disk for a write: ``path``, the bytes it ``needed`` (None when unknown),
    the bytes ``free`` in its folder after the failed write was cleaned up, and the ``hint`` that
    says how to go on (a command may replace it: ``fit`` names the checkpoint to resume from)."""

    def __init__(self, path: str | os.PathLike | None, needed: int | None, free: int | None,
                 hint: str = "free space and run the same command again") -> None:
        super().__init__(errno.ENOSPC, "no space left on device", None if path is None else str(path))
        self.path = None if path is None else Path(path)
        self.needed, self.free, self.hint = needed, free, hint

    def __str__(self) -> str:
        room = [f"needs {format_bytes(self.needed)}"] if self.needed is not None else []
        if self.free is not None:  # a write that named no file: the space where the command runs
            room.append(f"{format_bytes(self.free)} free" + ("" if self.path else f" in {os.getcwd()}"))
        what = f" writing {self.path}" if self.path is not None else ""
        where = f" ({', '.join(room)})" if room else ""
        return f"no space left on device{what}{where}; {self.hint}"

    def __reduce__(self):  # pickled between processes (DDP) with its own fields
        return DiskFullError, (self.path, self.needed, self.free, self.hint)


def format_bytes(n: int) -> str:
    """``12345678`` -> ``"12.3 MB"`` (decimal units, as ``df -H`` and file managers show)."""
    if n < 1000:
        return f"{n} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """The bytes free to an unprivileged writer on the file system holding ``path`` (its nearest
    existing folder); None when that cannot be asked."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, newest first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full(err: BaseException, path: str | os.PathLike,
              needed: int | Callable[[], int | None] | None = None) -> DiskFullError | None:
    """``err``, raised while writing ``path``, as a DiskFullError when the disk was full, else
    None. ``needed``: the bytes the write needed, or a function that measures them (called only
    for a failed write). An errno says it (ENOSPC, EDQUOT); a write that failed without one
    (torch's zip writer, numpy) was the disk's fault when the free space is below ``needed``."""
    errors = list(exception_chain(err))
    for e in errors:
        if isinstance(e, DiskFullError):
            return e
    by_errno = any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in errors)
    short = any(isinstance(e, (OSError, RuntimeError)) and any(m in str(e) for m in _SHORT_WRITE)
                for e in errors)
    if not (by_errno or short):
        return None
    if callable(needed):
        try:
            needed = needed()
        except Exception:  # measuring is a courtesy: the message goes without it
            needed = None
    free = free_bytes(path)
    if not by_errno and (needed is None or free is None or free >= needed):
        return None  # a failed write, but not for want of room
    return DiskFullError(path, needed, free)


def find_disk_full(err: BaseException) -> DiskFullError | None:
    """The full disk behind ``err`` (an exception that has passed through Lightning, a logger or
    a thread), if any: the first DiskFullError in its chain (the write that met the full disk
    first), or a bare ENOSPC/EDQUOT OSError made into one."""
    errors = list(exception_chain(err))
    for e in reversed(errors):
        if isinstance(e, DiskFullError):
            return e
    for e in reversed(errors):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return DiskFullError(e.filename, None, free_bytes(e.filename or os.getcwd()))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, needed: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """A full disk met while the block writes ``path`` -> DiskFullError naming it (for writers
    that cannot go through :func:`atomic_write`: libraries that take a path, appended logs)."""
    try:
        yield
    except Exception as err:
        full = disk_full(err, path, needed)
        if full is None or any(full is e for e in exception_chain(err)):  # already said
            raise
        raise full from err


class _Counter:
    """A write-only sink that counts bytes: what a writer would put in a file."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def measure(write: Callable[[IO[bytes]], object]) -> int:
    """The bytes ``write(f)`` writes, by running it on a sink that keeps nothing."""
    sink = _Counter()
    write(sink)  # type: ignore[arg-type]
    return sink.size


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it over
    ``path``, whenever the writer dies. The file gets the permissions a plain ``open`` would give
    (mkstemp makes owner-only files, but data files and checkpoints are meant to be shared).

    A full disk: the temporary file is removed and DiskFullError says how big the file would have
    been (``write`` is run once more on a sink that only counts: it must serialise an object,
    as every caller here does, not consume a stream)."""
    path = Path(path)
    with writing(path):  # a full disk may refuse the folder or the empty file already
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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(err, path, lambda: measure(write)) if isinstance(err, Exception) else None
        if full is None or any(full is e for e in exception_chain(err)):  # already said
            raise
        raise full from err


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to ``path`` without :func:`atomic_write`'s fsync and rename, for the many small
    files of a data set that is made again from scratch (generated images): a failed write
    removes the file, and a full disk is DiskFullError."""
    try:
        with writing(path, len(data)), open(path, "wb") as f:
            f.write(data)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def publish(part: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make a file written progressively beside ``path`` appear as ``path`` in one step: flushed
    to disk, then renamed over it (a reader sees the old file or the whole new one)."""
    with writing(path, lambda: os.path.getsize(part)), open(part, "rb+") as f:
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
