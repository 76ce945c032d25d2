"""Beam search over a batch: the beams of all images live in one (B*K, ...) tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID, START_ID
from captioner.decoding.common import Generated, ban_tokens, word_lengths
from captioner.decoding.cuda_graph import DecoderGraphs, Steps
from captioner.models.decoder import AttentionDecoder


@torch.no_grad()
def beam_search(
    decoder: AttentionDecoder,
    features: Tensor,
    beam_size: int = 5,
    max_length: int = 20,
    length_penalty: float = 0.0,
    suppress_unk: bool = False,
    min_length: int = 1,
    early_stop: bool = True,
    cuda_graph: bool | None = None,
) -> Generated:
    """Keep the ``beam_size`` best partial captions per image.

    A beam that emitted ``<end>`` stays in the beam with its score frozen (it extends with
    ``<pad>`` at no cost), so finished and unfinished captions compete on equal terms and a
    caption is returned even when no beam ends before ``max_length``. Final ranking divides each
    score by ``words ** length_penalty`` (0: raw log-probability). ``<end>`` is not allowed before
    ``min_length`` words. ``early_stop=False`` runs all
    ``max_length`` steps (for benchmarks). With ``beam_size=1`` this is exactly greedy decoding.

    Each step writes into tensors allocated once (the words chosen, which beam each extends,
    the attention) and the captions are read back through those pointers at the end, so a step
    has fixed shapes and addresses. On a GPU (``cuda_graph`` None or True) a step is recorded
    once as a CUDA graph, kept for the next batch of the same shape and replayed: one launch per
    word instead of a hundred small kernels. ``cuda_graph=False`` launches them one by one.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    b, n, _ = features.shape
    k = beam_size
    dev = features.device
    # One cache row per image: the K beams of an image share it (the attention takes h with
    # K consecutive rows per image), so the image work is neither copied nor repeated.
    cache = decoder.precompute(features)  # (B, ...)
    state = decoder.init_state(features)  # (B, H) each
    start = torch.full((b,), START_ID, dtype=torch.long, device=dev)
    # Step 0 on one row per image: the K beams would all hold the same <start> hypothesis.
    logp, state, alpha0 = decoder.step(start, state, cache)  # (B, V), .., (B, N)
    v = logp.size(-1)
    ban_tokens(logp.unsqueeze(1), 0, suppress_unk, min_length)
    if v >= k:
        scores, tok = logp.topk(k, dim=-1)  # (B, K), best first
    else:  # fewer words than beams: the extra beams start dead
        scores = torch.full((b, k), float("-inf"), device=dev)
        tok = torch.full((b, k), PAD_ID, dtype=torch.long, device=dev)
        scores[:, :v], tok[:, :v] = logp.topk(v, dim=-1)
    h, c = (s.repeat_interleave(k, 0) for s in state)  # (B*K, H)

    graphs = DecoderGraphs.for_search(decoder, cuda_graph, dev, max_length)
    search = Steps(graphs, decoder, (b, k, n, v, max_length, suppress_unk), cache, h, alpha0.dtype,
                   lambda held: _Beams.allocate(held, h, alpha0.dtype, k, n, max_length), "beam search")
    beams = search.state
    try:
        beams.begin(cache, h, c, tok, scores)
        steps = search.run(lambda step: beams.advance(decoder, step, suppress_unk, min_length), beams.done,
                           max_length, min_length, early_stop)
        tokens, alphas, logps = _backtrack(beams, steps, alpha0)  # (B, K, T), (B, K, T, N), (B, K, T)
        scores = beams.scores.clone()
    finally:
        search.release()
    t = tokens.size(-1)
    lengths = word_lengths(tokens.view(b * k, t)).view(b, k)
    final = scores
    if length_penalty:
        final = scores / (lengths.clamp(min=1).float() ** length_penalty)
    order = final.argsort(dim=-1, descending=True)  # (B, K)
    final = final.gather(1, order)
    tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, t))
    alphas = alphas.gather(1, order.view(b, k, 1, 1).expand(-1, -1, t, n))
    logps = logps.gather(1, order.unsqueeze(-1).expand(-1, -1, t))
    lengths = lengths.gather(1, order)
    # Python lists built from one host copy of each tensor (not one sync per hypothesis).
    tok_l, len_l, score_l = tokens.tolist(), lengths.tolist(), final.tolist()
    nbest = [[(tok_l[i][j][: len_l[i][j]], score_l[i][j]) for j in range(k)] for i in range(b)]
    beams_out = Generated(tokens.reshape(b * k, t), lengths.reshape(b * k), final.reshape(b * k),
                          alphas.reshape(b * k, t, n), token_logprobs=logps.reshape(b * k, t))
    return Generated(tokens[:, 0], lengths[:, 0], final[:, 0], alphas[:, 0], nbest,
                     token_logprobs=logps[:, 0], beams=beams_out)


@dataclass
class _Beams:
    """The state of a search, updated in place by ``advance``: fixed shapes and addresses."""

    cache: tuple[Tensor, ...]  # the attention's image cache, (B, ...) each
    h: Tensor  # (B*K, H)
    c: Tensor  # (B*K, H)
    prev: Tensor  # (B*K,) the last word of each beam
    scores: Tensor  # (B, K)
    done: Tensor  # (B, K)
    totals: Tensor  # (T, B, K) each beam's score after step t (the per-word log-probs are its steps)
    words: Tensor  # (T, B, K) the word step t chose
    parents: Tensor  # (T, B, K) the beam it extended
    maps: Tensor  # (T, B, K, N) at step t >= 1: the attention of the beams it extended
    t_now: Tensor  # () the step advance() writes
    batch_offset: Tensor  # (B, 1) first row of each image

    @classmethod
    def allocate(cls, cache: tuple[Tensor, ...], h: Tensor, map_dtype: torch.dtype, k: int, n: int,
                 max_length: int) -> _Beams:
        b, dev = cache[0].size(0), h.device
        long = {"dtype": torch.long, "device": dev}
        return cls(
            cache=cache, h=torch.empty_like(h), c=torch.empty_like(h), prev=torch.empty(b * k, **long),
            scores=torch.empty(b, k, device=dev), done=torch.empty(b, k, dtype=torch.bool, device=dev),
            totals=torch.empty(max_length, b, k, device=dev),
            words=torch.empty(max_length, b, k, **long), parents=torch.zeros(max_length, b, k, **long),
            maps=torch.empty(max_length, b, k, n, dtype=map_dtype, device=dev), t_now=torch.empty((), **long),
            batch_offset=(torch.arange(b, device=dev) * k).unsqueeze(1),
        )

    def begin(self, cache: tuple[Tensor, ...], h: Tensor, c: Tensor, tok: Tensor, scores: Tensor) -> None:
        for mine, new in zip(self.cache, cache, strict=True):
            if mine is not new:
                mine.copy_(new)
        self.h.copy_(h)
        self.c.copy_(c)
        self.prev.copy_(tok.view(-1))
        self.scores.copy_(scores)
        self.done.copy_((tok == END_ID) | scores.isneginf())
        self.words.fill_(PAD_ID)
        self.words[0] = tok
        self.totals[0] = scores
        self.t_now.fill_(1)

    def advance(self, decoder: AttentionDecoder, step: int, suppress_unk: bool, min_length: int) -> None:
        b, k = self.scores.shape
        logp, (h2, c2), alpha = decoder.step(self.prev, (self.h, self.c), self.cache)  # (B*K, V), .., (B*K, N)
        v = logp.size(-1)
        logp = logp.view(b, k, v)
        ban_tokens(logp, step, suppress_unk, min_length)
        # finished beams: only <pad>, at no cost (in place: logp is a fresh tensor of ours)
        pad = torch.where(self.done, 0.0, logp[..., PAD_ID])  # (B, K)
        logp.masked_fill_(self.done.unsqueeze(-1), float("-inf"))
        logp[..., PAD_ID] = pad
        cand = logp.add_(self.scores.unsqueeze(-1)).view(b, k * v)  # (B, K*V)
        scores, flat = cand.topk(k, dim=-1)  # (B, K)
        origin = torch.div(flat, v, rounding_mode="floor")  # (B, K) which beam it extends
        tok = flat % v
        rows = (self.batch_offset + origin).view(-1)  # (B*K,) rows of the beams extended
        self.words.index_copy_(0, self.t_now, tok.unsqueeze(0))
        self.parents.index_copy_(0, self.t_now, origin.unsqueeze(0))
        self.maps.index_copy_(0, self.t_now, alpha.view(1, b, k, -1))
        self.totals.index_copy_(0, self.t_now, scores.unsqueeze(0))
        self.t_now.add_(1)
        self.done.copy_(self.done.gather(1, origin) | (tok == END_ID))
        self.scores.copy_(scores)
        self.h.copy_(h2[rows])
        self.c.copy_(c2[rows])
        self.prev.copy_(tok.view(-1))


def _backtrack(beams: _Beams, steps: int, alpha0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each final beam's words, attention maps and per-token log-probabilities over the first
    ``steps`` steps, read back through the parent pointers (followed on the host: T small steps;
    then one gather each). -> tokens (B, K, T), alphas (B, K, T, N), token log-probs (B, K, T)."""
    words, maps = beams.words[:steps], beams.maps[:steps]
    parents = beams.parents[:steps].cpu()
    t, b, k = words.shape
    n = maps.size(-1)
    ancestor = torch.empty(t, b, k, dtype=torch.long)  # final beam j's ancestor at step s
    cur = torch.arange(k).expand(b, k)
    for s in range(t - 1, -1, -1):
        ancestor[s] = cur
        cur = parents[s].gather(1, cur)
    ancestor = ancestor.to(words.device)
    tokens = words.gather(2, ancestor).permute(1, 2, 0)  # (B, K, T)
    # a token's log-prob is the step of its path's running score; a beam that never lived
    # (more beams than words) has -inf - -inf there: probability 0
    totals = beams.totals[:steps].gather(2, ancestor).permute(1, 2, 0)  # (B, K, T)
    logps = torch.cat([totals[..., :1], totals[..., 1:] - totals[..., :-1]], dim=-1)
    logps = logps.masked_fill(logps.isnan(), float("-inf"))
    # step s's map is the one of the beam it extended: the ancestor at step s - 1
    later = maps[1:].gather(2, ancestor[:-1].unsqueeze(-1).expand(-1, -1, -1, n))  # (T-1, B, K, N)
    alphas = torch.cat([alpha0.view(1, b, 1, n).expand(1, b, k, n), later]).permute(1, 2, 0, 3)
    return tokens, alphas, logps
