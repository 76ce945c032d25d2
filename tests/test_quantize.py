"""Int8 decoding (models.quantize): close to the float decoder, same captions once trained."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioner.checkpoint import load_checkpoint
from captioner.data.vocab import END_ID, START_ID
from captioner.decoding import beam_search, greedy
from captioner.inference import CaptionPipeline
from captioner.models import ATTENTIONS, AttentionDecoder, DecoderConfig
from captioner.models.quantize import (
    QUANTIZE,
    Int8Decoder,
    Int8Linear,
    int8_available,
    quantize_decoder,
)

pytestmark = pytest.mark.skipif(int8_available() is not None, reason=str(int8_available()))


def _decoder(attention: str = "soft", deep_output: bool = True, vocab: int = 30, grounded: bool = False
             ) -> AttentionDecoder:
    torch.manual_seed(0)
    words = [f"w{i}" for i in range(vocab)]
    cfg = DecoderConfig(attention=attention, embed_dim=16, attention_dim=16, decoder_dim=24, num_heads=4,
                        deep_output=deep_output, grounded_words=[words[7:10], words[20:22]] if grounded else None)
    return AttentionDecoder(cfg, vocab_size=vocab, encoder_dim=32, words=words).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_within_quantisation_error_of_the_float_product(bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=bias)
    x = torch.randn(50, 64)
    exact = lin(x).detach()
    approx = Int8Linear(lin.weight, lin.bias)(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    # 8-bit weights and 7-bit activations: ~1 % of the output range, far from a wrong product
    err = (approx - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.03, err


@pytest.mark.parametrize(("attention", "deep_output", "grounded"),
                         [*((name, True, False) for name in ATTENTIONS.names()), ("soft", False, False),
                          ("soft", True, True)])
@torch.inference_mode()
def test_int8_step_is_close_to_the_float_step(attention: str, deep_output: bool, grounded: bool) -> None:
    dec = _decoder(attention, deep_output, grounded=grounded)
    q = Int8Decoder(dec)
    features = torch.randn(3, 9, 32).relu()  # (B, N, D), ReLU features as a CNN gives
    cache, state = q.precompute(features), q.init_state(features)
    tokens = torch.tensor([START_ID, 7, 12])
    logp, (h, c), alpha = dec.step(tokens, state, cache)
    logp_q, (h_q, c_q), alpha_q = q.step(tokens, state, cache)
    assert logp_q.shape == logp.shape and alpha_q.shape == alpha.shape
    torch.testing.assert_close(alpha_q, alpha)  # the attention reads h_{t-1}: still float
    torch.testing.assert_close(h_q, h, atol=0.02, rtol=0)
    torch.testing.assert_close(c_q, c, atol=0.02, rtol=0)
    torch.testing.assert_close(logp_q, logp, atol=0.05, rtol=0)
    torch.testing.assert_close(logp_q.exp().sum(-1), torch.ones(3))


def _trained_decoder() -> tuple[AttentionDecoder, torch.Tensor, torch.Tensor]:
    """A small decoder that has learnt six captions by heart (one per random image)."""
    torch.manual_seed(0)
    cfg = DecoderConfig(embed_dim=32, attention_dim=32, decoder_dim=48, dropout=0.0)
    dec = AttentionDecoder(cfg, vocab_size=20, encoder_dim=32)
    features = torch.randn(6, 9, 32).relu()
    words = torch.randint(4, 20, (6, 6))
    captions = torch.cat([torch.full((6, 1), START_ID), words, torch.full((6, 1), END_ID)], 1)  # (B, 8)
    lengths = torch.full((6,), captions.size(1))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(150):
        out = dec(features, captions, lengths)
        loss = nn.functional.cross_entropy(out.logits.reshape(-1, 20), captions[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval(), features, captions


def test_a_trained_decoder_gives_the_same_captions_in_int8() -> None:
    dec, features, captions = _trained_decoder()
    q = quantize_decoder(dec, "int8")
    ref = greedy(dec, features, max_length=10)
    assert torch.equal(ref.tokens[:, : captions.size(1) - 1], captions[:, 1:])  # it did learn them
    for k in (1, 3):
        exact, fast = beam_search(dec, features, k, 10), beam_search(q, features, k, 10)
        assert torch.equal(fast.tokens, exact.tokens) and torch.equal(fast.lengths, exact.lengths)
        torch.testing.assert_close(fast.alphas, exact.alphas, atol=0.02, rtol=0)
        torch.testing.assert_close(fast.scores, exact.scores, atol=0.05, rtol=0.02)
    # beam size 1 is greedy in int8 too
    g, b1 = greedy(q, features, 10), beam_search(q, features, 1, 10)
    assert torch.equal(g.tokens, b1.tokens)
    torch.testing.assert_close(g.scores, b1.scores)


def test_quantize_settings_are_checked() -> None:
    dec = _decoder()
    assert quantize_decoder(dec, "none") is dec and QUANTIZE == ("none", "int8")
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_decoder(dec, "int4")
    with pytest.raises(ValueError, match="runs on the CPU.*meta"):
        Int8Decoder(_decoder().to("meta"))


def test_pipeline_decodes_through_the_int8_decoder(tiny_checkpoint) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="needs precision='fp32'"):
        CaptionPipeline(loaded, quantize="int8", precision="bf16")
    assert CaptionPipeline(loaded).decoder is loaded.model.decoder
    pipe = CaptionPipeline(loaded, beam_size=2, quantize="int8")
    assert isinstance(pipe.decoder, Int8Decoder) and pipe.decoder.decoder is loaded.model.decoder
    images = torch.randn(4, 3, 32, 32)
    exact, fast = CaptionPipeline(loaded, beam_size=2)(images), pipe(images)
    # (a barely trained model: captions may differ; the trained decoder above pins them down)
    for c, e in zip(fast, exact, strict=True):
        assert c.words and c.alphas.shape[1:] == e.alphas.shape[1:] and c.alphas.shape[0] == len(c.words)
        assert torch.isfinite(torch.tensor(c.score))
