"""Self-critical training: the CIDEr-D reward against a whole SCST step and a cross-entropy step."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from benchmarks import timing
from benchmarks.common import peak_rss_mb, random_captions, random_vocab
from captioner.data.vocab import END_ID, SPECIALS
from captioner.decoding import sample
from captioner.models import DecoderConfig, EncoderConfig
from captioner.system import CaptioningSystem, ScstConfig


@dataclass
class _References:
    """Stands in for the data module at the start of fit: the training split's references."""

    refs: dict[int, list[str]]

    def references(self, split: str) -> dict[int, list[str]]:
        assert split == "train", split
        return self.refs


@dataclass
class _Fit:
    """What ``CaptioningSystem.on_fit_start`` reads of the trainer."""

    datamodule: _References


def bench_scst(
    *,
    batch: int = 64,
    samples: int = 5,
    max_length: int = 16,
    vocab: int = 10000,
    grid: int = 14,
    decoder_dim: int = 512,
    references: int = 5,
    reference_length: int = 11,
    attention: str = "soft",
    baseline: str = "mean",
    repeats: int = 3,
) -> dict:
    """One SCST training step (sampling ``batch`` x ``samples`` captions, their CIDEr-D reward,
    the teacher-forced re-scoring, backward and Adam's step) with random weights on random
    features (ResNet-101's 2048 channels), against the reward alone and against one
    cross-entropy step on the same batch (CPU). The references are
    random words of the vocabulary; ``reward_cold_s`` includes caching their vectors, which
    training does once per image."""
    torch.manual_seed(0)
    words = random_vocab(vocab)
    system = CaptioningSystem(
        EncoderConfig(name="resnet101", grid=grid),
        DecoderConfig(attention=attention, embed_dim=decoder_dim, attention_dim=decoder_dim, decoder_dim=decoder_dim),
        vocab=words.to_list(),
        scst=ScstConfig(enabled=True, n_samples=samples, baseline=baseline, max_length=max_length),
    )
    system.train()
    rng = random.Random(0)
    pool = words.to_list()[len(SPECIALS):]
    refs = {i: [" ".join(rng.choices(pool[:1000], k=reference_length)) for _ in range(references)]
            for i in range(batch)}
    # The reward is built as fit builds it: from the data module's training references, at the
    # start of fit.
    system.trainer = _Fit(_References(refs))
    system.on_fit_start()
    system.trainer = None
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, grid * grid, 2048, generator=g)
    captions, lengths = random_captions(batch, reference_length + 2, vocab, g)
    data = {"features": features, "captions": captions, "lengths": lengths, "image_ids": torch.arange(batch)}
    opt = torch.optim.Adam(system.model.decoder.parameters(), lr=5e-5)

    def step(loss_fn=lambda batch: system.objective.loss(system, batch)) -> None:
        loss = loss_fn(data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        tokens = sample(system.model.decoder, features.repeat_interleave(samples, 0), max_length).tokens
    ids = [i for i in range(batch) for _ in range(samples)]
    start = time.perf_counter()
    system.objective.rewards(system.vocab, tokens, ids)
    cold = time.perf_counter() - start
    cpu = torch.device("cpu")
    step_s = timing.median_seconds(step, repeats, cpu)
    # the cross-entropy step it replaces: one teacher-forced pass over the batch's references
    ce_step_s = timing.median_seconds(lambda: step(system.compute_loss), repeats, cpu)
    reward_s = timing.median_seconds(lambda: system.objective.rewards(system.vocab, tokens, ids), repeats, cpu)
    return {"scst_step_s": step_s, "ce_step_s": ce_step_s, "scst_over_ce": step_s / ce_step_s,
            "reward_s": reward_s, "reward_cold_s": cold,
            "reward_share_of_step": reward_s / step_s, "captions_per_step": batch * samples,
            "mean_sample_words": float((tokens > END_ID).sum(1).float().mean()), "peak_rss_mb": peak_rss_mb()}
