"""Greedy decoding, all images of the batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID, START_ID
from captioner.decoding.common import Generated, ban_tokens, single_path, word_lengths
from captioner.decoding.cuda_graph import DecoderGraphs, Steps
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

    On a GPU (``cuda_graph`` not False) the steps write into tensors allocated once and are
    replayed as a CUDA graph (``captioner.decoding.cuda_graph``); the same captions and scores as
    the plain loop that runs everywhere else."""
    graphs = DecoderGraphs.for_search(decoder, cuda_graph, features.device, max_length)
    if graphs is None:
        return single_path(decoder, features, lambda logp: logp.max(dim=-1).indices, max_length,
                           suppress_unk, min_length, early_stop)
    return _fixed_path(decoder, features, graphs, max_length, suppress_unk, min_length, early_stop)


def _fixed_path(decoder: AttentionDecoder, features: Tensor, graphs: DecoderGraphs, max_length: int,
                suppress_unk: bool, min_length: int, early_stop: bool) -> Generated:
    """``single_path``'s greedy loop on a ``_Path``: step 0 eagerly, the later steps replayed."""
    b, n, _ = features.shape
    cache = decoder.precompute(features)  # (B, ...)
    start = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    logp, (h, c), alpha0 = decoder.step(start, decoder.init_state(features), cache)  # (B, V), (B, H) x2, (B, N)
    ban_tokens(logp, 0, suppress_unk, min_length)
    # what single_path's scores (float32) and the picked log-probabilities add up to
    logp_dtype = torch.promote_types(torch.float32, logp.dtype)
    shape = ("greedy", b, n, logp.size(-1), max_length, suppress_unk, logp_dtype)
    search = Steps(graphs, decoder, shape, cache, h, alpha0.dtype,
                   lambda held: _Path.allocate(held, h, logp_dtype, alpha0.dtype, n, max_length), "greedy")
    path = search.state
    try:
        path.begin(cache, logp, (h, c), alpha0)
        steps = search.run(lambda step: path.advance(decoder, step, suppress_unk, min_length), path.done,
                           max_length, min_length, early_stop)
        # copies: the next search of this shape reuses the buffers
        tokens = path.words[:steps].t().clone(memory_format=torch.contiguous_format)  # (B, T)
        alphas = path.maps[:steps].transpose(0, 1).clone(memory_format=torch.contiguous_format)  # (B, T, N)
        logps = path.logps[:steps].t().clone(memory_format=torch.contiguous_format)  # (B, T)
        scores = path.scores.clone()
    finally:
        search.release()
    return Generated(tokens, word_lengths(tokens), scores, alphas, token_logprobs=logps)


@dataclass
class _Path:
    """The state of a greedy search, updated in place by ``advance``: fixed shapes and addresses."""

    cache: tuple[Tensor, ...]  # the attention's image cache, (B, ...) each
    h: Tensor  # (B, H)
    c: Tensor  # (B, H)
    prev: Tensor  # (B,) the last word
    done: Tensor  # (B,) <end> emitted
    scores: Tensor  # (B,) the sum of the chosen words' log-probabilities
    words: Tensor  # (T, B) the word step t chose (<pad> after <end>)
    logps: Tensor  # (T, B) its log-probability (0 after <end>)
    maps: Tensor  # (T, B, N) the attention of step t
    t_now: Tensor  # () the step _take() writes

    @classmethod
    def allocate(cls, cache: tuple[Tensor, ...], h: Tensor, logp_dtype: torch.dtype, map_dtype: torch.dtype,
                 n: int, max_length: int) -> _Path:
        b, dev = h.size(0), h.device
        long = {"dtype": torch.long, "device": dev}
        return cls(
            cache=cache, h=torch.empty_like(h), c=torch.empty_like(h), prev=torch.empty(b, **long),
            done=torch.empty(b, dtype=torch.bool, device=dev), scores=torch.empty(b, device=dev),
            words=torch.empty(max_length, b, **long), logps=torch.empty(max_length, b, dtype=logp_dtype, device=dev),
            maps=torch.empty(max_length, b, n, dtype=map_dtype, device=dev), t_now=torch.empty((), **long),
        )

    def begin(self, cache: tuple[Tensor, ...], logp: Tensor, state: tuple[Tensor, Tensor], alpha: Tensor) -> None:
        """Step 0's outcome: logp (B, V) with its bans, the state after it, alpha (B, N)."""
        for mine, new in zip(self.cache, cache, strict=True):
            if mine is not new:
                mine.copy_(new)
        self.done.fill_(False)
        self.scores.zero_()
        self.t_now.fill_(0)
        self._take(logp, state, alpha)

    def advance(self, decoder: AttentionDecoder, step: int, suppress_unk: bool, min_length: int) -> None:
        logp, state, alpha = decoder.step(self.prev, (self.h, self.c), self.cache)  # (B, V), .., (B, N)
        ban_tokens(logp, step, suppress_unk, min_length)
        self._take(logp, state, alpha)

    def _take(self, logp: Tensor, state: tuple[Tensor, Tensor], alpha: Tensor) -> None:
        """The most likely word of each row, as single_path picks and scores it."""
        tok = torch.where(self.done, torch.full_like(self.prev, PAD_ID), logp.max(dim=-1).indices)  # (B,)
        tok_logp = torch.where(self.done, torch.zeros_like(self.scores), logp.gather(1, tok.unsqueeze(1)).squeeze(1))
        self.scores.add_(tok_logp)
        self.words.index_copy_(0, self.t_now, tok.unsqueeze(0))
        self.logps.index_copy_(0, self.t_now, tok_logp.unsqueeze(0).to(self.logps.dtype))
        self.maps.index_copy_(0, self.t_now, alpha.unsqueeze(0))
        self.t_now.add_(1)
        self.done.logical_or_(tok == END_ID)
        self.h.copy_(state[0])
        self.c.copy_(state[1])
        self.prev.copy_(tok)
