"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015, Sec. 3.1.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captioner.models.attention import AttentionOutput, create_attention


@dataclass
class DecoderConfig:
    """Decoder settings. ``attention`` is a name from the attention registry."""

    attention: str = "soft"
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    gate: str = "scalar"  # "scalar" (the paper's beta_t), "vector" (per channel) or "none"
    deep_output: bool = True  # Eq. 7; False: logits = W h_t
    num_heads: int = 8  # multihead only
    semi_sampling: float = 0.5  # hard only
    hard_test_mode: str = "expectation"  # hard only: "expectation" or "argmax"

    def __post_init__(self) -> None:
        if self.gate not in ("scalar", "vector", "none"):
            raise ValueError(f"gate must be 'scalar', 'vector' or 'none', got {self.gate!r}")


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, V) predictions of captions[:, 1:]
    alphas: Tensor  # (B, T, N)
    mask: Tensor  # (B, T) True on real (unpadded) steps
    # Hard attention (training) only: per-step log p(s_t), sample flags and entropies.
    sample_log_probs: Tensor | None = None  # (B, T)
    sampled: Tensor | None = None  # (B, T) bool
    entropies: Tensor | None = None  # (B, T)


State = tuple[Tensor, Tensor]


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

    def __init__(self, config: DecoderConfig, vocab_size: int, encoder_dim: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        c = config
        extra = {}
        if c.attention == "multihead":
            extra["num_heads"] = c.num_heads
        elif c.attention == "hard":
            extra = {"semi_sampling": c.semi_sampling, "test_mode": c.hard_test_mode}
        self.attention = create_attention(c.attention, encoder_dim, c.decoder_dim, c.attention_dim, **extra)
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)

    # -- pieces shared by teacher forcing and decoding ------------------------------------------
    def init_state(self, features: Tensor) -> State:
        mean = features.mean(dim=1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def precompute(self, features: Tensor) -> tuple[Tensor, ...]:
        """Image-only work of the attention, done once per image."""
        return self.attention.precompute(features)

    def _embed_input_proj(self, emb: Tensor) -> Tensor:
        """The embedding's part of the LSTM input projection, plus both biases: (..., 4H)."""
        e = self.config.embed_dim
        w = self.lstm.weight_ih[:, :e]
        return nn.functional.linear(emb, w, self.lstm.bias_ih + self.lstm.bias_hh)

    def _cell(self, x_emb: Tensor, state: State, cache: tuple[Tensor, ...]) -> tuple[State, Tensor, AttentionOutput]:
        h, c = state
        att = self.attention(cache, h)
        z = att.context  # (B, D)
        if self.gate is not None:
            z = torch.sigmoid(self.gate(h)) * z
        e = self.config.embed_dim
        gates = x_emb + nn.functional.linear(z, self.lstm.weight_ih[:, e:]) + nn.functional.linear(
            h, self.lstm.weight_hh
        )  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h, c), z, att

    def _logits(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        if self.config.deep_output:
            return self.out(self.dropout(torch.tanh(emb + self.out_h(h) + self.out_z(z))))
        return self.out(self.dropout(h))

    def step(
        self, tokens: Tensor, state: State, cache: tuple[Tensor, ...]
    ) -> tuple[Tensor, State, Tensor]:
        """One decoding step: previous tokens (B,) -> log-probabilities (B, V), state, alpha (B, N)."""
        emb = self.embedding(tokens)  # (B, E)
        state, z, att = self._cell(self._embed_input_proj(emb), state, cache)
        logits = self._logits(emb, state[0], z)
        return torch.log_softmax(logits.float(), dim=-1), state, att.alpha

    # -- teacher forcing -------------------------------------------------------------------------
    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor) -> DecoderOutput:
        """Teacher-forced pass. captions (B, L) hold ``<start> w.. <end> <pad>..``; lengths (B,)
        count tokens including ``<start>`` and ``<end>``. Predicts captions[:, 1:]."""
        assert features.dim() == 3, f"features must be (B, N, D), got {tuple(features.shape)}"
        assert captions.dim() == 2 and captions.size(0) == features.size(0), "captions must be (B, L)"
        inputs = captions[:, :-1]  # (B, T)
        steps = inputs.size(1)
        mask = torch.arange(steps, device=captions.device).unsqueeze(0) < (lengths.to(captions.device) - 1).unsqueeze(1)
        emb = self.embedding(inputs)  # (B, T, E)
        x_emb = self._embed_input_proj(emb)  # (B, T, 4H), one matmul for all steps
        cache = self.precompute(features)
        state = self.init_state(features)
        hs, zs, alphas, logps, sampled, ents = [], [], [], [], [], []
        for t in range(steps):
            state, z, att = self._cell(x_emb[:, t], state, cache)
            hs.append(state[0])
            zs.append(z)
            alphas.append(att.alpha)
            if att.sample_log_prob is not None:
                logps.append(att.sample_log_prob)
                sampled.append(att.sampled)
                ents.append(att.entropy)
        logits = self._logits(emb, torch.stack(hs, 1), torch.stack(zs, 1))  # (B, T, V)
        out = DecoderOutput(logits, torch.stack(alphas, 1), mask)
        if logps:
            out.sample_log_probs = torch.stack(logps, 1)
            out.sampled = torch.stack(sampled, 1)
            out.entropies = torch.stack(ents, 1)
        return out
