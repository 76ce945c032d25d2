"""captioner.training: the objectives chosen by the settings, the optimiser builder on its own, the
validation captions, and the aliases the moved names keep for one release."""

from __future__ import annotations

import copy
import math
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from captioner.data.vocab import PAD_ID, Vocabulary
from captioner.models import Captioner, DecoderConfig, EncoderConfig
from captioner.training.objectives import (
    OBJECTIVES,
    CrossEntropy,
    ExpectationReinforce,
    LossConfig,
    MovingAverageReinforce,
    ScstConfig,
    SelfCritical,
    objective_for,
)
from captioner.training.optim import (
    MuonAdam,
    OptimConfig,
    build_optimizer,
    hidden_matrices,
    set_budget_used,
)
from captioner.training.validation import EpochCaptions, score_epoch
from tests.test_system import VOCAB, _batch, _system

ENCODER = EncoderConfig(name="shapes_cnn", grid=4, channels=16, image_size=32)


def _model(frozen_encoder: bool = False) -> Captioner:
    torch.manual_seed(0)
    model = Captioner(ENCODER, DecoderConfig(embed_dim=16, attention_dim=16, decoder_dim=16), len(VOCAB), VOCAB)
    if frozen_encoder:
        model.encoder.requires_grad_(False)
    return model


def _never() -> float:
    raise AssertionError("only the cosine schedule asks for the run's length")


# -- the optimiser builder -----------------------------------------------------------------------
def test_build_optimizer_gives_the_decoder_lr_and_the_encoder_its_own() -> None:
    model = _model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, encoder_lr=1e-4, optimizer="adamw", weight_decay=0.01), _never)
    assert isinstance(opt, torch.optim.AdamW)  # no schedule, no warm-up: the optimiser alone
    dec, enc = opt.param_groups
    assert (dec["lr"], enc["lr"], dec["weight_decay"]) == (1e-3, 1e-4, 0.01)
    assert {id(p) for p in dec["params"]} == {id(p) for p in model.decoder.parameters()}
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.encoder.parameters()}
    # a frozen encoder has no group; encoder_lr unset is lr
    frozen = build_optimizer(_model(frozen_encoder=True), OptimConfig(optimizer="rmsprop"), _never)
    assert isinstance(frozen, torch.optim.RMSprop) and len(frozen.param_groups) == 1
    assert build_optimizer(model, OptimConfig(lr=2e-3), _never).param_groups[1]["lr"] == 2e-3


def test_build_optimizer_schedules() -> None:
    model = _model()
    plateau = build_optimizer(model, OptimConfig(scheduler="plateau", gamma=0.5), _never)
    assert isinstance(plateau["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau["lr_scheduler"]["monitor"] == "val/CIDEr"
    step = build_optimizer(model, OptimConfig(scheduler="step", step_size=3), _never)
    assert step["lr_scheduler"]["interval"] == "epoch" and step["lr_scheduler"]["scheduler"].step_size == 3
    # warm-up alone: linear to lr, then constant; the run's length is not asked for
    warm = build_optimizer(model, OptimConfig(lr=1.0, warmup_steps=4), _never)
    assert warm["lr_scheduler"]["interval"] == "step"
    assert _lrs(warm, 7) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    # cosine: warm-up, then down to min_lr_ratio at the run's last step (12 here)
    cosine = build_optimizer(model, OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=2, min_lr_ratio=0.1),
                             lambda: 12.0)
    lrs = _lrs(cosine, 14)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lrs[12:] == pytest.approx([0.1, 0.1])
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_cosine_by_time_decays_with_the_budget_spent() -> None:
    """schedule_by time: the decay's progress is the larger of the steps' share and the time
    budget's; a run stopped by max_time at a third of its steps ends at the floor."""
    built = build_optimizer(_model(), OptimConfig(lr=1.0, scheduler="cosine", min_lr_ratio=0.1), lambda: 30.0)
    sched = built["lr_scheduler"]["scheduler"]

    def next_lr(share: float) -> float:
        set_budget_used(sched, share)
        sched.optimizer.step()  # (no gradients: nothing moves) the order PyTorch expects
        sched.step()
        return sched.get_last_lr()[0]

    assert next_lr(0.5) == pytest.approx(0.55)  # step 1 of 30, half the time spent: half-way down
    assert next_lr(1.0) == pytest.approx(0.1)
    # the steps lead again when they are further (step 3 of 30)
    assert next_lr(0.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 30)))


def test_wsd_holds_the_rate_then_falls_linearly_over_its_last_share() -> None:
    """scheduler wsd: warm-up, lr held, then a straight line down to the floor over the last
    decay_fraction of the steps after warm-up (here 2 + 10 steps, the last 4 decaying)."""
    built = build_optimizer(_model(), OptimConfig(lr=1.0, scheduler="wsd", warmup_steps=2, decay_fraction=0.4,
                                                  min_lr_ratio=0.2), lambda: 12.0)
    lrs = _lrs(built, 14)
    assert lrs[:9] == pytest.approx([0.5] + [1.0] * 8)  # held up to step 8, 60 % of the way
    assert lrs[9:] == pytest.approx([0.2 + 0.8 * f for f in (0.75, 0.5, 0.25, 0.0, 0.0)])
    # by time: a run stopped at a third of its steps by max_time has decayed by then
    sched = build_optimizer(_model(), OptimConfig(lr=1.0, scheduler="wsd", decay_fraction=0.5, min_lr_ratio=0.0),
                            lambda: 30.0)["lr_scheduler"]["scheduler"]
    lrs = []
    for share in (0.25, 0.75, 1.0):
        set_budget_used(sched, share)
        sched.optimizer.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([1.0, 0.5, 0.0])
    # its state is numbers and a name (a checkpoint loads it with weights_only)
    state = sched.state_dict()["lr_lambdas"][0]
    assert state["decay"] == "wsd" and all(isinstance(v, (int, float, str)) for v in state.values())


def test_betas_reach_adam_and_adamw() -> None:
    for name in ("adam", "adamw"):
        opt = build_optimizer(_model(), OptimConfig(optimizer=name, betas=(0.8, 0.95)), _never)
        assert all(g["betas"] == (0.8, 0.95) for g in opt.param_groups)
    with pytest.raises(ValueError, match="model.optim.betas"):
        OptimConfig(betas=(0.9, 1.5))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in hidden_matrices(model)}
    assert {"decoder.lstm.weight_ih", "decoder.lstm.weight_hh", "decoder.init_h.weight"} <= muon
    # inputs and outputs (embedding, vocabulary scores), biases, vectors and convolutions stay on AdamW
    assert not any(n.startswith(("decoder.embedding", "decoder.out.")) or n.endswith("bias") for n in muon)
    assert "decoder.gate.weight" not in muon  # (1, H): a vector
    assert not any(p.dim() != 2 for p in hidden_matrices(model))
    opt = build_optimizer(model, OptimConfig(optimizer="muon", lr=2e-3, encoder_lr=1e-3, betas=(0.9, 0.95)), _never)
    assert isinstance(opt, MuonAdam) and isinstance(opt.muon, torch.optim.Muon)
    # every parameter in exactly one group, each group with its settings' lr, Adam's with the betas
    listed = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    for g in opt.param_groups:
        lr = 1e-3 if all(names[id(p)].startswith("encoder.") for p in g["params"]) else 2e-3
        assert g["lr"] == lr
    assert all(g["betas"] == (0.9, 0.95) for g in opt.adam.param_groups)
    # the groups a schedule sets are the inner optimisers' own
    assert opt.param_groups[0] is opt.muon.param_groups[0]


def test_muon_resumes_from_its_state_dict_as_if_never_stopped() -> None:
    """Three steps, saved, two more: a fresh optimiser loaded from the save and given the same two
    steps ends with the same weights (what a resumed run's last.ckpt gives the optimiser)."""

    def grads(model, k):
        g = torch.Generator().manual_seed(k)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)

    model = _model()
    opt = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-2), _never)
    for k in range(3):
        grads(model, k)
        opt.step()
    # (a state_dict holds the live tensors, as PyTorch's do; a checkpoint is a copy)
    saved, weights = copy.deepcopy(opt.state_dict()), {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in (3, 4):
        grads(model, k)
        opt.step()
    again = _model()
    with torch.no_grad():
        for n, p in again.named_parameters():
            p.copy_(weights[n])
    opt2 = build_optimizer(again, OptimConfig(optimizer="muon", lr=1e-2), _never)
    opt2.load_state_dict(saved)
    for k in (3, 4):
        grads(again, k)
        opt2.step()
    for (n, a), b in zip(model.named_parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(b, a, msg=n)
    with pytest.raises(ValueError, match="muon cannot resume"):
        opt2.load_state_dict(torch.optim.Adam(again.parameters()).state_dict())


def _timed_system(schedule_by: str, elapsed: float, duration: float | None):
    """A system whose trainer holds Lightning's Timer at ``elapsed`` s of ``duration`` (None: no
    max_time) and the cosine schedule of 100 steps; returns the system and the schedule."""
    from lightning.pytorch.callbacks import Timer

    system = _system()
    system.optim = OptimConfig(lr=1.0, scheduler="cosine", min_lr_ratio=0.0, schedule_by=schedule_by)
    built = build_optimizer(system.model, system.optim, lambda: 100.0)
    timer = Timer(duration=None if duration is None else timedelta(seconds=duration))
    timer.time_elapsed = lambda stage="train": elapsed  # the injected clock
    system._trainer = SimpleNamespace(callbacks=[timer], lr_scheduler_configs=[
        SimpleNamespace(scheduler=built["lr_scheduler"]["scheduler"])])
    return system, built["lr_scheduler"]["scheduler"]


def test_system_tells_the_schedule_the_time_spent() -> None:
    system, sched = _timed_system("time", elapsed=30.0, duration=120.0)
    system.on_train_batch_start({}, 0)
    assert sched.lr_lambdas[0].budget_used == pytest.approx(0.25)
    sched.optimizer.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    # by steps (the default), or without max_time, the clock is not read
    for schedule_by, duration in (("steps", 120.0), ("time", None)):
        system, sched = _timed_system(schedule_by, elapsed=30.0, duration=duration)
        system.on_train_batch_start({}, 0)
        assert sched.lr_lambdas[0].budget_used == 0.0


def _lrs(built: dict, steps: int) -> list[float]:
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# -- the objectives ------------------------------------------------------------------------------
def test_the_settings_choose_the_objective() -> None:
    assert set(OBJECTIVES.names()) == {"cross_entropy", "reinforce_moving_average", "reinforce_expectation", "scst"}
    expect = LossConfig(baseline="expectation")
    assert type(objective_for(LossConfig(), ScstConfig(), False)) is CrossEntropy
    assert type(objective_for(expect, ScstConfig(), False)) is CrossEntropy  # no samples, no REINFORCE
    assert type(objective_for(LossConfig(), ScstConfig(), True)) is MovingAverageReinforce
    assert type(objective_for(expect, ScstConfig(), True)) is ExpectationReinforce
    assert type(objective_for(expect, ScstConfig(enabled=True), True)) is SelfCritical
    # the system asks the attention whether it samples, not its name
    assert type(_system("soft").objective) is CrossEntropy
    assert type(_system("multihead").objective) is CrossEntropy
    assert type(_system("hard").objective) is MovingAverageReinforce
    assert type(_system("hard", baseline="expectation").objective) is ExpectationReinforce


def test_compute_loss_is_teacher_forced_whatever_scst_says() -> None:
    """An SCST system's training step minimises the self-critical loss; compute_loss stays the
    cross-entropy it replaces (what the SCST benchmark compares against)."""
    from captioner.system import CaptioningSystem

    plain = _system("soft")
    system = CaptioningSystem(encoder=plain.encoder_config, decoder=plain.decoder_config, vocab=VOCAB,
                              scst=ScstConfig(enabled=True, n_samples=2))
    system.load_state_dict(plain.state_dict())
    assert type(system.objective) is SelfCritical
    batch = _batch()
    torch.testing.assert_close(system.compute_loss(batch), plain.compute_loss(batch))


def test_the_moving_average_baseline_is_checkpoint_state_under_its_old_keys() -> None:
    """Old checkpoints resume: the moving average lives in the buffers ``reward_baseline`` and
    ``baseline_initialised`` of every system (soft ones too: the keys of every checkpoint)."""
    assert {"reward_baseline", "baseline_initialised"} <= set(_system("soft").state_dict())
    system = _system("hard").train()
    for _ in range(2):
        system.compute_loss(_batch())
    state = system.state_dict()
    assert bool(state["baseline_initialised"]) and state["reward_baseline"].item() != 0.0
    resumed = _system("hard").train()
    resumed.load_state_dict(state)  # strict: the same keys
    torch.manual_seed(3)
    expected = system.compute_loss(_batch())["baseline"]
    torch.manual_seed(3)
    # the resumed run continues the average (a fresh one would restart it at the batch's reward)
    torch.testing.assert_close(resumed.compute_loss(_batch())["baseline"], expected)


def test_scst_start_builds_the_reward_once_from_the_data_or_the_checkpoint() -> None:
    refs = {0: ["w1 w2 w3"], 1: ["w4 w5"], 2: ["w1 w5"]}
    data = SimpleNamespace(references=lambda split: refs if split == "train" else {}, tokenizer_name="simple")
    scst = SelfCritical(LossConfig(), ScstConfig(enabled=True))
    scst.start(data, None)
    assert scst.cider.documents == 3 and scst.max_length == 20  # the tokenizer's limit, max_length unset
    saved = scst.cider.state_dict()
    first = scst.cider
    scst.start(data, None)
    assert scst.cider is first  # made once per run
    resumed = SelfCritical(LossConfig(), ScstConfig(enabled=True))
    resumed.start(SimpleNamespace(references=lambda split: {0: ["w1"]}), saved)
    assert resumed.cider.documents == 3  # the checkpoint's document frequencies, not the data's
    tokens = torch.tensor([[VOCAB.index("w1"), 2, PAD_ID], [VOCAB.index("w7"), VOCAB.index("w8"), 2]])
    reward = resumed.rewards(Vocabulary(VOCAB), tokens, [0, 0])  # (B,): CIDEr-D against image 0's "w1"
    assert reward.shape == (2,) and reward[0] > 0 and reward[1] == 0
    with pytest.raises(ValueError, match="model.scst needs the training split's reference captions"):
        SelfCritical(LossConfig(), ScstConfig(enabled=True)).start(SimpleNamespace(), None)


def test_the_moved_names_keep_deprecated_aliases() -> None:
    import captioner.system as system_module
    from captioner.training import objectives, optim

    for name, module in [("caption_loss", objectives), ("scst_policy_loss", objectives), ("OPTIMIZERS", optim)]:
        with pytest.warns(DeprecationWarning, match=f"use {module.__name__}.{name}"):
            assert getattr(system_module, name) is getattr(module, name)
    with pytest.raises(AttributeError):
        system_module.no_such_name  # noqa: B018
    system = _system("soft")
    batch = _batch()
    with pytest.warns(DeprecationWarning, match="batch_features"):
        torch.testing.assert_close(system.features(batch), system.model.encode(batch["images"])[0])


# -- validation ----------------------------------------------------------------------------------
def test_epoch_captions_pad_gather_each_image_once_and_start_afresh() -> None:
    vocab = Vocabulary(VOCAB)
    w = [VOCAB.index(f"w{i}") for i in range(4)]
    captions = EpochCaptions()
    captions.add(torch.tensor([7, 8]), torch.tensor([[w[0], w[1], 2], [w[2], 2, PAD_ID]]), max_length=5)
    captions.add(torch.tensor([7]), torch.tensor([[w[3], 2]]), max_length=5)  # a repeat (sampler padding)
    module = SimpleNamespace(device=torch.device("cpu"), trainer=SimpleNamespace(world_size=1))
    assert captions.gather(module, vocab, 5) == {7: "w0 w1", 8: "w2"}
    assert captions.gather(module, vocab, 5) == {}
    # no references for the split: nothing to score
    assert score_epoch({7: "w0 w1"}, SimpleNamespace(references=lambda split: {}), "val", "validation") == {}
    assert score_epoch({7: "w0 w1"}, None, "val", "validation") == {}
    scores = score_epoch({7: "w0 w1", 9: "w3"}, SimpleNamespace(references=lambda split: {7: ["w0 w1"]}), "val", "val")
    assert set(scores) == {"CIDEr", "Bleu_4", "exact_match"} and scores["exact_match"] == 1.0


def test_a_fit_capped_by_time_records_the_budget_spent_in_its_schedule(shapes_dir, tmp_path) -> None:
    """Through Lightning: the schedule's state in the checkpoint holds the share of max_time spent."""
    from captioner.cli import main
    from tests.conftest import fit_args

    args = fit_args(shapes_dir, tmp_path, "--trainer.max_time", "00:01:00:00", "--trainer.max_steps", "3",
                    "--model.optim.schedule_by", "time", "--model.optim.scheduler", "cosine")
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = ckpt["lr_schedulers"]
    share = state["lr_lambdas"][0]["budget_used"]
    assert 0 < share < 0.01  # seconds of an hour
