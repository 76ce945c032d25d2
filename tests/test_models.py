"""Every encoder x attention: shapes, finite values, gradients everywhere; the decoder's maths."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import captioner.models.attention as attention_module
from captioner.models import (
    ATTENTIONS,
    ENCODERS,
    AttentionDecoder,
    Captioner,
    DecoderConfig,
    EncoderConfig,
)
from captioner.models.attention import Attention, SoftAttention
from captioner.models.encoder import ChannelSplit, SplitStem, create_encoder, encoder_preprocessing

SMALL_DEC = {"embed_dim": 16, "attention_dim": 16, "decoder_dim": 24, "num_heads": 4, "dropout": 0.0}


def _captions(b: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([length - i % 3 for i in range(b)])
    caps = torch.randint(4, vocab, (b, length))
    caps[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        caps[i, n - 1] = 2
        caps[i, n:] = 0
    return caps, lengths


# Every attention on one encoder of each family, every encoder with soft attention: the attention
# never looks past the (B, N, D) features, so the rest of the cross product adds time, not cover.
_PAIRS = sorted({(e, a) for e in ENCODERS.names() for a in ATTENTIONS.names()
                 if a == "soft" or e in ("shapes_cnn", "resnet50", "vgg16")})


@pytest.mark.parametrize(("encoder", "attention"), _PAIRS)
def test_every_encoder_and_attention_trains(encoder: str, attention: str) -> None:
    enc = EncoderConfig(name=encoder, grid=2 if encoder.startswith("vgg") else 3, trainable_blocks=1, channels=16)
    model = Captioner(enc, DecoderConfig(attention=attention, **SMALL_DEC), vocab_size=20).train()
    size = 64
    images = torch.randn(2, 3, size, size)
    feats, (h, w) = model.encode(images)
    assert feats.shape == (2, h * w, model.encoder.out_dim)
    caps, lengths = _captions(2, 6, 20)
    out = model(images, caps, lengths)
    assert out.logits.shape == (2, 5, 20)
    assert out.alphas.shape == (2, 5, h * w)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.alphas).all()
    # each real step's map sums to 1; steps after a caption's end are not computed (zeros)
    torch.testing.assert_close(out.alphas.sum(-1), out.mask.float())
    loss = out.logits.logsumexp(-1).sum() + (out.alphas ** 2).sum()
    if out.sample_log_probs is not None:
        loss = loss + out.sample_log_probs.sum() + out.entropies.sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_frozen_blocks_have_no_grad_and_keep_batchnorm_stats() -> None:
    enc = create_encoder(EncoderConfig(name="resnet50", grid=2, trainable_blocks=1))
    trainable = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"4"}, trainable  # only layer4
    enc.train()
    assert not enc.blocks[0][1].training  # the stem's BatchNorm stays in eval mode
    assert enc.blocks[4].training


def test_encoder_preprocessing_matches_weights() -> None:
    p = encoder_preprocessing(EncoderConfig(name="resnet101", pretrained=True))
    assert p.image_size == 256 and p.mean == pytest.approx([0.485, 0.456, 0.406])
    assert encoder_preprocessing(EncoderConfig(name="shapes_cnn")).image_size == 64


def test_pretrained_weights_error_says_how_to_pass_a_local_file(monkeypatch) -> None:
    import torchvision

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="weights_path"):
        create_encoder(EncoderConfig(name="resnet50", pretrained=True))


def test_local_weights_file_is_loaded(tmp_path) -> None:
    import torchvision

    ref = torchvision.models.vgg16(weights=None)
    torch.save(ref.state_dict(), tmp_path / "vgg16.pth")
    enc = create_encoder(EncoderConfig(name="vgg16", weights_path=str(tmp_path / "vgg16.pth")))
    torch.testing.assert_close(enc.blocks[0][0].weight, ref.features[0].weight)


def test_shapes_cnn_can_append_the_position_code_to_every_region() -> None:
    from captioner.models.encoder import positional_grid

    mixed = create_encoder(EncoderConfig(name="shapes_cnn", grid=4, channels=16))
    appended = create_encoder(EncoderConfig(name="shapes_cnn", grid=4, channels=16, position="append"))
    assert appended.out_dim == mixed.out_dim + appended.pos_channels
    feats, (h, w) = appended(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, h * w, appended.out_dim)
    code = positional_grid(appended.pos_channels, h, w).flatten(1).T  # (N, P)
    torch.testing.assert_close(feats[0, :, -appended.pos_channels:], code)
    torch.testing.assert_close(feats[1, :, -appended.pos_channels:], code)
    with pytest.raises(ValueError, match="encoder.position"):
        create_encoder(EncoderConfig(name="shapes_cnn", position="concat"))


@pytest.mark.parametrize("grid", [8, 16])
def test_shapes_cnn_cells_are_centred_on_their_own_pixels(grid: int) -> None:
    """With constant (symmetric) kernels each output cell's receptive field is a symmetric
    window, so the gradient's centroid is its centre: it must be the middle of the cell's pixels
    (what the upsampled attention map assumes), for cells whose field is not cut by the border."""
    enc = create_encoder(EncoderConfig(name="shapes_cnn", grid=grid, channels=16)).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.01)
    size = 64
    x = torch.full((1, 3, size, size), 0.5, requires_grad=True)
    feats, (h, w) = enc(x)
    assert (h, w) == (grid, grid)
    cell = size // grid
    coords = torch.arange(size, dtype=torch.float64)
    checked = 0
    for r in range(grid):
        (g,) = torch.autograd.grad(feats[0, r * grid + r, :16].sum(), x, retain_graph=True)
        weight = g.abs().sum((0, 1)).double()  # (S, S)
        rows = weight.sum(1).nonzero().flatten()
        if rows.min() == 0 or rows.max() == size - 1:
            continue  # truncated by the border: its centroid moves inwards
        centre = cell * r + (cell - 1) / 2
        assert (weight.sum(1) * coords).sum() / weight.sum() == pytest.approx(centre, abs=1e-6)
        assert (weight.sum(0) * coords).sum() / weight.sum() == pytest.approx(centre, abs=1e-6)
        checked += 1
    assert checked >= 2


def test_unknown_names_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="model.encoder.name must be one of resnet101.*got .nope."):
        create_encoder(EncoderConfig(name="nope"))
    with pytest.raises(ValueError, match="model.decoder.attention must be one of hard, multihead, soft"):
        AttentionDecoder(DecoderConfig(attention="nope"), 10, 8)
    with pytest.raises(ValueError, match="divisible"):
        AttentionDecoder(DecoderConfig(attention="multihead", attention_dim=10, num_heads=4), 10, 8)


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_bf16_autocast_gradients_match_fp32(attention: str) -> None:
    """Under autocast (what --trainer.precision bf16-mixed does) every parameter still gets an
    fp32 gradient, close to the fp32 one: the LSTM's hand-written weight gradients included."""
    torch.manual_seed(0)
    dec = AttentionDecoder(DecoderConfig(attention=attention, **SMALL_DEC), vocab_size=15, encoder_dim=12).eval()
    feats = torch.randn(3, 5, 12)
    caps, lengths = _captions(3, 6, 15)

    def grads(bf16: bool) -> dict[str, torch.Tensor]:
        dec.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = dec(feats, caps, lengths)
        out.logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in dec.named_parameters() if p.grad is not None}

    ref, low = grads(False), grads(True)
    assert ref.keys() == low.keys()
    for name, g in low.items():
        assert g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        if ref[name].norm() < 1e-4:  # e.g. the score bias: softmax ignores it, its gradient is noise
            continue
        # bf16 keeps ~3 significant digits; compare directions, not values
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.97, (name, float(cos))


@pytest.mark.parametrize("attention", ["soft", "multihead"])
def test_mixed_lengths_batch_equals_captions_one_by_one(attention: str) -> None:
    """forward drops rows from the batch as their captions end (longest first, then put back in
    order): loss and every gradient equal those of the captions decoded one at a time."""
    torch.manual_seed(0)
    dec = AttentionDecoder(DecoderConfig(attention=attention, **SMALL_DEC), vocab_size=15, encoder_dim=12).eval()
    feats = torch.randn(4, 5, 12)
    caps, _ = _captions(4, 7, 15)
    lengths = torch.tensor([4, 7, 2, 5])  # unsorted, one caption with a single step
    for i, n in enumerate(lengths.tolist()):
        caps[i, n - 1], caps[i, n:] = 2, 0

    def loss_and_grads(rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dec.zero_grad(set_to_none=True)
        out = dec(feats[rows], caps[rows], lengths[rows])
        ce = torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), caps[rows, 1:], reduction="none")
        loss = (ce * out.mask).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads([0, 1, 2, 3])
    singles = [loss_and_grads([i]) for i in range(4)]
    torch.testing.assert_close(loss, sum(s[0] for s in singles))
    for name, g in grads.items():
        torch.testing.assert_close(g, sum(s[1][name] for s in singles), msg=name)


def test_decoder_cell_equals_lstmcell_and_step_equals_forward() -> None:
    """The hand-written LSTM (fused input projection) is nn.LSTMCell's maths, and step-by-step
    decoding gives exactly the teacher-forced logits."""
    dec = AttentionDecoder(DecoderConfig(**SMALL_DEC), vocab_size=15, encoder_dim=12).eval()
    feats = torch.randn(3, 5, 12)
    caps, lengths = _captions(3, 6, 15)
    out = dec(feats, caps, lengths)
    cache, state = dec.precompute(feats), dec.init_state(feats)
    for t in range(caps.size(1) - 1):
        h0, c0 = state
        logp, state, alpha = dec.step(caps[:, t], state, cache)
        real = out.mask[:, t]  # forward skips the steps after each caption's end
        assert real.any()
        torch.testing.assert_close(logp[real], torch.log_softmax(out.logits[real, t], -1))
        torch.testing.assert_close(alpha[real], out.alphas[real, t])
        # same state as nn.LSTMCell on [E y; beta * z]
        att = dec.attention(cache, h0)
        z = torch.sigmoid(dec.gate(h0)) * att.context
        h_ref, c_ref = dec.lstm(torch.cat([dec.embedding(caps[:, t]), z], 1), (h0, c0))
        torch.testing.assert_close(state[0], h_ref)
        torch.testing.assert_close(state[1], c_ref)


def test_scalar_gate_is_scalar_and_vector_gate_is_per_channel() -> None:
    assert AttentionDecoder(DecoderConfig(gate="scalar", **SMALL_DEC), 10, 12).gate.out_features == 1
    assert AttentionDecoder(DecoderConfig(gate="vector", **SMALL_DEC), 10, 12).gate.out_features == 12
    assert AttentionDecoder(DecoderConfig(gate="none", **SMALL_DEC), 10, 12).gate is None


def test_soft_attention_projects_features_once_per_image(monkeypatch) -> None:
    dec = AttentionDecoder(DecoderConfig(**SMALL_DEC), vocab_size=15, encoder_dim=12)
    calls = []
    proj: nn.Linear = dec.attention.encoder_proj
    proj.register_forward_hook(lambda *a: calls.append(1))
    caps, lengths = _captions(2, 8, 15)
    dec(torch.randn(2, 5, 12), caps, lengths)
    assert len(calls) == 1


def test_hard_attention_is_deterministic_in_eval_and_stochastic_in_training() -> None:
    dec = AttentionDecoder(DecoderConfig(attention="hard", **SMALL_DEC), vocab_size=15, encoder_dim=12)
    feats = torch.randn(4, 6, 12)
    caps, lengths = _captions(4, 7, 15)
    dec.eval()
    a, b = dec(feats, caps, lengths), dec(feats, caps, lengths)
    torch.testing.assert_close(a.logits, b.logits)
    assert a.sample_log_probs is None
    dec.train()
    out = dec(feats, caps, lengths)
    assert out.sample_log_probs.shape == (4, 6) and (out.sample_log_probs <= 0).all()
    assert 0 < out.sampled.float().mean() < 1  # semi-sampling: about half the steps sample


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_every_attention_type_builds_itself_from_the_decoder_config(attention: str) -> None:
    """The decoder passes each type the arguments it picks from DecoderConfig, and what the
    type declares (stochastic or not) is what it does in training."""
    cls = ATTENTIONS.get(attention)
    assert issubclass(cls, Attention)
    config = DecoderConfig(attention=attention, **SMALL_DEC)
    assert set(cls.options(config)) <= set(inspect.signature(cls).parameters)
    dec = AttentionDecoder(config, vocab_size=15, encoder_dim=12).train()
    assert type(dec.attention) is cls
    caps, lengths = _captions(2, 5, 15)
    out = dec(torch.randn(2, 4, 12), caps, lengths)
    assert (out.sample_log_probs is not None) == cls.stochastic
    assert dec.attention.anneal(0) is False  # no warm-up in the default settings


class _Custom(SoftAttention):
    """A type the decoder has never heard of, with a setting of its own and its own draw."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int, heads: int = 1) -> None:
        super().__init__(encoder_dim, decoder_dim, attention_dim)
        self.heads = heads
        self.draws: list[int] = []
        self.seen: list[torch.Tensor | None] = []

    @classmethod
    def options(cls, config: DecoderConfig) -> dict:
        return {"heads": config.num_heads}

    def draw_sample_rows(self, batch: int, device: torch.device) -> torch.Tensor:
        self.draws.append(batch)
        return torch.arange(batch, device=device) % 2 == 0

    def forward(self, cache, h, sample_rows=None):
        self.seen.append(sample_rows)
        return super().forward(cache, h)


def test_a_newly_registered_attention_gets_its_options_and_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ATTENTIONS._items, "custom", _Custom)
    dec = AttentionDecoder(DecoderConfig(attention="custom", **SMALL_DEC), vocab_size=15, encoder_dim=12)
    assert isinstance(dec.attention, _Custom) and dec.attention.heads == SMALL_DEC["num_heads"]
    caps, lengths = _captions(4, 6, 15)
    dec.train()(torch.randn(4, 5, 12), caps, lengths)
    assert dec.attention.draws == [4]  # once per pass, not per step
    assert all(rows is not None for rows in dec.attention.seen)
    dec.attention.draws.clear()
    dec.eval()(torch.randn(4, 5, 12), caps, lengths)
    assert dec.attention.draws == []  # nothing is drawn outside training


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gate_bias_opens_the_gate_and_changes_nothing_else(gate: str) -> None:
    torch.manual_seed(0)
    default = AttentionDecoder(DecoderConfig(gate=gate, **SMALL_DEC), 10, 12)
    torch.manual_seed(0)
    opened = AttentionDecoder(DecoderConfig(gate=gate, gate_bias=2.0, **SMALL_DEC), 10, 12)
    assert torch.all(opened.gate.bias == 2.0)
    h = torch.zeros(3, SMALL_DEC["decoder_dim"])
    assert torch.sigmoid(opened.gate(h)).min() > 0.88  # beta = sigmoid(2) with h = 0
    for (name, a), (_, b) in zip(default.named_parameters(), opened.named_parameters(), strict=True):
        if name != "gate.bias":
            assert torch.equal(a, b), name


def test_context_weight_copy_follows_the_weight() -> None:
    """The contiguous copy of the LSTM's context weight used outside autograd is the slice's
    value, and is replaced after an optimiser step, a load or inside inference mode."""
    torch.manual_seed(0)
    dec = AttentionDecoder(DecoderConfig(**SMALL_DEC), vocab_size=15, encoder_dim=12)
    feats = torch.randn(3, 5, 12)
    caps, lengths = _captions(3, 6, 15)
    e = dec.config.embed_dim

    def check() -> None:
        with torch.no_grad():
            w = dec._context_weight(dec.lstm.weight_ih)
        assert w.is_contiguous()
        assert torch.equal(w, dec.lstm.weight_ih[:, e:])
        with torch.inference_mode():
            assert torch.equal(dec._context_weight(dec.lstm.weight_ih), dec.lstm.weight_ih[:, e:])

    check()
    # training: gradients still reach the weight (teacher forcing owns them; plain autograd
    # through the slice where the weight is not detached)
    opt = torch.optim.SGD(dec.parameters(), lr=0.5)
    out = dec(feats, caps, lengths)
    out.logits.logsumexp(-1).sum().backward()
    assert dec.lstm.weight_ih.grad[:, e:].abs().sum() > 0
    opt.step()
    check()
    dec.load_state_dict(AttentionDecoder(DecoderConfig(**SMALL_DEC), vocab_size=15, encoder_dim=12).state_dict())
    check()
    # the cached path gives the slice's results: step-by-step decoding equals teacher forcing
    dec.eval()
    with torch.no_grad():
        ref = dec(feats, caps, lengths).logits
        cache, state = dec.precompute(feats), dec.init_state(feats)
        logp, _, _ = dec.step(caps[:, 0], state, cache)
    torch.testing.assert_close(logp, torch.log_softmax(ref[:, 0], -1))


# -- the decoder's fast paths against the plain maths ---------------------------------------------
def _tiny_decoder(attention: str = "soft", gate: str = "scalar") -> AttentionDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(attention=attention, embed_dim=8, attention_dim=10, decoder_dim=12, num_heads=2,
                        dropout=0.0, gate=gate)
    return AttentionDecoder(cfg, vocab_size=20, encoder_dim=6)


def _reference_forward(dec: AttentionDecoder, feats, captions):
    """Teacher forcing written the obvious way: tanh attention, nn.LSTMCell, per-step logits."""
    att = dec.attention
    proj = att.encoder_proj(feats)  # (B, N, A)
    h, c = dec.init_state(feats)
    logits, alphas = [], []
    for t in range(captions.size(1) - 1):
        emb = dec.embedding(captions[:, t])
        e = att.score(torch.tanh(proj + att.hidden_proj(h).unsqueeze(1))).squeeze(-1)  # (B, N)
        alpha = F.softmax(e, -1)
        z = (alpha.unsqueeze(-1) * feats).sum(1)
        if dec.gate is not None:
            z = torch.sigmoid(dec.gate(h)) * z
        h, c = dec.lstm(torch.cat([emb, z], 1), (h, c))
        logits.append(dec.out(torch.tanh(emb + dec.out_h(h) + dec.out_z(z))))
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


@pytest.mark.parametrize("gate", ["scalar", "vector", "none"])
def test_teacher_forcing_and_its_gradients_equal_the_plain_maths(gate: str) -> None:
    dec = _tiny_decoder(gate=gate).train()
    feats = torch.randn(4, 5, 6)
    caps = torch.randint(4, 20, (4, 7))
    lengths = torch.tensor([7, 6, 7, 4])
    grads = []
    for run in ("fast", "reference"):
        dec.zero_grad()
        if run == "fast":
            out = dec(feats, caps, lengths)
            logits, alphas = out.logits, out.alphas
        else:
            logits, alphas = _reference_forward(dec, feats, caps)
        # real steps only: the fast path does not compute the steps after a caption's end
        real = torch.arange(caps.size(1) - 1) < (lengths - 1).unsqueeze(1)  # (B, T)
        loss = (F.cross_entropy(logits[real], caps[:, 1:][real])
                + ((1 - (alphas * real.unsqueeze(-1)).sum(1)) ** 2).sum())
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None})
        if run == "fast":
            fast_logits, fast_alphas = logits.detach(), alphas.detach()
    torch.testing.assert_close(fast_logits[real], logits.detach()[real])
    torch.testing.assert_close(fast_alphas[real], alphas.detach()[real])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("attention", ["soft", "hard", "multihead"])
def test_beams_sharing_the_image_cache_equal_copies_of_it(attention: str) -> None:
    dec = _tiny_decoder(attention).eval()
    feats, k = torch.randn(3, 5, 6), 4
    h = torch.randn(3 * k, 12)
    with torch.no_grad():
        cache = dec.precompute(feats)
        shared = dec.attention(cache, h)
        copied = dec.attention(tuple(c.repeat_interleave(k, 0) for c in cache), h)
    torch.testing.assert_close(shared.context, copied.context)
    torch.testing.assert_close(shared.alpha, copied.alpha)


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_attention_scores_equal_one_pass(monkeypatch, grad: bool) -> None:
    dec = _tiny_decoder().eval()
    feats = torch.randn(5, 4, 6)
    h = torch.randn(5 * 3, 12, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        _, proj2 = dec.precompute(feats)
        whole = dec.attention.scores(proj2, h)
        monkeypatch.setattr(attention_module, "SCORE_CHUNK_ELEMENTS", 3 * 4 * 10 * 2)  # 2 images (grad)
        chunked = dec.attention.scores(proj2, h)
    torch.testing.assert_close(chunked, whole)
    if grad:
        (g1,) = torch.autograd.grad(whole.sum(), h)
        (g2,) = torch.autograd.grad(chunked.sum(), h)
        torch.testing.assert_close(g1, g2)


def test_word_dropout_replaces_previous_words_in_training_only() -> None:
    """Word dropout feeds <unk> for some previous words in training (never <start>, never padding);
    eval, p = 0 and ``regularise=False`` (re-scoring sampled captions) see the words as given."""
    from dataclasses import replace

    from captioner.data.vocab import UNK_ID

    torch.manual_seed(0)
    plain = _tiny_decoder()
    dec = AttentionDecoder(replace(plain.config, word_dropout=0.5, dropout=0.0), plain.vocab_size, plain.encoder_dim)
    dec.load_state_dict(plain.state_dict())
    seen = []
    dec.embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    feats = torch.randn(4, 9, plain.encoder_dim)
    captions, lengths = _captions(4, 7, plain.vocab_size)
    captions = captions.masked_fill(captions == UNK_ID, 4)  # so that every <unk> seen was put there
    order = torch.argsort(lengths, descending=True, stable=True)  # the order the decoder runs rows in
    captions, lengths = captions[order], lengths[order]
    dec.train()
    out = dec(feats, captions, lengths)
    inputs = seen[-1]
    real = inputs != 0
    dropped = (inputs == UNK_ID) & real
    assert dropped.any() and not dropped[:, 0].any()
    assert torch.equal(inputs[~dropped], captions[:, :-1][~dropped])
    assert out.logits.shape[:2] == captions[:, 1:].shape
    for training, kwargs in ((False, {}), (True, {"regularise": False})):
        dec.train(training)(feats, captions, lengths, **kwargs)
        assert torch.equal(seen[-1], captions[:, :-1])
    with pytest.raises(ValueError, match="word_dropout"):
        replace(plain.config, word_dropout=1.0).__post_init__()


def test_language_dropout_predicts_some_steps_from_the_context_alone() -> None:
    """A dropped step's logits are L_o tanh(L_z z_t) (no E y_{t-1}, no L_h h_t); the other steps,
    eval and ``regularise=False`` use the whole deep output."""
    from dataclasses import replace

    plain = _tiny_decoder()
    dec = AttentionDecoder(replace(plain.config, language_dropout=0.5), plain.vocab_size, plain.encoder_dim)
    dec.load_state_dict(plain.state_dict())
    context = []
    dec.out_z.register_forward_hook(lambda m, args, out: context.append(out))
    feats = torch.randn(3, 9, plain.encoder_dim)
    captions, lengths = _captions(3, 6, plain.vocab_size)
    dec.train()
    torch.manual_seed(1)
    a = dec(feats, captions, lengths).logits
    alone = dec.out(torch.tanh(context[-1]))  # (B, T, V)
    torch.manual_seed(1)
    b = dec(feats, captions, lengths, regularise=False).logits
    dropped = (a - b).abs().amax(-1) > 1e-6  # (B, T)
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(a[dropped], alone[dropped])
    dec.eval()
    torch.testing.assert_close(dec(feats, captions, lengths).logits, plain.eval()(feats, captions, lengths).logits)
    with pytest.raises(ValueError, match="deep_output"):
        replace(plain.config, language_dropout=0.2, deep_output=False).__post_init__()


def _grounded_decoder(attention: str = "soft") -> tuple[AttentionDecoder, list[list[int]]]:
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "blue", "green", "circle", "square", "left", "of"]
    groups = [["red", "blue", "green"], ["circle", "square"]]
    cfg = DecoderConfig(attention=attention, **SMALL_DEC, grounded_words=groups)
    return AttentionDecoder(cfg, len(words), 10, words), [[5, 6, 7], [8, 9]]


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_grounded_words_are_chosen_from_the_context_alone(attention: str) -> None:
    """Within a group the choice depends on the attended context only: the same context after other
    words and another state gives the same odds; the group's total and the other words follow the
    language model; the scores are normalised log-probabilities; the head gets gradients."""
    torch.manual_seed(0)
    dec, ids = _grounded_decoder(attention)
    dec.eval()
    feats = torch.randn(2, 9, 10)
    state, cache = dec.init_state(feats), dec.precompute(feats)
    context = torch.randn(2, 10)
    emb = dec.embedding(torch.tensor([4, 5]))
    a = dec._logits(emb, state[0], dec.gated(context, state[0]), context)  # (2, V)
    b = dec._logits(dec.embedding(torch.tensor([9, 10])), torch.randn_like(state[0]), torch.randn(2, 10), context)
    torch.testing.assert_close(a.exp().sum(-1), torch.ones(2))
    for g in ids:
        torch.testing.assert_close(a[:, g] - a[:, g].logsumexp(-1, keepdim=True),
                                   b[:, g] - b[:, g].logsumexp(-1, keepdim=True))
        assert not torch.allclose(a[:, g].logsumexp(-1), b[:, g].logsumexp(-1))
    # the language model's share of a group is what the plain output layer gives the group
    plain = torch.log_softmax(dec.out(torch.tanh(emb + dec.out_h(state[0]) + dec.out_z(dec.gated(context, state[0])))), -1)
    torch.testing.assert_close(a[:, ids[0]].logsumexp(-1), plain[:, ids[0]].logsumexp(-1))
    torch.testing.assert_close(a[:, [0, 1, 2, 3, 4, 10, 11]], plain[:, [0, 1, 2, 3, 4, 10, 11]])
    # step() and teacher forcing agree, and the grounded head is trained
    captions, lengths = _captions(2, 6, dec.vocab_size)
    logp, _, _ = dec.step(captions[:, 0], dec.init_state(feats), cache)
    torch.testing.assert_close(logp, dec(feats, captions, lengths).logits[:, 0], atol=1e-5, rtol=1e-5)
    dec.train()
    out = dec(feats, captions, lengths)
    F.cross_entropy(out.logits[out.mask], captions[:, 1:][out.mask]).backward()
    assert dec.grounded.head.weight.grad.abs().sum() > 0


def test_grounded_words_config_errors_name_the_word(caplog) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="at least 2 words"):
        DecoderConfig(grounded_words=[["red"]])
    with pytest.raises(ValueError, match="'red' is in group 0 and in group 1"):
        DecoderConfig(grounded_words=[["red", "blue"], ["red", "circle"]])
    # a word the data never had is left out with a warning; a group left with one word is dropped
    cfg = DecoderConfig(**SMALL_DEC, grounded_words=[["red", "mauve", "blue"], ["teal", "circle"]])
    words = ["<pad>", "<start>", "<end>", "<unk>", "red", "blue", "circle"]
    with caplog.at_level("WARNING"):
        dec = AttentionDecoder(cfg, len(words), 10, words)
    assert "left out: 'mauve', 'teal'" in caplog.text
    assert dec.grounded.ids.tolist() == [4, 5] and dec.grounded.sizes == [2]
    assert AttentionDecoder(replace(cfg, grounded_words=[["mauve", "teal"]]), len(words), 10, words).grounded is None
    with pytest.raises(ValueError, match="needs the vocabulary"):
        AttentionDecoder(cfg, len(words), 10)


def test_split_stem_shape_features_ignore_colour_and_colour_features_ignore_shape() -> None:
    """``stem: split``: the spatial features are the same whichever colour channel an object is
    drawn in (channels permuted); the colour features only see which pixels a cell holds, not
    where (pixels shuffled within each cell); every parameter gets gradients."""
    torch.manual_seed(0)
    cfg = EncoderConfig(name="shapes_cnn", grid=4, channels=16, position="append", stem="split")
    enc = create_encoder(cfg).eval()
    c = cfg.channels
    assert enc.out_dim == c + 16 + 32
    images = torch.randn(2, 3, 32, 32)
    feats, grid = enc(images)
    assert grid == (4, 4) and feats.shape == (2, 16, enc.out_dim)
    permuted, _ = enc(images[:, [2, 0, 1]])
    torch.testing.assert_close(permuted[..., :c], feats[..., :c])
    assert not torch.allclose(permuted[..., c:c + 16], feats[..., c:c + 16])
    cells = images.unfold(2, 8, 8).unfold(3, 8, 8).reshape(2, 3, 4, 4, 64)  # (B, 3, gh, gw, 64 pixels)
    shuffled = cells[..., torch.randperm(64)].reshape(2, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 32, 32)
    torch.testing.assert_close(enc(shuffled)[0][..., c:c + 16], feats[..., c:c + 16])
    enc.train()(images)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with pytest.raises(ValueError, match="model.encoder.stem must be one of 'rgb', 'split', got 'gray'"):
        create_encoder(EncoderConfig(name="shapes_cnn", grid=4, channels=16, stem="gray"))


def assert_split_stem_splits(name: str, size: int, grid: int) -> None:
    """``stem: split`` on an encoder that does not build it itself: its first convolution, summed
    over the colour inputs, runs on each channel alone (a grey image gives what the ``rgb``
    encoder with the same weights gives), the features before the colour path stay the same when
    the channels are permuted, 16 colour channels follow, and trainability is kept."""
    cfg = EncoderConfig(name=name, grid=grid, image_size=size)
    torch.manual_seed(0)
    rgb = create_encoder(cfg).eval()
    torch.manual_seed(0)
    split = create_encoder(replace(cfg, stem="split")).eval()
    d = rgb.out_dim
    assert split.out_dim == d + 16 and split.preprocessing == rgb.preprocessing
    with torch.no_grad():
        grey = torch.randn(2, 1, size, size).expand(-1, 3, -1, -1)
        expected = rgb(grey)[0]
        # a deep random network: float error grows with the features' scale
        close = {"atol": 1e-4 * expected.abs().max().item(), "rtol": 1e-4}
        torch.testing.assert_close(split(grey)[0][..., :d], expected, **close)
        images = torch.randn(2, 3, size, size)
        feats, hw = split(images)
        assert hw == (grid, grid) and feats.shape == (2, grid * grid, d + 16)
        permuted = split(images[:, [2, 0, 1]])[0]
    torch.testing.assert_close(permuted[..., :d], feats[..., :d], **close)
    assert not torch.allclose(permuted[..., d:], feats[..., d:])
    (conv,) = [m[0] for m in split.modules() if isinstance(m, ChannelSplit)]
    assert conv.in_channels == 1 and conv.weight.shape[1] == 1 and not conv.weight.requires_grad  # frozen as before
    assert all(p.requires_grad for p in split.colour.parameters())


def test_split_stem_on_a_torchvision_encoder() -> None:
    assert_split_stem_splits("resnet50", 64, 2)


def test_split_stem_needs_a_convolution_over_the_colour_image() -> None:
    class Linear(nn.Module):  # e.g. a patch embedding made as a Linear layer
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.out_dim, self.preprocessing = nn.Linear(48, 8), 8, None

    with pytest.raises(ValueError, match="stem split: mlp/x has no convolution over the colour image to split"):
        SplitStem(Linear(), "mlp/x")


@pytest.mark.parametrize("stem", ["rgb", "split"])
def test_channels_last_encoder_stores_nhwc_and_gives_the_same_features(stem: str) -> None:
    config = EncoderConfig(name="shapes_cnn", grid=4, channels=16, image_size=32, stem=stem, position="append")
    torch.manual_seed(0)
    plain = create_encoder(config)
    fast = create_encoder(replace(config, channels_last=True))
    fast.load_state_dict(plain.state_dict())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    seen = []
    fast.register_forward_hook(lambda m, args, out: seen.append(args[0]))  # the input forward sees
    images = torch.randn(2, 3, 32, 32)
    (a, grid_a), (b, grid_b) = plain(images), fast(images)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert grid_a == grid_b and a.shape == b.shape  # (B, N, D)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
