"""Greedy decoding, all images of the batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.decoding.common import Generated, single_path
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
    return single_path(decoder, features, lambda logp: logp.max(dim=-1).indices, max_length,
                       suppress_unk, min_length, early_stop)
