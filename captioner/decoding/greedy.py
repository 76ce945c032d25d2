"""Greedy decoding, all images of the batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.decoding.beam import beam_search, graph_replay
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
    cuda_graph: bool | None = None,
) -> Generated:
    """The most likely word at each step. features (B, N, D); at most ``max_length`` tokens.

    Where beam search replays its step as a CUDA graph (a GPU, ``cuda_graph`` not False), this
    runs as beam search of width 1, which gives the same captions and scores and replays too."""
    if graph_replay(cuda_graph, features.device, max_length, decoder):
        out = beam_search(decoder, features, 1, max_length, 0.0, suppress_unk, min_length, early_stop, cuda_graph)
        return Generated(out.tokens, out.lengths, out.scores, out.alphas, token_logprobs=out.token_logprobs)
    return single_path(decoder, features, lambda logp: logp.max(dim=-1).indices, max_length,
                       suppress_unk, min_length, early_stop)
