"""Sampling with temperature and top-k, all images of the batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.decoding.common import Generated, single_path
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

    def draw(logp: Tensor) -> Tensor:
        logits = logp / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)

    return single_path(decoder, features, draw, max_length, suppress_unk, min_length, early_stop=True)
