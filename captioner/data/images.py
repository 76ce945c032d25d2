"""Robust image loading: any PIL mode in, an RGB image out, or an ``ImageLoadError`` that names the file.

Every image the package reads (training, captioning, the web server, ``data check``) goes through
``load_image`` / ``load_image_bytes`` so a bad file fails the same way everywhere, with a reason a
person can act on.

PIL reads every header (format, size, mode, EXIF, the pixel limit). The pixels of 8-bit RGB and
grey JPEGs come from TorchCodec where it is installed (``captioner[torchcodec]``): the same
libjpeg-turbo output as PIL's, byte for byte, 1.2x faster on 2- and 12-MP photos, as fast at
640x480 (docs/performance.md). Anything else (PNGs: slower through TorchCodec, measured; other
formats and modes, EXIF rotation, a file TorchCodec refuses), and everything without TorchCodec,
PIL decodes, and names the problem when it cannot.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from torch import Tensor

    from captioner.data.transforms import Preprocessing

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
_ORIENTATION = 0x0112  # EXIF tag
# JPEG's DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8 size for about the cost of those pixels
DCT_SCALES = (8, 4, 2)


class ImageLoadError(Exception):
    """An image could not be loaded. ``path`` names the file (or upload), ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def load_image(path: str | os.PathLike, reduce_to: int | None = None, torchcodec: bool = True) -> Image.Image:
    """Read ``path`` fully and return it as an RGB image (EXIF orientation applied).

    Transparent pixels are composited on white; 16-bit and float images are scaled to 8 bits.
    ``reduce_to``: the side the caller resizes the image to (``Preprocessing.decode_size``); a JPEG
    at least twice that on both sides is decoded smaller in the DCT domain (:func:`dct_scale`).
    ``torchcodec``: False decodes with PIL alone, as where TorchCodec is not installed (the same
    pixels; benchmarks compare the two).
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
            return _decode(f, p, reduce_to, torchcodec)
    except PermissionError:
        raise ImageLoadError(p, "permission denied") from None


def read_image(path: str | os.PathLike, preprocessing: Preprocessing) -> tuple[Tensor | None, str | None]:
    """(``preprocessing.load(path)``, None), or (None, why the file could not be read): one file
    of a stream or a feature extraction, where one bad file must never end the run."""
    try:
        return preprocessing.load(path), None
    except ImageLoadError as err:
        return None, err.reason
    except Exception as err:  # never let one file end the run
        return None, f"{type(err).__name__}: {err}"


def load_image_bytes(data: bytes, name: str = "<upload>", reduce_to: int | None = None) -> Image.Image:
    """Like ``load_image`` for an in-memory file (an upload); ``name`` is used in error messages."""
    if not data:
        raise ImageLoadError(name, "zero-byte file")
    return _decode(io.BytesIO(data), name, reduce_to)


def dct_scale(width: int, height: int, reduce_to: int | None) -> int:
    """The JPEG DCT scaling (1, 2, 4 or 8) for a ``width`` x ``height`` photo resized to
    ``reduce_to`` x ``reduce_to`` next: the largest that leaves both sides at least ``reduce_to``
    (so the resize never upscales what the scaling shrank); 1 for None. PIL's ``draft`` takes the
    same one for that size."""
    if reduce_to is None:
        return 1
    return next((s for s in DCT_SCALES if width >= s * reduce_to and height >= s * reduce_to), 1)


def _decode(fp: IO[bytes], name: str | os.PathLike, reduce_to: int | None = None,
            torchcodec: bool = True) -> Image.Image:
    img = _open(fp, name)
    try:
        pixels = img.width * img.height
        if MAX_IMAGE_PIXELS is not None and pixels > MAX_IMAGE_PIXELS:
            raise ImageLoadError(name, f"decompression bomb: {pixels} pixels > {MAX_IMAGE_PIXELS}")
        if img.format in ("JPEG", "MPO") and dct_scale(img.width, img.height, reduce_to) > 1:
            # TorchCodec has no scaled decoding: PIL's libjpeg-turbo does it (EXIF applied after)
            img.draft(img.mode, (reduce_to, reduce_to))
        elif torchcodec:
            decoded = _decode_with_torchcodec(img, fp)
            if decoded is not None:
                return decoded
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


@functools.cache
def _torchcodec() -> dict[str, Callable] | None:
    """TorchCodec's decoders by PIL format name, imported once (on first use: it loads native
    libraries); None where it is not installed or does not load (built for another torch).
    JPEG only: its ``decode_png`` was 0.88x PIL's speed on the ``shapes`` PNGs (docs/performance.md)."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception as err:
        logger.debug("decoding images with PIL: TorchCodec does not import (%s)", err)
        return None
    return {"JPEG": decode_jpeg}


def _decode_with_torchcodec(img: Image.Image, fp: IO[bytes]) -> Image.Image | None:
    """``img``'s pixels as an RGB image, decoded by TorchCodec, or None for PIL to decode it: only
    for the files whose TorchCodec pixels equal PIL's (tests/test_decode.py compares them) and
    that need nothing more than decoding: 8-bit RGB or grey, no EXIF rotation, no transparency,
    one frame. A file TorchCodec refuses (truncated, corrupt) is also left to PIL, which says why."""
    import torch

    decoders = _torchcodec()
    decode = decoders.get(img.format) if decoders else None
    if decode is None or img.mode not in ("RGB", "L") or getattr(img, "n_frames", 1) != 1:
        return None
    if "transparency" in img.info or ("exif" in img.info and img.getexif().get(_ORIENTATION, 1) not in (1, None)):
        return None
    fp.seek(0)
    data = bytearray(fp.read())
    try:
        pixels = decode(torch.frombuffer(data, dtype=torch.uint8), mode="RGB")  # (3, H, W) uint8
    except Exception as err:
        logger.debug("TorchCodec cannot decode %s (%s): PIL tries", img.format, err)
        return None
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


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
