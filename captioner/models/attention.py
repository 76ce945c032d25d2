"""Attention over image regions: soft (deterministic), hard (stochastic) and multi-head.

Every attention module splits its work in two, so that the part that depends only on the image
is paid once per image and not once per word:

* ``precompute(features)`` -> a tuple of tensors, batch-first (the "cache"); decoding can
  ``index_select`` it along dim 0 to follow beams.
* ``forward(cache, h)`` -> ``AttentionOutput`` for one time step, given the previous LSTM state.

``h`` may hold K consecutive rows per cached image (B*K rows for a cache of B images): beam
search passes the cache of its B images once and the K beams of each image share it, instead of
copying the image work K times. K = 1 is the ordinary case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.registry import Registry

if TYPE_CHECKING:  # decoder.py imports this module
    from captioner.models.decoder import DecoderConfig

ATTENTIONS: Registry[Attention] = Registry("attention")
register_attention = ATTENTIONS.register

# What one semi-sampling draw of hard attention covers (DecoderConfig.semi_sampling_unit).
SemiSamplingUnit = Literal["step", "caption", "batch"]
# Hard attention's context at test time (DecoderConfig.hard_test_mode).
HardTestMode = Literal["expectation", "argmax"]


@dataclass
class AttentionOutput:
    context: Tensor  # (B, D) the attended feature, before the decoder's gate
    alpha: Tensor  # (B, N) attention weights, rows sum to 1
    # Hard attention only (training): log-probability of the sampled location, the share of steps
    # that used a sample (not the expectation), and the entropy of alpha.
    sample_log_prob: Tensor | None = None  # (B,)
    sampled: Tensor | None = None  # (B,) bool
    entropy: Tensor | None = None  # (B,)


# Elements of the (images, K, N, A) temporary of the additive scores computed at once (16 MB;
# decoding uses a quarter of that, through one buffer).
SCORE_CHUNK_ELEMENTS = 1 << 22


def beams_per_image(cache_rows: int, h: Tensor) -> int:
    """K, the number of consecutive rows of ``h`` that share each of the ``cache_rows`` images."""
    k, rem = divmod(h.size(0), cache_rows)
    assert rem == 0 and k >= 1, f"h has {h.size(0)} rows, not a multiple of the {cache_rows} cached images"
    return k


def _image_rows(b: int, k: int, device: torch.device) -> Tensor:
    """Row of the cache (image) of each of the B*K rows of h: 0,0,..,1,1,.. (K of each)."""
    return torch.arange(b, device=device).repeat_interleave(k)


def create_attention(config: DecoderConfig, encoder_dim: int) -> Attention:
    """The attention named by ``config.attention``, given the settings that type reads."""
    cls = ATTENTIONS.get(config.attention)
    return cls(encoder_dim, config.decoder_dim, config.attention_dim, **cls.options(config))


class Attention(nn.Module):
    """Base of every registered attention. A type carries its own settings and training
    behaviour, so that the decoder and ``CaptioningSystem`` never ask for it by name.

    Subclasses take ``(encoder_dim, decoder_dim, attention_dim, **options(config))`` and
    implement ``precompute`` and ``forward`` (see the module's docstring). A stochastic type
    (``stochastic = True``) samples locations in training, returns ``sample_log_prob``,
    ``sampled`` and ``entropy``, is trained with REINFORCE, and keeps ``semi_sampling``, the
    current probability of the expectation instead of a sample.
    """

    stochastic: ClassVar[bool] = False

    @classmethod
    def options(cls, config: DecoderConfig) -> dict[str, Any]:
        """This type's own constructor arguments, read from the decoder's settings."""
        return {}

    def precompute(self, features: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def draw_sample_rows(self, batch: int, device: torch.device) -> Tensor | None:
        """Training, once per teacher-forced pass of ``batch`` captions: (batch,) bool, whether
        every step of a caption uses a sample (True) or the expectation (False); None leaves it
        to each step (or there is nothing to draw)."""
        return None

    def anneal(self, global_step: int) -> bool:
        """Follow a warm-up schedule at this optimiser step; True when there is one (the system
        then logs ``semi_sampling``)."""
        return False


class AdditiveScores(Attention):
    """e_ti = w^T tanh(W_a a_i + W_h h_{t-1}) (Xu et al. 2015, Eq. 4 with Bahdanau's f_att).

    Computed as e_ti = 2 w^T sigmoid(2 (W_a a_i + W_h h_{t-1})) - sum(w), the same function
    (tanh x = 2 sigmoid(2x) - 1) with one cheap elementwise pass per word instead of tanh's
    slower one: that (B, K, N, A) pass is the largest per-word cost of decoding at 14x14 grids.
    The cache holds 2 W_a a_i (doubling is exact in floating point).
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(encoder_dim, attention_dim)  # W_a
        self.hidden_proj = nn.Linear(decoder_dim, attention_dim, bias=False)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w

    def precompute(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return features, self.encoder_proj(features).mul_(2.0)  # (B, N, D), 2 W_a a: (B, N, A)

    def scores(self, proj2: Tensor, h: Tensor) -> Tensor:
        """proj2 (B, N, A) from ``precompute``, h (B*K, H) -> scores (B*K, N)."""
        b, n, a = proj2.shape
        q2 = self.hidden_proj(h).mul_(2.0).view(b, -1, 1, a)  # (B, K, 1, A)
        w2 = self.score.weight * 2.0  # (1, A)
        bias = self.score.bias - self.score.weight.sum()  # (1,)
        per_image = q2.size(1) * n * a
        if torch.is_grad_enabled() and (proj2.requires_grad or q2.requires_grad):
            if per_image * b <= SCORE_CHUNK_ELEMENTS:
                return self._scores(proj2, q2, w2, bias).view(-1, n)
            step = max(1, SCORE_CHUNK_ELEMENTS // per_image)
            parts = [self._scores(proj2[i : i + step], q2[i : i + step], w2, bias) for i in range(0, b, step)]
            return torch.cat(parts).view(-1, n)
        # Decoding on a CPU: a (B, K, N, A) temporary is 64 MB for 32 images x 5 beams at 14x14,
        # and allocating that per word costs more than the arithmetic (fresh pages). Go a few
        # images at a time through one reused buffer. A GPU's caching allocator reuses memory
        # without that cost, and there one pass is three kernels instead of three per chunk.
        if proj2.device.type != "cpu":
            return self._scores(proj2, q2, w2, bias).view(-1, n)
        step = max(1, min(b, SCORE_CHUNK_ELEMENTS // 4 // per_image))
        buf = proj2.new_empty(step, q2.size(1), n, a)
        out = proj2.new_empty(b, q2.size(1), n, 1)
        for i in range(0, b, step):
            e = buf[: min(step, b - i)]
            torch.add(proj2[i : i + step].unsqueeze(1), q2[i : i + step], out=e)
            out[i : i + step] = F.linear(e.sigmoid_(), w2, bias)
        return out.view(-1, n)

    @staticmethod
    def _scores(proj2: Tensor, q2: Tensor, w2: Tensor, bias: Tensor) -> Tensor:
        # sigmoid in place: the sum itself is not needed for the backward pass
        return F.linear(torch.sigmoid_(proj2.unsqueeze(1) + q2), w2, bias)  # (b, K, N, 1)


def _expectation(alpha: Tensor, features: Tensor) -> Tensor:
    """sum_i alpha_i a_i: alpha (B*K, N), features (B, N, D) -> (B*K, D). One (K, N) x (N, D)
    product per image, so the K beams of an image read its features once."""
    b, n, d = features.shape
    return torch.bmm(alpha.view(b, -1, n), features).view(-1, d)


@register_attention("soft")
class SoftAttention(AdditiveScores):
    """Deterministic soft attention: the context is the expectation sum_i alpha_i a_i."""

    def forward(self, cache: tuple[Tensor, ...], h: Tensor) -> AttentionOutput:
        features, proj = cache
        alpha = F.softmax(self.scores(proj, h), dim=-1)  # (B*K, N)
        return AttentionOutput(_expectation(alpha, features), alpha)  # context (B*K, D)


@register_attention("hard")
class HardAttention(AdditiveScores):
    """Stochastic hard attention: a location s_t ~ Multinoulli(alpha_t); context a_{s_t}.

    In training, with probability ``semi_sampling`` the expectation is used instead of a sample
    (the paper's variance reduction), drawn once per ``unit``: per step and image, per caption
    or per batch. Over ``warmup_steps`` optimiser steps ``anneal`` lowers that probability from 1
    to ``semi_sampling``. At test time the context is the expectation
    (``test_mode="expectation"``, the paper's choice) or the argmax location.
    """

    stochastic = True

    def __init__(
        self,
        encoder_dim: int,
        decoder_dim: int,
        attention_dim: int,
        semi_sampling: float = 0.5,
        test_mode: HardTestMode = "expectation",
        unit: SemiSamplingUnit = "step",
        warmup_steps: int = 0,
    ) -> None:
        # the values are DecoderConfig's, checked there (model.decoder.semi_sampling, ...)
        super().__init__(encoder_dim, decoder_dim, attention_dim)
        self.semi_sampling = semi_sampling  # the current value: anneal changes it
        self.final_semi_sampling = semi_sampling
        self.test_mode = test_mode
        self.unit = unit
        self.warmup_steps = warmup_steps

    @classmethod
    def options(cls, config: DecoderConfig) -> dict[str, Any]:
        return {"semi_sampling": config.semi_sampling, "test_mode": config.hard_test_mode,
                "unit": config.semi_sampling_unit, "warmup_steps": config.semi_sampling_warmup_steps}

    def draw_sample_rows(self, batch: int, device: torch.device) -> Tensor | None:
        if self.unit == "caption":
            return torch.rand(batch, device=device) >= self.semi_sampling
        if self.unit == "batch":
            return (torch.rand((), device=device) >= self.semi_sampling).expand(batch)
        return None  # per step: forward draws it

    def anneal(self, global_step: int) -> bool:
        """``semi_sampling`` falls linearly from 1 to ``final_semi_sampling`` over the warm-up,
        so that the maps are informative before samples are drawn."""
        if self.warmup_steps <= 0:
            return False
        done = min(1.0, global_step / self.warmup_steps)
        self.semi_sampling = 1.0 - (1.0 - self.final_semi_sampling) * done
        return True

    def forward(
        self, cache: tuple[Tensor, ...], h: Tensor, sample_rows: Tensor | None = None
    ) -> AttentionOutput:
        """``sample_rows`` (B,) bool, training only: which rows use a sample (True) or the
        expectation (False) at this step; None draws that per row with ``semi_sampling``."""
        features, proj = cache
        logits = self.scores(proj, h)  # (B*K, N)
        alpha = F.softmax(logits, dim=-1)
        expectation = _expectation(alpha, features)  # (B*K, D)
        rows = _image_rows(features.size(0), beams_per_image(features.size(0), h), features.device)
        if not self.training:
            if self.test_mode == "argmax":
                idx = alpha.argmax(dim=-1)
                return AttentionOutput(features[rows, idx], alpha)
            return AttentionOutput(expectation, alpha)
        log_alpha = F.log_softmax(logits, dim=-1)
        loc = torch.multinomial(alpha.detach().float(), 1).squeeze(1)  # (B*K,)
        sampled_ctx = features[rows, loc]
        if sample_rows is None:
            sample_rows = torch.rand(alpha.size(0), device=alpha.device) >= self.semi_sampling
        sampled = sample_rows  # (B,)
        context = torch.where(sampled.unsqueeze(1), sampled_ctx, expectation)
        sample_log_prob = log_alpha.gather(1, loc.unsqueeze(1)).squeeze(1)  # (B,)
        entropy = -(alpha * log_alpha).sum(-1)  # (B,)
        return AttentionOutput(context, alpha, sample_log_prob, sampled, entropy)


@register_attention("multihead")
class MultiHeadAttention(Attention):
    """Scaled dot-product attention over regions with ``num_heads`` heads, queried by h_{t-1}.

    Keys and values are projected once per image. The per-word map is the heads' mean.
    """

    def __init__(
        self, encoder_dim: int, decoder_dim: int, attention_dim: int, num_heads: int = 8
    ) -> None:
        super().__init__()
        if attention_dim % num_heads or encoder_dim % num_heads:
            raise ValueError(
                f"multihead attention needs attention_dim ({attention_dim}) and encoder_dim "
                f"({encoder_dim}) divisible by num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.query = nn.Linear(decoder_dim, attention_dim)
        self.key = nn.Linear(encoder_dim, attention_dim)
        self.value = nn.Linear(encoder_dim, encoder_dim)
        self.out = nn.Linear(encoder_dim, encoder_dim)

    @classmethod
    def options(cls, config: DecoderConfig) -> dict[str, Any]:
        return {"num_heads": config.num_heads}

    def precompute(self, features: Tensor) -> tuple[Tensor, Tensor]:
        b, n, d = features.shape
        k = self.key(features).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(features).view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
        return k, v  # (B, H, N, dk), (B, H, N, dv)

    def forward(self, cache: tuple[Tensor, ...], h: Tensor) -> AttentionOutput:
        k, v = cache
        b, _, n, _ = k.shape
        q = self.query(h).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, K, dk)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, K, N)
        alpha_heads = F.softmax(scores, dim=-1)
        ctx = torch.matmul(alpha_heads, v).transpose(1, 2).reshape(h.size(0), -1)  # (B*K, D)
        alpha = alpha_heads.mean(1).reshape(-1, n)  # (B*K, N)
        return AttentionOutput(self.out(ctx), alpha)
