"""Sampling with temperature, top-k and top-p (nucleus), all images of the batch at once."""

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
    top_p: float = 1.0,
) -> Generated:
    """Draw each word from softmax(logits / temperature), restricted to the top k when k > 0
    and to the smallest set of words whose probability reaches ``top_p`` when it is below 1.

    ``scores`` and ``token_logprobs`` are the log-probabilities of the drawn words under the model
    (temperature 1, no truncation). ``generator`` (on the features' device) makes the draws
    reproducible without touching the global random state.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def draw(logp: Tensor) -> Tensor:
        logits = logp / temperature  # (B, V)
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # drop a word when the more likely ones already reach top_p (the first always stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return single_path(decoder, features, draw, max_length, suppress_unk, min_length, early_stop=True)
