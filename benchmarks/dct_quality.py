"""What decoding large JPEGs at reduced size (``jpeg_dct_scaling``) changes in what a model sees:
a torchvision ResNet's features, and a trained ``shapes`` model's greedy captions, each with the
photos decoded whole and DCT-scaled."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import write_images
from captioner.checkpoint import load_checkpoint
from captioner.data.images import dct_scale
from captioner.data.transforms import Preprocessing
from captioner.inference import CaptionPipeline
from captioner.models import EncoderConfig, create_encoder


def _both(pre: Preprocessing) -> tuple[Preprocessing, Preprocessing]:
    return replace(pre, jpeg_dct_scaling=False), replace(pre, jpeg_dct_scaling=True)


def feature_difference(*, encoder: str = "resnet50", image_size: int = 256, photos: int = 8,
                       size: tuple[int, int] = (4000, 3000)) -> dict:
    """Mean (and largest) relative L2 difference of the encoder's region features (N, D) per
    photo, DCT-scaled against whole; and of its input pixels, in 8-bit levels. Random weights
    (``pretrained: false``): this machine has no internet to fetch ImageNet's."""
    torch.manual_seed(0)
    enc = create_encoder(EncoderConfig(name=encoder, pretrained=False, image_size=image_size)).eval()
    whole, scaled = _both(enc.preprocessing)
    rel, levels = [], []
    with tempfile.TemporaryDirectory(prefix="captioner-dct-") as tmp:
        for path in write_images(Path(tmp), photos, size):
            a, b = whole.load(path), scaled.load(path)  # (3, S, S) each
            std = torch.tensor(whole.std).view(3, 1, 1)
            levels.append(float(((a - b) * std * 255).abs().mean()))
            with torch.inference_mode():
                fa, _ = enc(a.unsqueeze(0))  # (1, N, D)
                fb, _ = enc(b.unsqueeze(0))
            rel.append(float((fa - fb).norm() / fa.norm()))
    return {"encoder": f"{encoder} (random weights)", "image_size": image_size, "photos": photos,
            "dct_scale": dct_scale(*size, image_size), "feature_rel_diff_mean": round(float(np.mean(rel)), 4),
            "feature_rel_diff_max": round(float(np.max(rel)), 4),
            "input_levels_mean": round(float(np.mean(levels)), 3)}


def caption_agreement(checkpoint: str | Path, shapes_dir: str | Path, *, images: int = 400,
                      size: tuple[int, int] = (4000, 3000), batch_size: int = 50) -> dict:
    """The ``test`` images of a ``shapes`` data set, upscaled (bicubic) to ``size`` and saved as
    JPEGs (quality 90), captioned greedily with the photos decoded whole and DCT-scaled: the share
    of identical captions, and of each with the caption of the original PNG."""
    loaded = load_checkpoint(checkpoint, device="cpu")
    whole, scaled = _both(loaded.preprocessing)
    shapes_dir = Path(shapes_dir)
    entries = json.loads((shapes_dir / "dataset.json").read_text())["images"]
    pngs = [shapes_dir / "images" / e["filename"] for e in entries if e["split"] == "test"][:images]
    captions: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="captioner-dct-") as tmp:
        jpegs = []
        for png in pngs:
            path = Path(tmp) / (png.stem + ".jpg")
            with Image.open(png) as im:
                im.convert("RGB").resize(size, Image.BICUBIC).save(path, quality=90)
            jpegs.append(path)
        for name, files, pre in (("png", pngs, whole), ("whole", jpegs, whole), ("dct_scaled", jpegs, scaled)):
            pipe = CaptionPipeline(replace(loaded, preprocessing=pre), beam_size=1)
            captions[name] = [c.text for c in pipe(files, batch_size=batch_size)]

    def share(a: str, b: str) -> float:
        return round(sum(x == y for x, y in zip(captions[a], captions[b], strict=True)) / len(pngs), 4)

    return {"images": len(pngs), "size": list(size), "dct_scale": dct_scale(*size, whole.image_size),
            "identical_whole_vs_dct_scaled": share("whole", "dct_scaled"),
            "whole_vs_png": share("whole", "png"), "dct_scaled_vs_png": share("dct_scaled", "png"),
            "distinct_captions": len(set(captions["whole"]))}
