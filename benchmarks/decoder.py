"""The decoder: a training step, batched beam search and greedy decoding at given shapes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from benchmarks import timing
from benchmarks.common import peak_rss_mb, random_captions
from captioner.decoding import beam_search, greedy
from captioner.inference import autocast
from captioner.models import AttentionDecoder, DecoderConfig
from captioner.models.quantize import quantize_decoder
from captioner.training import LossConfig, caption_loss
from captioner.training.optim import OptimConfig, build_optimizer

PARTS = ("train", "beam", "greedy")


def bench_decoder(
    *,
    encoder_dim: int = 2048,
    grid: int = 14,
    vocab: int = 10000,
    batch: int = 32,
    embed_dim: int = 512,
    attention_dim: int = 512,
    decoder_dim: int = 512,
    caption_length: int = 22,
    beam_size: int = 5,
    max_steps: int = 20,
    attention: str = "soft",
    repeats: int = 3,
    device: str = "cpu",
    compile: bool = False,
    parts: Sequence[str] = PARTS,
    precision: str = "fp32",
    quantize: str = "none",
    cuda_graph: bool | None = None,
    optimizer: str = "adam",
) -> dict:
    """Decoder training step, beam search and greedy decoding at the given shapes;
    ``precision="bf16"`` runs them under bf16 autocast (as ``--trainer.precision bf16-mixed`` does);
    ``quantize="int8"`` decodes with int8 weights (training is unchanged); ``cuda_graph=False``
    keeps decoding on a GPU from replaying its steps as a CUDA graph; ``optimizer`` names the
    training step's (``model.optim.optimizer``)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = DecoderConfig(attention=attention, embed_dim=embed_dim, attention_dim=attention_dim,
                        decoder_dim=decoder_dim)
    decoder = AttentionDecoder(cfg, vocab, encoder_dim).to(dev)
    features = torch.randn(batch, grid * grid, encoder_dim, generator=g).to(dev)  # (B, N, D)
    captions, lengths = (t.to(dev) for t in random_captions(batch, caption_length, vocab, g))
    forward = torch.compile(decoder) if compile else decoder
    result: dict = {}

    if "train" in parts:
        # the optimiser fit builds (model.optim.optimizer), over a model of this decoder alone
        opt = build_optimizer(nn.ModuleDict({"encoder": nn.Identity(), "decoder": decoder}),
                              OptimConfig(lr=4e-4, optimizer=optimizer), lambda: 1.0)
        decoder.train()

        def train_step() -> None:
            with autocast(dev, precision):
                # the loss of CaptioningSystem with its defaults (lambda = 1)
                loss = caption_loss(forward(features, captions, lengths), captions, LossConfig()).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        secs = timing.median_seconds(train_step, repeats, dev)
        result.update(train_s_per_step=secs, train_captions_per_s=batch / secs)
        del opt

    decoder.eval()
    if compile:  # decoding calls decoder.step once per word
        decoder.step = torch.compile(decoder.step)
    decoding = quantize_decoder(decoder, quantize)
    if "beam" in parts:
        with torch.inference_mode(), autocast(dev, precision):
            secs = timing.median_seconds(
                lambda: beam_search(decoding, features, beam_size, max_steps, early_stop=False, cuda_graph=cuda_graph),
                repeats, dev)
        result.update(beam_ms_per_image=1000 * secs / batch, beam_images_per_s=batch / secs)
    if "greedy" in parts:
        with torch.inference_mode(), autocast(dev, precision):
            secs = timing.median_seconds(
                lambda: greedy(decoding, features, max_steps, early_stop=False, cuda_graph=cuda_graph), repeats, dev)
        result.update(greedy_ms_per_image=1000 * secs / batch, greedy_images_per_s=batch / secs)
    result["peak_rss_mb"] = peak_rss_mb()
    return result
