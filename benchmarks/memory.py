"""Resident memory while ``captioner caption``'s path streams many images."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import current_rss_mb, peak_rss_mb, random_model, write_images
from captioner.inference import CaptionPipeline


def bench_memory(*, images: int = 1000, checkpoints: Sequence[int] = (100, 500, 1000), batch_size: int = 16,
                 image_size: int = 32) -> dict:
    """Resident memory while ``CaptionPipeline.stream`` streams ``images`` small images through a tiny
    random model; sampled after the given numbers of images. Flat figures mean streaming."""
    loaded = random_model(encoder="shapes_cnn", image_size=image_size, vocab=50, decoder_dim=32, grid=4, channels=16)
    pipeline = CaptionPipeline(loaded, beam_size=3, max_length=12)
    marks = sorted({min(c, images) for c in checkpoints})
    rss, peak = {}, {}
    with tempfile.TemporaryDirectory(prefix="captioner-mem-") as tmp:
        paths = write_images(Path(tmp), images, (image_size, image_size), fmt="PNG")
        stream = pipeline.stream(iter(paths), batch_size=batch_size)
        for done, result in enumerate(stream, start=1):
            assert isinstance(result, list), result  # its captions, not an ImageError
            if done in marks:
                rss[str(done)] = round(current_rss_mb(), 1)
                peak[str(done)] = round(peak_rss_mb(), 1)
    first, last = str(marks[0]), str(marks[-1])
    return {"images": images, "rss_mb": rss, "peak_rss_mb": peak,
            "peak_growth_mb": round(peak[last] - peak[first], 1)}
