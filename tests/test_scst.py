"""Self-critical sequence training: its baselines, the policy gradient's sign, starting from a
checkpoint, the errors, and short fits through the CLI for soft and hard attention."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint, read_checkpoint
from captioner.cli import main
from captioner.data.vocab import END_ID, PAD_ID, START_ID
from captioner.decoding import greedy, sample
from captioner.models import DecoderConfig, EncoderConfig
from captioner.system import CaptioningSystem
from captioner.training.objectives import ScstConfig, scst_advantage, scst_policy_loss
from tests.conftest import fit_args


def test_mean_and_greedy_baselines_on_a_constructed_batch() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    base, adv = scst_advantage(rewards, "mean")
    # each sample's baseline: the mean of the image's other two samples
    torch.testing.assert_close(base, torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.5, 0.0, 1.5], [-3.0, -3.0, 6.0]]))
    base, adv = scst_advantage(rewards, "greedy", torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(base, torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 5.0]]))


def test_policy_loss_is_the_hand_computed_reinforce_and_pushes_good_samples_up() -> None:
    torch.manual_seed(0)
    v = 8
    logits = torch.randn(2, 3, v, requires_grad=True)
    tokens = torch.tensor([[4, 5, END_ID], [6, END_ID, PAD_ID]])
    mask = tokens != PAD_ID
    advantage = torch.tensor([1.5, -0.5])
    loss, caption_logp, _ = scst_policy_loss(logits, tokens, mask, advantage)
    # by hand: log-softmax without <pad>/<start> (and <end> as the first word), summed over real steps
    banned = torch.zeros(3, v, dtype=torch.bool)
    banned[:, [PAD_ID, START_ID]] = True
    banned[0, END_ID] = True
    logp = torch.log_softmax(logits.detach().masked_fill(banned, float("-inf")), -1)
    by_hand = torch.stack([logp[0, 0, 4] + logp[0, 1, 5] + logp[0, 2, END_ID], logp[1, 0, 6] + logp[1, 1, END_ID]])
    torch.testing.assert_close(caption_logp.detach(), by_hand)
    torch.testing.assert_close(loss.detach(), -(advantage * by_hand).mean())
    loss.backward()
    # gradient descent raises the logit of a word sampled with a positive advantage, lowers the other's
    assert logits.grad[0, 0, 4] < 0 and logits.grad[0, 1, 5] < 0
    assert logits.grad[1, 0, 6] > 0
    assert torch.all(logits.grad[1, 2] == 0)  # padding has no gradient
    # and one step of it raises the good caption's log-probability, lowers the bad one's
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    _, after, _ = scst_policy_loss(stepped, tokens, mask, advantage)
    assert after[0] > caption_logp[0] and after[1] < caption_logp[1]


def _system(ckpt: Path, **kwargs) -> CaptioningSystem:
    hp = read_checkpoint(ckpt)["hyper_parameters"]
    vocab = kwargs.pop("vocab", read_checkpoint(ckpt)["captioner"]["vocab"])
    return CaptioningSystem(EncoderConfig(**hp["encoder"]), DecoderConfig(**hp["decoder"]), vocab=vocab, **kwargs)


def test_rescoring_reproduces_the_sampled_log_probabilities(tiny_checkpoint) -> None:
    """The teacher-forced pass gives each sampled word the log-probability the sampling pass
    computed for it; the policy's (renormalised without the banned tokens) is only larger."""
    system = _system(tiny_checkpoint, init_from=str(tiny_checkpoint)).eval()
    decoder = system.model.decoder
    features = system.model.encode(torch.rand(3, 3, 32, 32))[0]
    gen = sample(decoder, features, 12, generator=torch.Generator().manual_seed(0))
    n_tok = (gen.tokens != PAD_ID).sum(1)
    captions = torch.cat([torch.full((3, 1), START_ID), gen.tokens], 1)
    out = decoder(features, captions, n_tok + 1)
    raw = torch.log_softmax(out.logits.float(), -1).gather(2, gen.tokens.unsqueeze(2)).squeeze(2) * out.mask
    torch.testing.assert_close(raw, gen.token_logprobs, atol=1e-5, rtol=1e-5)
    _, caption_logp, _ = scst_policy_loss(out.logits, gen.tokens, out.mask, torch.zeros(3))
    assert torch.all(caption_logp >= gen.scores - 1e-5)


def test_init_from_loads_the_checkpoints_weights(tiny_checkpoint) -> None:
    system = _system(tiny_checkpoint, init_from=str(tiny_checkpoint)).eval()
    loaded = load_checkpoint(tiny_checkpoint)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ours = greedy(system.model.decoder, system.model.encode(images)[0], 20).tokens
        theirs = greedy(loaded.model.decoder, loaded.model.encode(images)[0], 20).tokens
    assert torch.equal(ours, theirs)
    fresh = _system(tiny_checkpoint)
    assert not torch.equal(fresh.model.decoder.fc.weight if hasattr(fresh.model.decoder, "fc") else
                           next(fresh.model.decoder.parameters()), next(system.model.decoder.parameters()))


def test_init_from_refuses_a_vocabulary_mismatch_a_missing_and_an_unsafe_file(tiny_checkpoint, tmp_path) -> None:
    vocab = list(read_checkpoint(tiny_checkpoint)["captioner"]["vocab"])
    other = [*vocab[:-2], "zebra", "giraffe", "okapi"]
    with pytest.raises(ValueError, match=r"differs from the data's .* in 3 word\(s\)"):
        _system(tiny_checkpoint, vocab=other, init_from=str(tiny_checkpoint))
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _system(tiny_checkpoint, init_from=str(missing))
    unsafe = tmp_path / "unsafe.ckpt"
    unsafe.write_bytes(pickle.dumps(Path("x")))  # an object a weights_only load refuses
    # docs/training.md: init_from is "a safe weights_only load"
    with pytest.raises(ValueError, match=f"model.init_from: {unsafe}: refused to load"):
        _system(tiny_checkpoint, init_from=str(unsafe))


def test_init_from_refuses_a_checkpoint_of_another_model(tiny_checkpoint) -> None:
    """docs/training.md: with model.init_from "the config must describe the same model"."""
    ckpt = read_checkpoint(tiny_checkpoint)
    hp, vocab = ckpt["hyper_parameters"], ckpt["captioner"]["vocab"]
    wider = DecoderConfig(**{**hp["decoder"], "decoder_dim": hp["decoder"]["decoder_dim"] + 8})
    with pytest.raises(ValueError, match=r"init_from: .*: its model differs from model.encoder/model.decoder"):
        CaptioningSystem(EncoderConfig(**hp["encoder"]), wider, vocab=vocab, init_from=str(tiny_checkpoint))

def test_mean_baseline_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="n_samples >= 2"):
        ScstConfig(baseline="mean", n_samples=1)
    ScstConfig(baseline="greedy", n_samples=1)
    with pytest.raises(ValueError, match="baseline"):
        ScstConfig(baseline="max")


def test_cli_errors_exit_2_with_the_path(shapes_dir, tiny_checkpoint, tmp_path, capsys) -> None:
    missing = tmp_path / "missing.ckpt"
    args = fit_args(shapes_dir, tmp_path / "run", "--model.scst.enabled", "true", "--trainer.max_steps", "1")
    assert main([*args, "--model.init_from", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    # at most 20 words instead of the checkpoint's 42: a smaller vocabulary
    assert main([*args, "--model.init_from", str(tiny_checkpoint), "--data.max_vocab", "20",
                 "--data.vocab_path", str(tmp_path / "vocab.json")]) == 2
    err = capsys.readouterr().err
    assert "word(s)" in err and str(tiny_checkpoint) in err
    assert main([*args, "--model.init_from", str(tiny_checkpoint), "--model.scst.n_samples", "1"]) == 2
    assert "n_samples >= 2" in capsys.readouterr().err


def _metrics(root: Path) -> list[dict]:
    (path,) = root.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("attention,baseline", [("soft", "mean"), ("hard", "greedy"), ("multihead", "mean")])
def test_scst_fit_through_the_cli_logs_its_reward(attention, baseline, shapes_dir, tiny_checkpoint, tmp_path) -> None:
    ckpt = tiny_checkpoint
    if attention != "soft":  # a cross-entropy checkpoint of that attention first (a few steps)
        assert main(fit_args(shapes_dir, tmp_path / "ce", "--model.decoder.attention", attention,
                             "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")) == 0
        ckpt = tmp_path / "ce" / "checkpoints" / "last.ckpt"
    root = tmp_path / "scst"
    assert main(fit_args(
        shapes_dir, root, "--model.init_from", str(ckpt), "--model.decoder.attention", attention,
        "--model.scst.enabled", "true", "--model.scst.baseline", baseline, "--model.scst.n_samples", "3",
        "--model.scst.max_length", "8", "--model.scst.ce_weight", "0.1", "--model.scst.entropy", "0.01",
        "--model.optim.lr", "5e-5", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
        "--trainer.logger", "true", "--trainer.log_every_n_steps", "1")) == 0
    rows = _metrics(root)
    train = [r for r in rows if r.get("train/reward")]
    assert len(train) == 4, rows
    for key in ("train/reward", "train/baseline", "train/advantage", "train/sample_length", "train/loss"):
        assert all(float(r[key]) == float(r[key]) for r in train), key  # logged and not NaN
    assert all(float(r["train/reward"]) >= 0 and 1 <= float(r["train/sample_length"]) <= 8 for r in train)
    assert any(r.get("val/CIDEr") for r in rows)
    last = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["scst"]["baseline"] == baseline
    assert last["scst"]["documents"] == 64  # the training images' references gave the document frequencies
    # the result is an ordinary checkpoint: `captioner caption` and `captioner evaluate` read it
    image = next((shapes_dir / "images").iterdir())
    assert main(["caption", "--checkpoint", str(root / "checkpoints" / "last.ckpt"), "--device", "cpu", str(image)]) == 0
    assert main(["evaluate", "--checkpoint", str(root / "checkpoints" / "best.ckpt"), "--split", "val",
                 "--device", "cpu", "--no-meteor", "--output", str(tmp_path / "metrics.json")]) == 0
    assert (tmp_path / "metrics.json").is_file()


def test_an_interrupted_scst_run_resumes_with_its_reward_corpus(shapes_dir, tiny_checkpoint, tmp_path,
                                                                  monkeypatch) -> None:
    """`--ckpt_path last.ckpt` continues an SCST run: its step count, its weights (not init_from's
    again) and the CIDEr-D document frequencies saved with it (not recomputed)."""
    from captioner.metrics import cider

    made: list[dict] = []
    original = cider.CiderD.__init__

    def spy(self, refs, **state):
        made.append(state)
        original(self, refs, **state)

    monkeypatch.setattr(cider.CiderD, "__init__", spy)
    root = tmp_path / "scst"
    args = fit_args(shapes_dir, root, "--model.init_from", str(tiny_checkpoint), "--model.scst.enabled", "true",
                    "--model.scst.n_samples", "2", "--model.scst.max_length", "8", "--model.optim.lr", "5e-5",
                    "--trainer.limit_train_batches", "2")
    assert main([*args, "--trainer.max_epochs", "1"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 2 and made == [{}]
    assert main([*args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)]) == 0
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["global_step"] == 4
    # the saved corpus statistics were handed back, not recomputed from the data
    assert made[1].keys() >= {"documents"} and made[1]["documents"] == first["scst"]["documents"]
    assert second["scst"]["documents"] == first["scst"]["documents"]
    # training went on from the resumed weights: they moved, and away from init_from's
    init = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    moved = [k for k, v in second["state_dict"].items() if v.is_floating_point() and not torch.equal(v, first["state_dict"][k])]
    assert moved and any(not torch.equal(second["state_dict"][k], init[k]) for k in moved)
