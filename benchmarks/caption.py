"""The encoder alone against the whole ``captioner caption`` path."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import timing
from benchmarks.common import peak_rss_mb, random_model, write_images
from captioner.inference import CaptionPipeline, autocast


def bench_caption(
    *,
    encoder: str = "resnet101",
    image_size: int = 256,
    beam_size: int = 5,
    images: int = 32,
    batch_size: int = 16,
    max_length: int = 20,
    vocab: int = 10000,
    decoder_dim: int = 512,
    source_size: tuple[int, int] = (640, 480),
    repeats: int = 3,
    device: str = "cpu",
    precision: str = "fp32",
    num_workers: int | None = None,
    jpeg_decode: str = "auto",
    quantize: str = "none",
    cuda_graph: bool | None = None,
) -> dict:
    """Per image: the encoder's forward pass alone vs ``CaptionPipeline.stream`` (read +
    preprocess + encode + beam search), on ``images`` generated JPEG files."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    loaded = random_model(encoder=encoder, image_size=image_size, vocab=vocab, decoder_dim=decoder_dim, device=device)
    pipeline = CaptionPipeline(loaded, beam_size=beam_size, max_length=max_length, precision=precision,
                               quantize=quantize, cuda_graph=cuda_graph)
    threads = pipeline.reader_threads(num_workers)  # as `captioner caption` chooses them
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        paths = write_images(Path(tmp), images, source_size)
        model = loaded.model
        batches = [torch.randn(min(batch_size, images - i), 3, image_size, image_size)
                   for i in range(0, images, batch_size)]

        @torch.inference_mode()
        def encode_only() -> None:
            with autocast(dev, precision):
                for x in batches:
                    model.encode(x.to(dev))

        def whole_path() -> None:
            for result in pipeline.stream(paths, batch_size=batch_size, num_workers=threads,
                                          jpeg_decode=jpeg_decode):
                assert isinstance(result, list), result  # its captions, not an ImageError

        # Alternated, so that a machine that slows down or speeds up during the run moves both
        # timings alike: the ratio is the median of the per-round ratios.
        enc, cap = timing.alternating((encode_only, whole_path), repeats, dev)
    enc_s, cap_s = statistics.median(enc), statistics.median(cap)
    return {
        "encoder_ms_per_image": 1000 * enc_s / images,
        "caption_ms_per_image": 1000 * cap_s / images,
        "ratio": statistics.median(c / e for e, c in zip(enc, cap, strict=True)),
        "reader_threads": threads,
        "jpeg_on_device": pipeline.jpeg_on_device(jpeg_decode),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
