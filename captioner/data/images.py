"""Robust image loading: any PIL mode in, an RGB image out, or an ``ImageLoadError`` that names the file.

Every image the package reads (training, captioning, the web server, ``data check``) goes through
``load_image`` / ``load_image_bytes`` so a bad file fails the same way everywhere, with a reason a
person can act on.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Same default as PIL: about 0.25 GB of 24-bit pixels. Anything larger is refused as a possible
# decompression bomb. Read at call time, so tests (or callers) may lower it; None disables it.
MAX_IMAGE_PIXELS: int | None = 89_478_485

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# PIL's bomb check runs inside ``Image.open`` against the global ``Image.MAX_IMAGE_PIXELS`` and only
# warns below twice the limit. We swap in our limit and escalate the warning for the duration of the
# open, under a lock, because both the limit and ``warnings.filters`` are process-wide.
_OPEN_LOCK = threading.Lock()
_PIXELS_RE = re.compile(r"\((\d+) pixels\)")
_WHITE = (255, 255, 255)


class ImageLoadError(Exception):
    """An image could not be loaded. ``path`` names the file (or upload), ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read ``path`` fully and return it as an RGB image (EXIF orientation applied).

    Transparent pixels are composited on white; 16-bit and float images are scaled to 8 bits.
    Raises ``ImageLoadError`` for a missing, empty, non-image, truncated, corrupt or oversized file.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found") from None
    except OSError as e:
        raise ImageLoadError(p, f"cannot read file ({e.strerror or e})") from None
    if p.is_dir():
        raise ImageLoadError(p, "is a directory, not an image file")
    if st.st_size == 0:
        raise ImageLoadError(p, "zero-byte file")
    try:
        with open(p, "rb") as f:
            return _decode(f, p)
    except PermissionError:
        raise ImageLoadError(p, "permission denied") from None


def read_image(path: str | os.PathLike, preprocessing: Callable[[Image.Image], Any]) -> tuple[Any, str | None]:
    """(the preprocessed image, None), or (None, why the file could not be read): one file of a
    stream or a feature extraction, where one bad file must never end the run."""
    try:
        return preprocessing(load_image(path)), None
    except ImageLoadError as err:
        return None, err.reason
    except Exception as err:  # never let one file end the run
        return None, f"{type(err).__name__}: {err}"


def load_image_bytes(data: bytes, name: str = "<upload>") -> Image.Image:
    """Like ``load_image`` for an in-memory file (an upload); ``name`` is used in error messages."""
    if not data:
        raise ImageLoadError(name, "zero-byte file")
    return _decode(io.BytesIO(data), name)


def _decode(fp: IO[bytes], name: str | os.PathLike) -> Image.Image:
    img = _open(fp, name)
    try:
        pixels = img.width * img.height
        if MAX_IMAGE_PIXELS is not None and pixels > MAX_IMAGE_PIXELS:
            raise ImageLoadError(name, f"decompression bomb: {pixels} pixels > {MAX_IMAGE_PIXELS}")
        # Force the full decode now so truncation shows up here, not later in a DataLoader worker.
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            msg = str(e) or type(e).__name__
            if "truncat" in msg.lower() or isinstance(e, EOFError):
                raise ImageLoadError(name, f"truncated image ({msg})") from None
            raise ImageLoadError(name, f"corrupt image ({msg})") from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception as e:  # a broken EXIF block should not cost us a readable image
            logger.warning("ignoring unreadable EXIF orientation in %s: %s", name, e)
            oriented = img
        try:
            return _to_rgb(oriented)
        except (OSError, ValueError) as e:
            raise ImageLoadError(name, f"unsupported image mode {oriented.mode} ({e})") from None
    finally:
        img.close()


def _open(fp: IO[bytes], name: str | os.PathLike) -> Image.Image:
    """``Image.open`` with our bomb limit, leaving PIL's global state as it found it."""
    limit = MAX_IMAGE_PIXELS
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            return Image.open(fp)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            m = _PIXELS_RE.search(str(e))
            n = m.group(1) if m else "too many"
            raise ImageLoadError(name, f"decompression bomb: {n} pixels > {limit}") from None
        except UnidentifiedImageError:
            raise ImageLoadError(name, "not an image (unrecognised file format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageLoadError(name, f"corrupt image header ({e or type(e).__name__})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit / 32-bit / float single-channel image to 0..255.

    16-bit modes use their full range (65535 -> 255). For 32-bit ``I`` and ``F`` the range is not
    stored, so we take the smallest conventional range that holds the data (0..1 for floats, 0..255,
    0..65535) and fall back to min-max stretching for anything else.
    """
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        finite = a[np.isfinite(a)]
        amin = float(finite.min()) if finite.size else 0.0
        amax = float(finite.max()) if finite.size else 0.0
        if amin >= 0 and mode == "F" and amax <= 1.0:
            lo, hi = 0.0, 1.0
        elif amin >= 0 and amax <= 255:
            lo, hi = 0.0, 255.0
        elif amin >= 0 and amax <= 65535:
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = amin, max(amax, amin + 1e-12)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class FileList:
    """The image files listed in ``source``, one path a line (``-``: standard input, readable
    once); blank lines and the whitespace around a path are ignored, and a relative path is
    relative to the current folder, as given. Iterating reads the file again, so a caller keeps
    only what it needs (:class:`captioner.data.records.Deal`). A listed file that does not
    exist is still yielded: it is reported per file, as :func:`iter_image_paths` does."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.source = str(source)

    @property
    def is_stdin(self) -> bool:
        return self.source == "-"

    def __iter__(self) -> Iterator[Path]:
        import sys

        # surrogateescape: a name that is not valid UTF-8 stays the bytes the file system has
        with (open(sys.stdin.fileno(), encoding="utf-8", errors="surrogateescape", closefd=False)
              if self.is_stdin else open(self.source, encoding="utf-8", errors="surrogateescape")) as f:
            for line in f:
                if name := line.strip():
                    yield Path(name)


def iter_image_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files exactly as given; folders searched recursively for image files, in sorted order.

    Inside folders, hidden files and folders (``.name``) are skipped. A given path that does not exist
    is still yielded, so ``load_image`` reports it per file instead of the whole run failing.
    """
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            yield p
            continue
        found = [
            f for f in p.rglob("*")
            if is_image_path(f)
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
            and f.is_file()
        ]
        yield from sorted(found)
