"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015, Sec. 3.1.2)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from captioner.data.vocab import PAD_ID, UNK_ID
from captioner.models.attention import (
    ATTENTIONS,
    AttentionOutput,
    HardTestMode,
    SemiSamplingUnit,
    create_attention,
)
from captioner.settings import Fraction, NonNegativeInt, PositiveInt, UnitInterval, check_fields

logger = logging.getLogger(__name__)


@dataclass
class DecoderConfig:
    """Decoder settings. ``attention`` is a name from the attention registry; the attention type
    reads the settings that are its own (``num_heads``, ``semi_sampling``..) through ``options``."""

    attention: Annotated[str, ATTENTIONS] = "soft"
    embed_dim: PositiveInt = 512
    attention_dim: PositiveInt = 512
    decoder_dim: PositiveInt = 512
    dropout: Fraction = 0.5
    gate: Literal["scalar", "vector", "none"] = "scalar"  # scalar: the paper's beta_t; vector: per channel
    # Initial bias of f_beta. None: PyTorch's default (near 0, so beta starts near 0.5); 2.0 starts
    # the gate open (beta ~ 0.88), so that the image's path into the LSTM is not shut early.
    gate_bias: float | None = None
    deep_output: bool = True  # Eq. 7; False: logits = W h_t
    num_heads: PositiveInt = 8  # multihead only
    semi_sampling: UnitInterval = 0.5  # hard only: probability of the expectation instead of a sample
    # hard only: what one semi-sampling draw covers: "step" (each step of each caption), "caption"
    # (all steps of a caption) or "batch" (the whole minibatch, as the paper's released code does)
    semi_sampling_unit: SemiSamplingUnit = "step"
    # hard only: the expectation's share starts at 1 and falls linearly to semi_sampling over
    # this many optimiser steps, so that the maps are informative before samples are drawn
    semi_sampling_warmup_steps: NonNegativeInt = 0
    hard_test_mode: HardTestMode = "expectation"  # hard only
    # Teacher forcing in training: each previous-word input (not <start>) becomes <unk> with this
    # probability, so the next word must be read more from the image than from the word before
    # (word dropout, Bowman et al. 2016)
    word_dropout: Fraction = 0.0
    # Teacher forcing in training: the probability that a step's word is predicted from the
    # attended context alone (the deep output without E y_{t-1} and L_h h_t), so that the image's
    # path learns to name what is attended by itself, not only as a correction of the language
    # model's guess. Needs deep_output.
    language_dropout: Fraction = 0.0
    # Grounded word groups (factorised outputs): each list names words - e.g. colours, object
    # nouns - that the language model may only choose *as a group*; which word of the group is
    # said is read from the attended context alone, p(w) = p_lm(group | history) * p(w | group,
    # context), so that no word of a group is ever chosen because of the words before it. This
    # is what lets a model name attribute-object pairs it never saw together (docs/training.md).
    grounded_words: list[list[str]] | None = None

    def __post_init__(self) -> None:
        check_fields(self, "model.decoder")
        if self.language_dropout > 0 and not self.deep_output:
            raise ValueError("model.decoder.language_dropout needs model.decoder.deep_output: true "
                             "(it drops terms of the deep output layer)")
        seen: dict[str, int] = {}
        for i, group in enumerate(self.grounded_words or []):
            if isinstance(group, str) or len(group) < 2:
                raise ValueError(f"model.decoder.grounded_words[{i}] must be a list of at least 2 words, got {group!r}")
            for word in group:
                if word in seen:
                    raise ValueError(f"model.decoder.grounded_words: {word!r} is in group {seen[word]} and in group {i}")
                seen[word] = i


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, V) predictions of captions[:, 1:] (log-probabilities with grounded words)
    alphas: Tensor  # (B, T, N)
    mask: Tensor  # (B, T) True on real (unpadded) steps
    # Stochastic (hard) attention in training only: per-step log p(s_t), sample flags, entropies.
    sample_log_probs: Tensor | None = None  # (B, T)
    sampled: Tensor | None = None  # (B, T) bool
    entropies: Tensor | None = None  # (B, T)


State = tuple[Tensor, Tensor]


class _StepInputs:
    """The LSTM's inputs of every teacher-forced step (detached), for _LSTMWeightGrads. ``z`` and
    ``h`` are set once the time loop has run, from the tensors the forward pass stacks anyway."""

    def __init__(self, emb: Tensor) -> None:
        self.emb = emb.detach()  # (B, T, E)
        self.z: Tensor | None = None  # (B, T, D) the gated contexts
        self.h: Tensor | None = None  # (B, T, H) the state each step starts from


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """Zero rows appended to (b, ...) up to (rows, ...); autograd passes the first b through."""
    if x.size(0) == rows:
        return x
    if x.dtype == torch.bool:
        return torch.cat([x, x.new_zeros((rows - x.size(0), *x.shape[1:]))])
    return nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.size(0)))


class _LSTMWeightGrads(torch.autograd.Function):
    """Identity on the per-step input projections x (B, T, 4H) that also owns the gradients of
    the LSTM weights.

    The time loop multiplies by detached weights, so autograd does not form and sum a (4H, E+D)
    weight gradient at every step (most of the backward pass's memory traffic at D = 2048).
    Every step adds x[:, t] to its gates, so the gradient reaching x is dL/dgates for all steps
    at once, and each weight gradient is one product over all B*T rows:
    dW_ih = G^T [E y; z], dW_hh = G^T h_prev. Same sums as per-step autograd, in one matmul.
    Its backward runs after every step's (x feeds all of them), when the record is complete.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, record: _StepInputs) -> Tensor:
        ctx.record = record
        ctx.weight_dtype = weight_ih.dtype  # under autocast x and the record are bf16/fp16
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rec: _StepInputs = ctx.record
        g = grad.reshape(-1, grad.size(-1))  # (B*T, 4H), rows in (b, t) order
        grad_ih = grad_hh = None
        if ctx.needs_input_grad[1]:
            inputs = torch.cat([rec.emb.to(g.dtype), rec.z.to(g.dtype)], -1)  # (B, T, E + D)
            grad_ih = (g.t() @ inputs.reshape(g.size(0), -1)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_hh = (g.t() @ rec.h.to(g.dtype).reshape(g.size(0), -1)).to(ctx.weight_dtype)
        return grad, grad_ih, grad_hh, None


class GroundedWords(nn.Module):
    """Factorised outputs for groups of words (``DecoderConfig.grounded_words``).

    The language model's distribution over the vocabulary keeps its mass on each group as a
    whole; within a group the word is chosen by a linear head on the attended context alone:
        log p(w) = log sum_{v in g} p_lm(v) + log softmax_g(W_g c_t)[w]     for w in group g
    Words outside every group keep p_lm. The head never sees the state or the previous words,
    so it cannot learn that one word of a group follows another (Lu et al. 2018, "Neural Baby
    Talk", fill visual-word slots from the image in the same spirit).
    """

    def __init__(self, groups: Sequence[Sequence[int]], encoder_dim: int) -> None:
        super().__init__()
        self.sizes = [len(g) for g in groups]
        # not saved: rebuilt from the config and the vocabulary
        self.register_buffer("ids", torch.tensor([i for g in groups for i in g]), persistent=False)
        self.head = nn.Linear(encoder_dim, len(self.ids))

    def forward(self, logits: Tensor, context: Tensor) -> Tensor:
        """logits (..., V) of the language model, context (..., D) -> log-probabilities (..., V)."""
        logp = torch.log_softmax(logits.float(), -1)  # (..., V)
        lm = logp.index_select(-1, self.ids).split(self.sizes, -1)
        grounded = self.head(context).float().split(self.sizes, -1)  # per group (..., |g|)
        parts = [torch.logsumexp(a, -1, keepdim=True) + torch.log_softmax(b, -1) for a, b in zip(lm, grounded)]
        return logp.index_copy(-1, self.ids, torch.cat(parts, -1))


def _grounded_groups(
    groups: list[list[str]] | None, words: Sequence[str] | None, vocab_size: int, encoder_dim: int
) -> GroundedWords | None:
    if not groups:
        return None
    if words is None:
        raise ValueError("model.decoder.grounded_words needs the vocabulary's words")
    if len(words) != vocab_size:
        raise ValueError(f"{len(words)} words for a vocabulary of {vocab_size}")
    index = {w: i for i, w in enumerate(words)}
    missing = [w for g in groups for w in g if w not in index]
    if missing:  # the model cannot say them anyway; the rest of each group still works
        logger.warning("model.decoder.grounded_words: not in the vocabulary, left out: %s (a word rarer than "
                       "data.min_count is not in it)", ", ".join(map(repr, missing)))
    kept = [[index[w] for w in g if w in index] for g in groups]
    kept = [g for g in kept if len(g) > 1]  # a group of one word is no choice
    return GroundedWords(kept, encoder_dim) if kept else None


def lstm_update(gates: Tensor, c: Tensor) -> State:
    """nn.LSTMCell's update from its pre-activations (B, 4H) in its gate order i, f, g, o."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class AttentionDecoder(nn.Module):
    """LSTM with attention, gated context and the deep output layer.

    Per step t (inputs y_{t-1}, state h_{t-1}, c_{t-1}):
        alpha_t, z_t = attention(a, h_{t-1});  z_t <- beta_t * z_t, beta_t = sigmoid(f_beta(h_{t-1}))
        h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
        p(y_t) = softmax(L_o tanh(E y_{t-1} + L_h h_t + L_z z_t))
    The LSTM is written out (same gates and order as ``nn.LSTMCell``) so that the embedding's share
    of the input projection is one matmul for all steps, and the output layer - the largest
    matmul, over the vocabulary - runs once over all steps after the loop.
    """

    def __init__(
        self, config: DecoderConfig, vocab_size: int, encoder_dim: int, words: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        c = config
        self.attention = create_attention(c, encoder_dim)
        self.embedding = nn.Embedding(vocab_size, c.embed_dim)
        self.init_h = nn.Linear(encoder_dim, c.decoder_dim)
        self.init_c = nn.Linear(encoder_dim, c.decoder_dim)
        self.gate = (
            nn.Linear(c.decoder_dim, 1 if c.gate == "scalar" else encoder_dim) if c.gate != "none" else None
        )
        self.lstm = nn.LSTMCell(c.embed_dim + encoder_dim, c.decoder_dim)
        self.dropout = nn.Dropout(c.dropout)
        if c.deep_output:
            self.out_h = nn.Linear(c.decoder_dim, c.embed_dim)  # L_h
            self.out_z = nn.Linear(encoder_dim, c.embed_dim, bias=False)  # L_z
            self.out = nn.Linear(c.embed_dim, vocab_size)  # L_o
        else:
            self.out = nn.Linear(c.decoder_dim, vocab_size)
        self.grounded = _grounded_groups(c.grounded_words, words, vocab_size, encoder_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gate is not None and self.config.gate_bias is not None:
            nn.init.constant_(self.gate.bias, self.config.gate_bias)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)

    def output_layers(self) -> list[nn.Module]:
        """The layers that score the vocabulary (an optimiser may treat them apart)."""
        return [self.out] + ([self.grounded.head] if self.grounded is not None else [])

    # -- pieces shared by teacher forcing and decoding ------------------------------------------
    def init_state(self, features: Tensor) -> State:
        mean = features.mean(dim=1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def precompute(self, features: Tensor) -> tuple[Tensor, ...]:
        """Image-only work of the attention, done once per image."""
        return self.attention.precompute(features)

    def _embed_input_proj(self, emb: Tensor, weight_ih: Tensor | None = None) -> Tensor:
        """The embedding's part of the LSTM input projection, plus both biases: (..., 4H)."""
        e = self.config.embed_dim
        w = (self.lstm.weight_ih if weight_ih is None else weight_ih)[:, :e]
        return nn.functional.linear(emb, w, self.lstm.bias_ih + self.lstm.bias_hh)

    def _cell(
        self,
        x_emb: Tensor,
        state: State,
        cache: tuple[Tensor, ...],
        detach_weights: bool = False,
        sample_rows: Tensor | None = None,
    ) -> tuple[State, Tensor, AttentionOutput]:
        h, c = state
        att = self.attention(cache, h) if sample_rows is None else self.attention(cache, h, sample_rows)
        z = self.gated(att.context, h)  # (B, D)
        w_ih, w_hh = self.lstm.weight_ih, self.lstm.weight_hh
        if detach_weights:  # teacher forcing: weight gradients come from _LSTMWeightGrads
            w_ih, w_hh = w_ih.detach(), w_hh.detach()
        gates = x_emb + nn.functional.linear(z, self._context_weight(w_ih)) + nn.functional.linear(h, w_hh)  # (B, 4H)
        return lstm_update(gates, c), z, att

    def gated(self, context: Tensor, h: Tensor) -> Tensor:
        """z_t = beta_t * context, beta_t = sigmoid(f_beta(h_{t-1})) (no gate: the context)."""
        return context if self.gate is None else torch.sigmoid(self.gate(h)) * context

    def _context_weight(self, w_ih: Tensor) -> Tensor:
        """The context's columns of the LSTM input weight, w_ih[:, E:] (4H, D), contiguous.

        The slice is a strided view, and a product with it at every step is slower than with a
        contiguous copy (measured in docs/performance.md).
        When decoding (no autograd) one copy is kept per version of the weight: an optimiser
        step or a load bumps the version, so the copy never goes stale. Training uses the view
        (a copy per step measured no faster there)."""
        view = w_ih[:, self.config.embed_dim :]
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or w_ih.is_inference():
            return view  # (inference tensors, made under inference_mode, have no version to key on)
        key = (w_ih.data_ptr(), w_ih._version, w_ih.device, w_ih.dtype, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_context_weight_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, view.contiguous())
            self.__dict__["_context_weight_cache"] = cached  # not a buffer: never saved
        return cached[1]

    def _logits(
        self, emb: Tensor, h: Tensor, z: Tensor, context: Tensor, context_only: Tensor | None = None
    ) -> Tensor:
        """Scores of the next word (..., V): logits, or log-probabilities with grounded words.
        ``context`` is the attended context before the gate; ``context_only`` (B, T) bool,
        training: steps whose word is predicted from z alone."""
        if self.config.deep_output:
            language = emb + self.out_h(h)  # (..., E)
            if context_only is not None:
                language = language.masked_fill(context_only.unsqueeze(-1), 0.0)
            logits = self.out(self.dropout(torch.tanh(language + self.out_z(z))))
        else:
            logits = self.out(self.dropout(h))
        if self.grounded is not None:
            return self.grounded(logits, self.dropout(context))
        return logits

    def step(
        self, tokens: Tensor, state: State, cache: tuple[Tensor, ...]
    ) -> tuple[Tensor, State, Tensor]:
        """One decoding step: previous tokens (B,) -> log-probabilities (B, V), state, alpha (B, N)."""
        emb = self.embedding(tokens)  # (B, E)
        state, z, att = self._cell(self._embed_input_proj(emb), state, cache)
        logits = self._logits(emb, state[0], z, att.context)
        return torch.log_softmax(logits.float(), dim=-1), state, att.alpha

    # -- teacher forcing -------------------------------------------------------------------------
    def forward(
        self, features: Tensor, captions: Tensor, lengths: Tensor, sample_rows: Tensor | None = None,
        regularise: bool = True,
    ) -> DecoderOutput:
        """Teacher-forced pass. captions (B, L) hold ``<start> w.. <end> <pad>..``; lengths (B,)
        count tokens including ``<start>`` and ``<end>``. Predicts captions[:, 1:].

        Stochastic attention in training: ``sample_rows`` (B,) bool makes every step of row b use
        a sampled location (True) or the expectation (False); None lets the attention draw them
        (``draw_sample_rows``: per caption, per batch or per step). ``regularise`` False turns
        word and language dropout off in training too (re-scoring sampled captions)."""
        assert features.dim() == 3, f"features must be (B, N, D), got {tuple(features.shape)}"
        assert captions.dim() == 2 and captions.size(0) == features.size(0), "captions must be (B, L)"
        inputs = captions[:, :-1]  # (B, T)
        p = self.config.word_dropout
        if self.training and regularise and p > 0:
            drop = torch.rand(inputs.shape, device=inputs.device) < p  # (B, T)
            drop[:, 0] = False  # <start> stays: it says where the caption begins
            inputs = inputs.masked_fill(drop & (inputs != PAD_ID), UNK_ID)
        steps = inputs.size(1)
        lengths = lengths.to(captions.device)
        mask = torch.arange(steps, device=captions.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
        # Longest captions first, so that step t runs on the first b_t rows only: the rows whose
        # caption has ended drop out instead of being computed and masked (a third of the work
        # on typical length spreads). Outputs are put back in the caller's order at the end.
        order = torch.argsort(lengths, descending=True, stable=True)
        restore = torch.argsort(order)
        features, inputs = features[order], inputs[order]
        if sample_rows is None and self.training:
            sample_rows = self.attention.draw_sample_rows(features.size(0), features.device)
        if sample_rows is not None:
            sample_rows = sample_rows.to(features.device)[order]
        active = (lengths[order] - 1).clamp(min=1).tolist()  # real steps per row, descending
        emb = self.embedding(inputs)  # (B, T, E)
        record = None
        needs_grads = self.lstm.weight_ih.requires_grad or self.lstm.weight_hh.requires_grad
        if torch.is_grad_enabled() and needs_grads and not torch.compiler.is_compiling():
            # The loop uses detached LSTM weights; their gradients are formed once for all steps.
            # (Not under torch.compile, which cannot trace the record; it fuses the loop itself.)
            record = _StepInputs(emb)
            x_emb = self._embed_input_proj(emb, self.lstm.weight_ih.detach())
            x_emb = _LSTMWeightGrads.apply(x_emb, self.lstm.weight_ih, self.lstm.weight_hh, record)
        else:
            x_emb = self._embed_input_proj(emb)  # (B, T, 4H), one matmul for all steps
        full_cache = self.precompute(features)
        state = self.init_state(features)
        h0 = state[0]
        batch, rows, cache = features.size(0), features.size(0), full_cache
        hs, zs, contexts, alphas, logps, sampled, ents = [], [], [], [], [], [], []
        # unbind: one backward node gathers the T step gradients, instead of T (B, T, 4H) buffers
        for t, x_t in enumerate(x_emb.unbind(1)):
            while rows > 1 and active[rows - 1] <= t:
                rows -= 1
            if rows < state[0].size(0):
                state = (state[0][:rows], state[1][:rows])
                cache = tuple(x[:rows] for x in full_cache)
            rows_mask = None if sample_rows is None else sample_rows[:rows]
            state, z, att = self._cell(x_t[:rows], state, cache, record is not None, rows_mask)
            hs.append(_pad_rows(state[0], batch))
            zs.append(_pad_rows(z, batch))
            if self.grounded is not None:
                contexts.append(_pad_rows(att.context, batch))
            alphas.append(_pad_rows(att.alpha, batch))
            if att.sample_log_prob is not None:
                logps.append(_pad_rows(att.sample_log_prob, batch))
                sampled.append(_pad_rows(att.sampled, batch))
                ents.append(_pad_rows(att.entropy, batch))
        h_all, z_all = torch.stack(hs, 1), torch.stack(zs, 1)  # (B, T, H), (B, T, D), sorted order
        if record is not None:
            # Step t starts from step t-1's state (h0 at t = 0); rows that have ended are zeros,
            # where the gate gradients are zero too.
            record.z = z_all.detach()
            record.h = torch.cat([h0.unsqueeze(1), h_all[:, :-1]], 1).detach()
        context_only = None
        if self.training and regularise and self.config.language_dropout > 0:
            context_only = torch.rand(mask.shape, device=mask.device) < self.config.language_dropout  # (B, T)
        z_out = z_all[restore]  # (B, T, D)
        # the gate's input (ungated context) only matters to grounded words; z stands in otherwise
        c_out = torch.stack(contexts, 1)[restore] if contexts else z_out  # (B, T, D)
        logits = self._logits(emb[restore], h_all[restore], z_out, c_out, context_only)  # (B, T, V)
        out = DecoderOutput(logits, torch.stack(alphas, 1)[restore], mask)
        if logps:
            out.sample_log_probs = torch.stack(logps, 1)[restore]
            out.sampled = torch.stack(sampled, 1)[restore]
            out.entropies = torch.stack(ents, 1)[restore]
        return out
