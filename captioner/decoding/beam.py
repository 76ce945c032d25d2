"""Beam search over a batch: the beams of all images live in one (B*K, ...) tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.data.vocab import END_ID, PAD_ID, START_ID
from captioner.decoding.common import Generated, ban_tokens, word_lengths
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
) -> Generated:
    """Keep the ``beam_size`` best partial captions per image.

    A beam that emitted ``<end>`` stays in the beam with its score frozen (it extends with
    ``<pad>`` at no cost), so finished and unfinished captions compete on equal terms and a
    caption is returned even when no beam ends before ``max_length``. Final ranking divides each
    score by ``words ** length_penalty`` (0: raw log-probability). ``<end>`` is not allowed before
    ``min_length`` words. ``early_stop=False`` runs all
    ``max_length`` steps (for benchmarks). With ``beam_size=1`` this is exactly greedy decoding.
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
    prev = torch.full((b,), START_ID, dtype=torch.long, device=dev)
    batch_offset = (torch.arange(b, device=dev) * k).unsqueeze(1)  # (B, 1)
    # Step 0 on one row per image: the K beams would all hold the same <start> hypothesis.
    logp, state, alpha = decoder.step(prev, state, cache)  # (B, V), .., (B, N)
    v = logp.size(-1)
    ban_tokens(logp.unsqueeze(1), 0, suppress_unk, min_length)
    if v >= k:
        scores, tok = logp.topk(k, dim=-1)  # (B, K), best first
    else:  # fewer words than beams: the extra beams start dead
        scores = torch.full((b, k), float("-inf"), device=dev)
        tok = torch.full((b, k), PAD_ID, dtype=torch.long, device=dev)
        scores[:, :v], tok[:, :v] = logp.topk(v, dim=-1)
    tokens = tok.unsqueeze(-1)  # (B, K, 1)
    alphas = alpha[:, None, None].expand(b, k, 1, n).contiguous()  # (B, K, 1, N)
    done = (tok == END_ID) | scores.isneginf()
    state = (state[0].repeat_interleave(k, 0), state[1].repeat_interleave(k, 0))  # (B*K, H)
    prev = tok.view(-1)
    for step in range(1, max_length):
        if early_stop and bool(done.all()):
            break
        logp, state, alpha = decoder.step(prev, state, cache)  # (B*K, V), .., (B*K, N)
        v = logp.size(-1)
        logp = logp.view(b, k, v)
        ban_tokens(logp, step, suppress_unk, min_length)
        # finished beams: only <pad>, at no cost (in place: logp is a fresh tensor of ours)
        pad = torch.where(done, 0.0, logp[..., PAD_ID])  # (B, K)
        logp.masked_fill_(done.unsqueeze(-1), float("-inf"))
        logp[..., PAD_ID] = pad
        cand = logp.add_(scores.unsqueeze(-1)).view(b, k * v)  # (B, K*V)
        scores, flat = cand.topk(k, dim=-1)  # (B, K)
        origin = torch.div(flat, v, rounding_mode="floor")  # (B, K) which beam it extends
        tok = flat % v
        rows = (batch_offset + origin).view(-1)  # (B*K,) rows of the beams extended
        tokens = torch.cat([tokens.view(b * k, -1)[rows].view(b, k, -1), tok.unsqueeze(-1)], -1)
        alphas = torch.cat([alphas.view(b * k, -1, n)[rows].view(b, k, -1, n),
                            alpha[rows].view(b, k, 1, n)], 2)
        done = done.view(-1)[rows].view(b, k) | (tok == END_ID)
        state = (state[0][rows], state[1][rows])
        prev = tok.view(-1)
    t = tokens.size(-1)
    lengths = word_lengths(tokens.view(b * k, t)).view(b, k)
    final = scores
    if length_penalty:
        final = scores / (lengths.clamp(min=1).float() ** length_penalty)
    order = final.argsort(dim=-1, descending=True)  # (B, K)
    final = final.gather(1, order)
    tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, t))
    alphas = alphas.gather(1, order.view(b, k, 1, 1).expand(-1, -1, t, n))
    lengths = lengths.gather(1, order)
    # Python lists built from one host copy of each tensor (not one sync per hypothesis).
    tok_l, len_l, score_l = tokens.tolist(), lengths.tolist(), final.tolist()
    nbest = [[(tok_l[i][j][: len_l[i][j]], score_l[i][j]) for j in range(k)] for i in range(b)]
    return Generated(tokens[:, 0], lengths[:, 0], final[:, 0], alphas[:, 0], nbest)
