"""The LightningModule: losses, REINFORCE, overfitting, training through the CLI, checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from captioner.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from captioner.data.vocab import SPECIALS
from captioner.inference import CaptionPipeline
from captioner.models import ATTENTIONS, DecoderConfig, EncoderConfig
from captioner.models.attention import HardAttention
from captioner.models.decoder import DecoderOutput
from captioner.system import CaptioningSystem
from captioner.training.objectives import LossConfig, caption_loss, reinforce_loss, returns
from tests.conftest import fit_args
from tests.helpers import record_fits

VOCAB = [*SPECIALS, *(f"w{i}" for i in range(12))]


def _system(attention: str = "soft", **settings) -> CaptioningSystem:
    """A tiny system; ``settings`` go to DecoderConfig or LossConfig by name."""
    dec = {k: v for k, v in settings.items() if k in DecoderConfig.__dataclass_fields__}
    loss = {k: v for k, v in settings.items() if k not in dec}
    torch.manual_seed(0)
    return CaptioningSystem(
        encoder=EncoderConfig(name="shapes_cnn", grid=4, channels=16, image_size=32),
        decoder=DecoderConfig(attention=attention, embed_dim=32, attention_dim=32, decoder_dim=48, num_heads=4,
                              dropout=0.0, **dec),
        loss=LossConfig(**loss),
        vocab=VOCAB,
    )


def _batch(b: int = 6, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([length - i % 3 for i in range(b)])
    caps = torch.randint(4, len(VOCAB), (b, length), generator=g)
    caps[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        caps[i, n - 1] = 2
        caps[i, n:] = 0
    return {"images": torch.randn(b, 3, 32, 32, generator=g), "captions": caps, "lengths": lengths}


def test_regulariser_and_loss_ignore_padding() -> None:
    system = _system(doubly_stochastic=1.0).eval()
    batch = _batch()
    padded = dict(batch, captions=torch.cat([batch["captions"], torch.zeros(6, 5, dtype=torch.long)], 1))
    a, b = system.compute_loss(batch), system.compute_loss(padded)
    torch.testing.assert_close(a["dsr"], b["dsr"])
    torch.testing.assert_close(a["loss"], b["loss"])


def test_reinforce_moves_the_attention_parameters() -> None:
    system = _system("hard", doubly_stochastic=0.0, entropy=0.0).train()
    out = system.model(_batch()["images"], _batch()["captions"], _batch()["lengths"])
    mask = out.mask.float()
    ce = torch.rand(mask.shape) * mask  # any learning signal, (B, T) per step
    nll = ce.sum(1)
    system.reward_baseline.fill_(5.0)
    system.baseline_initialised.fill_(True)
    loss, logs = system.objective.reinforce(system, out, ce, mask)
    loss.backward()
    att = system.model.decoder.attention
    for p in (att.encoder_proj.weight, att.hidden_proj.weight, att.score.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the moving-average baseline moved towards the mean reward
    assert logs["baseline"].item() == pytest.approx(0.9 * 5.0 + 0.1 * (-nll).mean().item(), rel=1e-5)


def test_loss_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="loss.reduction"):
        LossConfig(reduction="sentence")


def test_attention_supervision_needs_grounded_batches() -> None:
    """docs/training.md: model.loss.attention_supervision "needs data.shapes.grounding"."""
    system = _system(attention_supervision=1.0)
    with pytest.raises(ValueError, match=r"attention_supervision needs .*set data.shapes.grounding: true"):
        system.compute_loss(_batch())  # a batch without token_objects, as ungrounded data gives

@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_tiny_model_overfits_one_batch(attention: str) -> None:
    system = _system(attention, doubly_stochastic=0.01).train()
    batch = _batch()
    opt = torch.optim.Adam(system.parameters(), lr=6e-3)
    first = None
    for _ in range(80):
        losses = system.compute_loss(batch)
        first = first if first is not None else losses["ce"].item()
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    last = system.compute_loss(batch)["ce"].item()
    assert last < first / 8, (first, last)


def test_fit_fast_dev_run_through_the_cli(shapes_dir, tmp_path, monkeypatch) -> None:
    from captioner.cli import main

    fits = record_fits(monkeypatch)
    assert main(fit_args(shapes_dir, tmp_path, "--trainer.fast_dev_run", "2")) == 0
    (trainer,) = fits
    assert trainer.state.status == "finished"  # not interrupted
    assert trainer.global_step == 2  # two optimiser steps, one per training batch
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/CIDEr" in trainer.callback_metrics  # the validation batches were captioned and scored


def test_checkpoint_round_trip_gives_identical_captions(tiny_checkpoint, shapes_dir) -> None:
    from captioner.data.images import load_image

    ckpt = read_checkpoint(tiny_checkpoint)
    assert set(ckpt["hyper_parameters"]) >= {"encoder", "decoder", "optim", "loss", "decoding"}
    assert ckpt["captioner"]["vocab"][:4] == list(SPECIALS)
    assert ckpt["captioner"]["preprocessing"]["image_size"] == 32
    loaded = load_checkpoint(tiny_checkpoint)
    system = CaptioningSystem(
        encoder=EncoderConfig(**ckpt["hyper_parameters"]["encoder"]),
        decoder=DecoderConfig(**ckpt["hyper_parameters"]["decoder"]),
        vocab=ckpt["captioner"]["vocab"],
    )
    system.load_state_dict(ckpt["state_dict"])
    system.eval()
    images = sorted((shapes_dir / "images").glob("*.png"))[:4]
    x = torch.stack([loaded.preprocessing(load_image(p)) for p in images])
    caps = CaptionPipeline(loaded, beam_size=3)(x)
    with torch.no_grad():
        gen = system.generate(system.model.encode(x)[0], beam_size=3)
    for i, c in enumerate(caps):
        assert c.words == system.vocab.decode(gen.tokens[i].tolist())
        torch.testing.assert_close(c.alphas.flatten(1), gen.alphas[i, : len(c.words)])


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        load_checkpoint(tmp_path / "garbage.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


# -- hard attention's training recipe ------------------------------------------------------------
def _hard_system(**settings) -> CaptioningSystem:
    return _system("hard", doubly_stochastic=0.0, **settings).train()


@pytest.mark.parametrize("unit", ["step", "caption", "batch"])
def test_semi_sampling_unit_sets_what_one_draw_covers(unit: str) -> None:
    system = _hard_system(semi_sampling_unit=unit)
    batch = _batch(b=32, length=9)
    torch.manual_seed(1)
    out = system.model(batch["images"], batch["captions"], batch["lengths"])
    real = out.mask
    per_caption = [set(out.sampled[i][real[i]].tolist()) for i in range(32)]
    if unit == "step":  # some caption mixes samples and expectations
        assert any(len(s) == 2 for s in per_caption)
    else:  # every caption is all sampled or all expectation
        assert all(len(s) == 1 for s in per_caption)
        kinds = {next(iter(s)) for s in per_caption}
        assert len(kinds) == (1 if unit == "batch" else 2)


def test_expectation_baseline_with_semi_sampling_one_is_the_expectation_loss() -> None:
    """With p = 1 the sampled pass has weight 0: the loss is the expectation pass's alone."""
    system = _hard_system(semi_sampling=1.0, baseline="expectation")
    batch = _batch()
    logs = system.compute_loss(batch)
    system.model.decoder.eval()  # hard attention in eval mode uses the expectation
    features = system.model.encode(batch["images"])[0]
    expected = caption_loss(system.model.decoder(features, batch["captions"], batch["lengths"]),
                            batch["captions"], system.loss_config)
    torch.testing.assert_close(logs["loss"], expected.loss)
    torch.testing.assert_close(logs["ce_expectation"], expected.nll.sum() / expected.mask.sum())


def test_expectation_baseline_trains_every_parameter() -> None:
    system = _hard_system(baseline="expectation", reward_to_go=True)
    logs = system.compute_loss(_batch())
    logs["loss"].backward()
    missing = [n for n, p in system.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing
    assert "baseline" not in logs  # no moving average is kept in this mode


@pytest.mark.parametrize("to_go", [False, True])
def test_reward_to_go_credits_a_location_with_later_words_only(to_go: bool) -> None:
    system = _hard_system(reward_to_go=to_go, entropy=0.0)
    b, t = 2, 4
    log_p = torch.zeros(b, t, requires_grad=True)
    out = DecoderOutput(torch.zeros(b, t, len(VOCAB)), torch.full((b, t, 16), 1 / 16), torch.ones(b, t, dtype=torch.bool),
                        log_p, torch.ones(b, t, dtype=torch.bool), torch.zeros(b, t))
    ce = torch.zeros(b, t)
    ce[:, 1] = 3.0  # only the second word is badly predicted, under the sampled locations
    loss, _ = reinforce_loss(out, returns(ce, to_go), returns(torch.zeros(b, t), to_go), torch.ones(b, t),
                             system.loss_config)
    loss.backward()
    grad = log_p.grad[0]  # d loss / d log p(s_t): positive pushes s_t down
    assert (grad[:2] > 0).all()
    if to_go:  # steps after the bad word cannot have caused it
        assert (grad[2:] == 0).all()
    else:
        assert (grad[2:] > 0).all()


def test_semi_sampling_warmup_anneals_from_one(monkeypatch: pytest.MonkeyPatch) -> None:
    system = _hard_system(semi_sampling=0.5, semi_sampling_warmup_steps=100)
    seen = []
    for step in (0, 50, 100, 400):
        monkeypatch.setattr(CaptioningSystem, "global_step", property(lambda self, s=step: s))
        system._anneal_semi_sampling()
        seen.append(system.model.decoder.attention.semi_sampling)
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.5])


def test_the_system_follows_what_the_attention_declares_not_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard attention under another name still gets the expectation baseline and its warm-up."""
    monkeypatch.setitem(ATTENTIONS._items, "renamed_hard", HardAttention)
    system = _system("renamed_hard", doubly_stochastic=0.0, baseline="expectation",
                     semi_sampling_warmup_steps=10).train()
    assert system._anneal_semi_sampling()
    assert system.model.decoder.attention.semi_sampling == 1.0  # step 0 of the warm-up
    assert "ce_expectation" in system.compute_loss(_batch())
    assert not _system("soft", semi_sampling_warmup_steps=10)._anneal_semi_sampling()


def test_hard_training_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="semi_sampling_unit"):
        DecoderConfig(attention="hard", semi_sampling_unit="word")
    with pytest.raises(ValueError, match="loss.baseline"):
        LossConfig(baseline="learned")
