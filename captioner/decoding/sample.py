"""Sampling with temperature and top-k, all images of the batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from captioner.decoding.common import Generated, word_lengths
from captioner.models.decoder import AttentionDecoder


@torch.no_grad()
def sample(
    decoder: AttentionDecoder,
    features: Tensor,
    max_length: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    suppress_unk: bool = False,
    min_length: int = 1,
    generator: torch.Generator | None = None,
) -> Generated:
    """Draw each word from softmax(logits / temperature), restricted to the top k when k > 0.

    ``scores`` are the log-probabilities of the drawn words under the model (temperature 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = features.size(0)
    cache = decoder.precompute(features)
    state = decoder.init_state(features)
    prev = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    done = torch.zeros(b, dtype=torch.bool, device=features.device)
    scores = torch.zeros(b, device=features.device)
    tokens, alphas = [], []
    for step in range(max_length):
        logp, state, alpha = decoder.step(prev, state, cache)
        if suppress_unk:
            logp[:, UNK_ID] = float("-inf")
        if step < min_length:  # no empty caption, the classic failure of beam search
            logp[:, END_ID] = float("-inf")
        logits = logp / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, PAD_ID), tok)
        scores += torch.where(done, torch.zeros_like(scores), logp.gather(1, tok.unsqueeze(1)).squeeze(1))
        tokens.append(tok)
        alphas.append(alpha)
        done |= tok == END_ID
        prev = tok
        if bool(done.all()):
            break
    toks = torch.stack(tokens, 1)
    return Generated(toks, word_lengths(toks), scores, torch.stack(alphas, 1))
