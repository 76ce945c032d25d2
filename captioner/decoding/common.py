"""What every decoding strategy returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from captioner.models.decoder import AttentionDecoder


@dataclass
class Generated:
    """Generated captions for a batch of B images.

    ``tokens`` (B, T) are the generated ids after ``<start>``: words, then ``<end>`` (when it was
    emitted), then ``<pad>``. ``lengths`` (B,) count the words, ``<end>`` excluded.
    ``alphas`` (B, T, N): the attention of the step that emitted each token.
    ``scores`` (B,): the caption's total log-probability (``<end>`` included), or the
    length-normalised score where beam search was asked for it.
    ``nbest``: for beam search, per image the K hypotheses as (token ids, score), best first.
    ``token_logprobs`` (B, T): the log-probability the model gave each token of ``tokens`` when
    it was chosen (temperature 1; 0 for the ``<pad>`` after ``<end>``): the scores' summands.
    ``beams``: for beam search, all K hypotheses per image as one ``Generated`` of B*K rows
    (image i's j-th best at row i*K + j), ``tokens``, ``alphas`` and ``token_logprobs`` included.
    """

    tokens: Tensor
    lengths: Tensor
    scores: Tensor
    alphas: Tensor
    nbest: list[list[tuple[list[int], float]]] | None = field(default=None)
    token_logprobs: Tensor | None = field(default=None)
    beams: Generated | None = field(default=None)

    def words(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.lengths[i])].tolist()


def word_lengths(tokens: Tensor) -> Tensor:
    """Number of tokens before the first ``<end>``/``<pad>`` per row: (B, T) -> (B,)."""
    stop = (tokens == END_ID) | (tokens == PAD_ID)
    t = tokens.size(1)
    idx = torch.arange(t, device=tokens.device).expand_as(tokens)
    return torch.where(stop, idx, torch.full_like(idx, t)).min(dim=1).values


def ban_tokens(logp: Tensor, step: int, suppress_unk: bool, min_length: int) -> None:
    """In place, on (..., V) log-probabilities: never ``<pad>`` or ``<start>`` (not words; a
    ``<pad>`` would end the caption unseen), no ``<unk>`` when suppressed, and no ``<end>``
    before ``min_length`` words (an empty caption is the classic failure of beam search)."""
    logp[..., PAD_ID] = float("-inf")
    logp[..., START_ID] = float("-inf")
    if suppress_unk:
        logp[..., UNK_ID] = float("-inf")
    if step < min_length:
        logp[..., END_ID] = float("-inf")


def single_path(
    decoder: AttentionDecoder,
    features: Tensor,
    choose: Callable[[Tensor], Tensor],
    max_length: int,
    suppress_unk: bool,
    min_length: int,
    early_stop: bool,
) -> Generated:
    """One caption per image, the next word picked by ``choose(logp (B, V)) -> (B,)``; the
    loop shared by greedy decoding and sampling. Scores sum the picked words' log-probabilities."""
    b = features.size(0)
    cache = decoder.precompute(features)
    state = decoder.init_state(features)
    prev = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    done = torch.zeros(b, dtype=torch.bool, device=features.device)
    scores = torch.zeros(b, device=features.device)
    tokens, alphas, picked = [], [], []
    for step in range(max_length):
        logp, state, alpha = decoder.step(prev, state, cache)  # (B, V), .., (B, N)
        ban_tokens(logp, step, suppress_unk, min_length)
        tok = torch.where(done, torch.full_like(prev, PAD_ID), choose(logp))
        tok_logp = torch.where(done, torch.zeros_like(scores), logp.gather(1, tok.unsqueeze(1)).squeeze(1))
        scores += tok_logp
        tokens.append(tok)
        alphas.append(alpha)
        picked.append(tok_logp)
        done |= tok == END_ID
        prev = tok
        if early_stop and bool(done.all()):
            break
    toks = torch.stack(tokens, 1)  # (B, T)
    return Generated(toks, word_lengths(toks), scores, torch.stack(alphas, 1),
                     token_logprobs=torch.stack(picked, 1))

