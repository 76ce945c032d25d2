"""Greedy decoding, all images of the batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from captioner.decoding.common import Generated, word_lengths
from captioner.models.decoder import AttentionDecoder


@torch.no_grad()
def greedy(
    decoder: AttentionDecoder,
    features: Tensor,
    max_length: int = 20,
    suppress_unk: bool = False,
    min_length: int = 1,
    early_stop: bool = True,
) -> Generated:
    """The most likely word at each step. features (B, N, D); at most ``max_length`` tokens."""
    b = features.size(0)
    cache = decoder.precompute(features)
    state = decoder.init_state(features)
    prev = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    done = torch.zeros(b, dtype=torch.bool, device=features.device)
    scores = torch.zeros(b, device=features.device)
    tokens, alphas = [], []
    for step in range(max_length):
        logp, state, alpha = decoder.step(prev, state, cache)  # (B, V), .., (B, N)
        if suppress_unk:
            logp[:, UNK_ID] = float("-inf")
        if step < min_length:  # no empty caption, the classic failure of beam search
            logp[:, END_ID] = float("-inf")
        best, tok = logp.max(dim=-1)
        tok = torch.where(done, torch.full_like(tok, PAD_ID), tok)
        scores += torch.where(done, torch.zeros_like(best), best)
        tokens.append(tok)
        alphas.append(alpha)
        done |= tok == END_ID
        prev = tok
        if early_stop and bool(done.all()):
            break
    toks = torch.stack(tokens, 1)  # (B, T)
    return Generated(toks, word_lengths(toks), scores, torch.stack(alphas, 1))
