"""An encoder's training step: ``stem: rgb`` against ``stem: split``."""

from __future__ import annotations

import statistics

import torch

from benchmarks import timing
from captioner.models import EncoderConfig, create_encoder


def bench_encoder(*, encoder: str = "shapes_cnn", image_size: int = 64, grid: int = 8, channels: int = 64,
                  batch: int = 64, trainable_blocks: int = -1, repeats: int = 5, device: str = "cpu") -> dict:
    """An encoder's training step (forward and backward; only the forward when nothing in it
    trains) with ``stem: rgb`` against ``stem: split``, the two taking turns: ms per batch and
    the median of the rounds' ratios."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(dev)  # (B, 3, S, S)
    steps = []
    for stem in ("rgb", "split"):
        torch.manual_seed(0)
        enc = create_encoder(EncoderConfig(name=encoder, image_size=image_size, grid=grid, channels=channels,
                                           trainable_blocks=trainable_blocks, stem=stem)).to(dev).train()

        def step(enc=enc) -> None:
            regions, _ = enc(images)  # (B, N, D)
            if regions.requires_grad:
                regions.square().mean().backward()

        steps.append(step)
    rgb, split = timing.alternating(steps, repeats, dev)
    return {"rgb_ms_per_batch": 1000 * statistics.median(rgb), "split_ms_per_batch": 1000 * statistics.median(split),
            "split_over_rgb": statistics.median(s / r for r, s in zip(rgb, split, strict=True))}
