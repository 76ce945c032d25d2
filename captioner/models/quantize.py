"""Decoding with int8 weights on the CPU (dynamic quantisation of the decoder's matrix products).

Beam search at COCO sizes spends most of its time in six products per word: the LSTM's input
and recurrent projections, the deep output layer and the output layer over the vocabulary
(~12.7 M of the ~13.5 M multiply-adds of a beam step at the tutorial's shapes). ``Int8Decoder``
runs those with int8 weights (symmetric, one scale per output row) and activations quantised
per call from their range, through PyTorch's fbgemm/x86 kernels: about twice the fp32
throughput on AVX2 cores. The attention, the gate, the LSTM's elementwise update and the
log-softmax stay fp32, as does the encoder.

It is a decoding-only snapshot of a float ``AttentionDecoder`` (training keeps the float
weights); build it after the weights are final. An activation's scale comes from the whole
batch at that step, so an image's caption can depend slightly on the images beside it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from captioner.models.decoder import AttentionDecoder, State, lstm_update

QUANTIZE = ("none", "int8")


def int8_available() -> str | None:
    """None when int8 products can run here, else why not (one line)."""
    engine = torch.backends.quantized.engine
    if engine == "none" or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "this PyTorch build has no quantised CPU kernels (torch.backends.quantized.engine is 'none')"
    return None


class Int8Linear:
    """y = x W^T + b with W stored in int8, one scale per output row; x (rows, in) fp32 is
    quantised per call from its min/max. Same call as ``nn.Linear`` for 2-D inputs."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        w = weight.detach().float().cpu().contiguous()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # (out,)
        zero = torch.zeros(w.size(0), dtype=torch.long)
        with warnings.catch_warnings():
            # Recent torch releases mark quantised tensor dtypes deprecated; fbgemm's packed int8
            # products are still the fast int8 path on CPUs, and int8_available() reports
            # their absence should a release drop them.
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated", category=UserWarning)
            qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float().cpu().contiguous()
        self._packed = torch.ops.quantized.linear_prepack(qweight, b)
        # fbgemm's AVX2 kernels add int8 x uint8 pairs in int16 and can saturate with 8-bit
        # activations; 7-bit activations (reduce_range) cannot.
        self._reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, self._reduce_range)


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
                f"int8 decoding runs on the CPU (fbgemm/x86 kernels) but the model is on {device}; "
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
