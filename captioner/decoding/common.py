"""What every decoding strategy returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID


@dataclass
class Generated:
    """Generated captions for a batch of B images.

    ``tokens`` (B, T) are the generated ids after ``<start>``: words, then ``<end>`` (when it was
    emitted), then ``<pad>``. ``lengths`` (B,) count the words, ``<end>`` excluded.
    ``alphas`` (B, T, N): the attention of the step that emitted each token.
    ``scores`` (B,): the caption's total log-probability (``<end>`` included), or the
    length-normalised score where beam search was asked for it.
    ``nbest``: for beam search, per image the K hypotheses as (token ids, score), best first.
    """

    tokens: Tensor
    lengths: Tensor
    scores: Tensor
    alphas: Tensor
    nbest: list[list[tuple[list[int], float]]] | None = field(default=None)

    def words(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.lengths[i])].tolist()


def word_lengths(tokens: Tensor) -> Tensor:
    """Number of tokens before the first ``<end>``/``<pad>`` per row: (B, T) -> (B,)."""
    stop = (tokens == END_ID) | (tokens == PAD_ID)
    t = tokens.size(1)
    idx = torch.arange(t, device=tokens.device).expand_as(tokens)
    return torch.where(stop, idx, torch.full_like(idx, t)).min(dim=1).values


def expand_cache(cache: tuple[Tensor, ...], k: int) -> tuple[Tensor, ...]:
    return tuple(c.repeat_interleave(k, dim=0) for c in cache)
