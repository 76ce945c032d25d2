"""JPEG files decoded by TorchCodec on the model's device (nvJPEG on a GPU) and resized there.

On a GPU the model waits for the CPU: decoding a 640x480 JPEG with libjpeg-turbo takes a few
milliseconds, the ResNet-101 forward a fraction of one. ``read_jpeg`` only reads the file and
checks its header (cheap, on reader threads); ``decode_jpegs`` decodes a whole batch in one call
on the device; ``Preprocessing.from_uint8`` resizes and normalises there.

Only files this path takes faithfully go to the device: complete (ending in the EOI marker),
8-bit RGB or greyscale JPEGs without an EXIF rotation. Everything else (PNG, CMYK, rotated
photos, truncated or unreadable files) gets ``None`` here and goes through ``load_image``, which
handles it or names the problem. The check for a complete file matters on a GPU: nvJPEG decodes
a truncated JPEG without complaint (seen on an H100), where PIL reports it.

nvJPEG's pixels differ from libjpeg-turbo's by about a level on average (its IDCT and chroma
upsampling; up to ~10 levels at sharp edges, measured on an H100), so captions from GPU-decoded
JPEGs can differ slightly from CPU-decoded ones; ``--jpeg-decode cpu`` gives PIL's pixels.
TorchCodec's GPU decoder has no DCT scaling, so here large JPEGs are decoded whole and resized on
the device, where the CPU path decodes them reduced (``Preprocessing.jpeg_dct_scaling``); that too
is within the difference ``--jpeg-decode cpu`` removes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_SOI = b"\xff\xd8\xff"  # every JPEG file starts with these bytes
_EOI = b"\xff\xd9"  # ... and a complete one ends with these


def read_jpeg(path: str | os.PathLike) -> bytes | None:
    """The file's bytes if it is a JPEG that ``decode_jpegs`` decodes as ``load_image`` would
    (complete, 8-bit RGB or greyscale, no EXIF rotation, within the pixel limit), else None."""
    from captioner.data.images import _ORIENTATION, _open

    try:
        with open(path, "rb") as f:
            head = f.read(3)
            if head != _SOI:
                return None
            data = head + f.read()
        if not data.endswith(_EOI):  # cut short (nvJPEG decodes those silently) or trailing bytes
            return None
        # header only, no pixels decoded; over the pixel limit it raises (load_image names it)
        with _open(io.BytesIO(data), path) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.getexif().get(_ORIENTATION, 1) not in (1, None):
                return None
    except Exception:  # unreadable here: load_image will say why
        return None
    return data


def torchcodec_missing() -> str | None:
    """None when TorchCodec (the decoder of ``decode_jpegs``) imports here, else what to install.
    torchvision's own decoders are deprecated since 0.29 in its favour."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except Exception as err:  # not installed, or its native library does not load
        return f"decoding JPEGs on the device needs TorchCodec (pip install 'captioner[torchcodec]'): {err}"
    return None


def decode_jpegs(files: Sequence[bytes], device: torch.device | str) -> list[Tensor | None]:
    """JPEG file contents -> RGB uint8 tensors (3, H, W) on ``device`` (None for a file that
    fails to decode). One batched call; if it fails, each file alone, so one bad file costs
    only itself."""
    from torchcodec.decoders import decode_jpeg

    if not files:
        return []
    dev = torch.device(device)
    raw = [torch.from_numpy(np.frombuffer(f, dtype=np.uint8).copy()) for f in files]  # (L,) each
    try:
        return list(decode_jpeg(raw, mode="RGB", device=dev))
    except Exception:
        pass
    decoded: list[Tensor | None] = []
    for r in raw:
        try:
            decoded.append(decode_jpeg(r, mode="RGB", device=dev))
        except Exception:
            decoded.append(None)
    return decoded
