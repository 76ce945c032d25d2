"""Decoding with int8 weights on the CPU (dynamic quantisation of the decoder's matrix products).

Beam search at COCO sizes spends most of its time in six products per word: the LSTM's input
and recurrent projections, the deep output layer and the output layer over the vocabulary
(~12.7 M of the ~13.5 M multiply-adds of a beam step at the tutorial's shapes). ``Int8Decoder``
runs those with int8 weights (symmetric, one scale per output row) and activations quantised
per call (symmetric, one scale per row), multiplied by ``torch._int_mm``, PyTorch's plain int8
matrix product (no quantised tensor types). The attention, the gate, the LSTM's elementwise update and the
log-softmax stay fp32, as does the encoder.

It is a decoding-only snapshot of a float ``AttentionDecoder`` (training keeps the float
weights); build it after the weights are final.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.models.decoder import AttentionDecoder, State, lstm_update

QUANTIZE = ("none", "int8")


def int8_available() -> str | None:
    """None when int8 products can run here, else why not (one line)."""
    if not hasattr(torch, "_int_mm"):
        return f"this PyTorch ({torch.__version__}) has no int8 matrix product (torch._int_mm)"
    return None


def _to_int8(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of ``x`` with one scale per slice along ``dim`` (its max |x| -> 127)."""
    scale = (x.abs().amax(dim=dim, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear:
    """y = x W^T + b with W stored in int8 (one scale per output row) and each row of x (rows, in)
    quantised per call (one scale per row, so a caption never depends on the rows beside it);
    the product accumulates in int32 (``torch._int_mm``: |sum| <= 127 * 127 * in, far inside
    int32) and is rescaled to fp32. Same call as ``nn.Linear`` for 2-D inputs."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        q, scale = _to_int8(weight.detach().float().cpu(), dim=1)  # (out, in), (out, 1)
        self._weight = q.t().contiguous()  # (in, out): _int_mm multiplies (rows, in) by (in, out)
        self._scale = scale.t().contiguous()  # (1, out)
        self._bias = None if bias is None else bias.detach().float().cpu().contiguous()  # (out,)

    def __call__(self, x: Tensor) -> Tensor:
        q, scale = _to_int8(x.float(), dim=1)  # (rows, in), (rows, 1)
        y = torch._int_mm(q, self._weight).float() * (scale * self._scale)  # (rows, out)
        return y if self._bias is None else y + self._bias


class Int8Decoder:
    """Decodes like ``decoder`` (``precompute``, ``init_state``, ``step``: what greedy, beam
    search and sampling call), with its six large products in int8. CPU only."""

    def __init__(self, decoder: AttentionDecoder) -> None:
        reason = int8_available()
        if reason:
            raise RuntimeError(f"int8 decoding is not available: {reason}")
        device = decoder.lstm.weight_ih.device
        if device.type != "cpu":
            raise ValueError(
                f"int8 decoding runs on the CPU but the model is on {device}; "
                "use --device cpu, or fp32/bf16 on a GPU"
            )
        self.decoder = decoder
        e = decoder.config.embed_dim
        lstm = decoder.lstm
        with torch.no_grad():
            self.embed_proj = Int8Linear(lstm.weight_ih[:, :e], lstm.bias_ih + lstm.bias_hh)  # (4H, E)
            # Separate products for the word, the context and h: one activation scale each
            # (the context's range is far wider than h's, which one shared scale would crush).
            self.context_proj = Int8Linear(lstm.weight_ih[:, e:])  # (4H, D)
            self.hidden_proj = Int8Linear(lstm.weight_hh)  # (4H, H)
            self.deep = decoder.config.deep_output
            if self.deep:
                self.out_h = Int8Linear(decoder.out_h.weight, decoder.out_h.bias)  # L_h
                self.out_z = Int8Linear(decoder.out_z.weight)  # L_z
            self.out = Int8Linear(decoder.out.weight, decoder.out.bias)  # L_o: (V, E) or (V, H)

    def precompute(self, features: Tensor) -> tuple[Tensor, ...]:
        return self.decoder.precompute(features)

    def init_state(self, features: Tensor) -> State:
        return self.decoder.init_state(features)

    def step(self, tokens: Tensor, state: State, cache: tuple[Tensor, ...]) -> tuple[Tensor, State, Tensor]:
        """As ``AttentionDecoder.step`` (in eval mode): tokens (B,) -> log-probs (B, V), state, alpha (B, N)."""
        d = self.decoder
        emb = d.embedding(tokens)  # (B, E)
        h, c = state
        att = d.attention(cache, h)
        z = d.gated(att.context, h)  # (B, D)
        h, c = lstm_update(self.embed_proj(emb) + self.context_proj(z) + self.hidden_proj(h), c)  # (B, H)
        if self.deep:
            logits = self.out(torch.tanh(emb + self.out_h(h) + self.out_z(z)))
        else:
            logits = self.out(h)
        if d.grounded is not None:  # a small head (the group words x D): kept in fp32
            logits = d.grounded(logits, att.context)
        return torch.log_softmax(logits, dim=-1), (h, c), att.alpha  # (B, V)


def quantize_decoder(decoder: AttentionDecoder, scheme: str = "int8") -> AttentionDecoder | Int8Decoder:
    """``"none"``: the decoder itself; ``"int8"``: an ``Int8Decoder`` snapshot of it."""
    if scheme not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {scheme!r}")
    return decoder if scheme == "none" else Int8Decoder(decoder)
