"""A whole training step of ``CaptioningSystem`` (encoder, decoder, loss with attention supervision,
backward, gradient clipping, the optimiser's step: Adam, or Muon with AdamW) with per-step speed
settings taking turns."""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from benchmarks import timing
from captioner.data.vocab import END_ID, SPECIALS, START_ID
from captioner.inference import autocast
from captioner.models import DecoderConfig, EncoderConfig
from captioner.system import CaptioningSystem
from captioner.training import LossConfig
from captioner.training.optim import OptimConfig, build_optimizer

# name -> (model.encoder.channels_last, precision, model.optim.optimizer); "fp32" is the yardstick
VARIANTS = {"fp32": (False, "fp32", "adam"), "channels_last": (True, "fp32", "adam"), "bf16": (False, "bf16", "adam"),
            "channels_last+bf16": (True, "bf16", "adam"), "muon": (False, "fp32", "muon"),
            "channels_last+muon": (True, "fp32", "muon")}


def bench_step(*, variants: tuple[str, ...] = tuple(VARIANTS), batch: int = 64, image_size: int = 64, grid: int = 8,
               channels: int = 64, vocab: int = 40, caption_length: int = 14, decoder_dim: int = 256,
               attention: str = "soft", repeats: int = 5) -> dict:
    """ms per step of each variant (configs/shapes.yaml's model by default, random images and
    captions) and the median of the rounds' ratios to ``fp32``, the variants taking turns."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)  # (B, 3, S, S)
    captions = torch.randint(len(SPECIALS), vocab, (batch, caption_length), generator=g)
    lengths = torch.randint(caption_length // 2, caption_length + 1, (batch,), generator=g)
    captions[:, 0] = START_ID
    for i, n in enumerate(lengths.tolist()):
        captions[i, n - 1], captions[i, n:] = END_ID, 0
    data = {"images": images, "captions": captions, "lengths": lengths,
            "token_objects": torch.randint(-1, 3, (batch, caption_length - 1), generator=g),  # (B, T)
            "object_masks": torch.rand(batch, 3, image_size, image_size, generator=g) > 0.9}  # (B, K, S, S)
    words = [*SPECIALS, *(f"w{i}" for i in range(vocab - len(SPECIALS)))]
    encoder = EncoderConfig(name="shapes_cnn", grid=grid, channels=channels, image_size=image_size, position="append")
    decoder = DecoderConfig(attention=attention, embed_dim=128, attention_dim=128, decoder_dim=decoder_dim,
                            dropout=0.2, gate_bias=2.0)
    steps = []
    for name in variants:
        channels_last, precision, optimizer = VARIANTS[name]
        torch.manual_seed(0)
        system = CaptioningSystem(encoder=replace(encoder, channels_last=channels_last), decoder=decoder,
                                  loss=LossConfig(doubly_stochastic=0.0, attention_supervision=1.0), vocab=words).train()
        opt = build_optimizer(system.model, OptimConfig(lr=1e-3, optimizer=optimizer), lambda: 1.0)

        def step(system=system, opt=opt, precision=precision) -> None:
            with autocast("cpu", precision):
                loss = system.objective.loss(system, data)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(system.model.parameters(), 5.0)
            opt.step()

        steps.append(step)
    times = timing.alternating(steps, repeats, torch.device("cpu"))
    out = {f"{n}_ms_per_step": 1000 * statistics.median(t) for n, t in zip(variants, times, strict=True)}
    if "fp32" in variants:
        base = times[variants.index("fp32")]
        for n, t in zip(variants, times, strict=True):
            if n != "fp32":
                out[f"{n}_over_fp32"] = statistics.median(a / b for a, b in zip(t, base, strict=True))
    return out
