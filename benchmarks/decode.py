"""CPU image decoding: PIL against TorchCodec, and large JPEGs decoded whole against decoded at
reduced size (JPEG DCT scaling), each pair taking turns in every round on the same files."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from benchmarks import timing
from benchmarks.common import write_images
from captioner.data.images import dct_scale, load_image
from captioner.data.jpeg import torchcodec_missing
from captioner.data.transforms import Preprocessing

# the photo sizes decoded by default: COCO's, a 2-MP and a 12-MP (phone) photo
JPEG_SIZES = ((640, 480), (1600, 1200), (4000, 3000))


def _rate(files: int, seconds: list[float]) -> dict:
    """Images per second: the median round's, and the spread (slowest, fastest round)."""
    return {"per_s": round(files / statistics.median(seconds), 1),
            "range": [round(files / max(seconds), 1), round(files / min(seconds), 1)]}


def _compare(fns: dict[str, Callable[[], object]], files: int, repeats: int) -> dict:
    """Ways of decoding the same files, taking turns within each round: each one's images/s, and
    its speed over the first's per round (median and range), which a shared machine's load
    cancels out of."""
    names = list(fns)
    times = timing.alternating(list(fns.values()), repeats, torch.device("cpu"))
    out: dict = {}
    for name, t in zip(names, times, strict=True):
        out[name] = _rate(files, t)
        if name != names[0]:
            ratios = [a / b for a, b in zip(times[0], t, strict=True)]
            out[name]["vs_" + names[0]] = round(statistics.median(ratios), 2)
            out[name]["vs_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    return out


def _all(paths: Sequence[Path], fn: Callable[[Path], object]) -> Callable[[], None]:
    def run() -> None:
        for p in paths:
            fn(p)
    return run


def bench_decode(*, files: int = 8, shapes: int = 64, repeats: int = 5, image_size: int = 256,
                 jpeg_sizes: Sequence[tuple[int, int]] = JPEG_SIZES) -> dict:
    """Per kind of file: ``load_image`` (decode to an RGB image) with PIL alone against TorchCodec
    where installed; and for JPEGs at least twice ``image_size`` on both sides, the whole
    ``Preprocessing.load`` (decode, resize to ``image_size``, normalise) with the JPEG decoded
    whole by PIL (before), whole as today (TorchCodec where installed, ``jpeg_dct_scaling:
    false``) and at reduced size (``jpeg_dct_scaling: true``)."""
    from captioner.data.shapes import ShapesConfig, generate_shapes

    have_torchcodec = torchcodec_missing() is None
    out: dict = {"torchcodec": have_torchcodec}
    scaled = Preprocessing(image_size=image_size)
    whole = replace(scaled, jpeg_dct_scaling=False)
    with tempfile.TemporaryDirectory(prefix="captioner-decode-") as tmp:
        root = Path(tmp)
        shapes_dir = generate_shapes(root / "shapes", ShapesConfig(num_images=shapes))
        cases = {"shapes_png_64": sorted((shapes_dir / "images").glob("*.png"))}
        for w, h in jpeg_sizes:
            cases[f"jpeg_{w}x{h}"] = write_images(root / f"{w}x{h}", files, (w, h))
        for name, paths in cases.items():
            fig: dict = {"files": len(paths)}
            if have_torchcodec:
                fig["decode"] = _compare({"pil": _all(paths, lambda p: load_image(p, torchcodec=False)),
                                          "torchcodec": _all(paths, load_image)}, len(paths), repeats)
            with Image.open(paths[0]) as first:
                w, h = first.size
            if name.startswith("jpeg") and dct_scale(w, h, image_size) > 1:
                ways = {"whole_pil": _all(paths, lambda p: whole(load_image(p, torchcodec=False))),
                        "whole": _all(paths, whole.load),
                        "dct_scaled": _all(paths, scaled.load)}
                if not have_torchcodec:
                    del ways["whole"]
                fig[f"decode_resize_{image_size}"] = _compare(ways, len(paths), repeats)
                fig["dct_scale"] = dct_scale(w, h, image_size)
            out[name] = fig
    return out
