"""Fault tolerance: atomic checkpoints, sharding, and kill-and-resume equivalence."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.checkpointing import atomic_torch_save
from captioner.data import sampling
from captioner.data.sampling import EpochSampler
from captioner.files import atomic_write_json
from tests.conftest import fit_args

ROOT = Path(__file__).resolve().parent.parent


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def torn(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_atomic_json_is_strict_and_keeps_the_plain_format(tmp_path) -> None:
    data = {"words": ["<pad>", "a"], "n": (1, 2)}
    path = atomic_write_json(tmp_path / "new" / "vocab.json", data)  # creates the folder
    assert path == tmp_path / "new" / "vocab.json"
    assert path.read_bytes() == json.dumps(data).encode()  # vocab/feature-index bytes as before
    scores = {"CIDEr": math.nan, "per": [math.inf, 0.5, -math.inf]}
    text = atomic_write_json(path, scores, indent=2, newline=True).read_text()
    assert json.loads(text) == {"CIDEr": None, "per": [None, 0.5, None]}  # strict JSON: no NaN
    assert text.endswith("}\n") and "NaN" not in text and "Infinity" not in text
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temporary left behind


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_shards_cover_each_index_at_most_once(world, monkeypatch) -> None:
    seen = []
    for rank in range(world):
        monkeypatch.setattr(sampling, "_rank_world", lambda r=rank: (r, world))
        s = EpochSampler(10, shuffle=True, seed=3)
        s.set_epoch(2)
        keys = list(s)
        assert all(e == 2 for _, e in keys)
        seen += [i for i, _ in keys]
    assert len(seen) == len(set(seen)) == (10 // world) * world


def test_evaluation_shards_cover_every_index(monkeypatch) -> None:
    seen = []
    for rank in range(3):
        monkeypatch.setattr(sampling, "_rank_world", lambda r=rank: (r, 3))
        seen += [i for i, _ in EpochSampler(10, shuffle=False)]
    assert set(seen) == set(range(10)) and len(seen) == 12  # padded to equal length per rank


def test_epochs_reshuffle_and_skip_resumes_mid_epoch() -> None:
    s = EpochSampler(20, shuffle=True, seed=0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e0] != [i for i, _ in e1]
    s.skip = 8
    assert list(s) == e1[8:]
    assert list(s) == e1  # skipping happens once


def _fit(shapes_dir: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    args = fit_args(shapes_dir, root, "--trainer.max_steps", "10", "--trainer.max_epochs", "-1",
                    "--trainer.deterministic", "true", "--last_checkpoint.every_n_steps", "2",
                    "--model.decoder.dropout", "0.3", *extra)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "captioner.cli", *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["hard"])
def test_killed_and_resumed_run_ends_with_the_same_weights(shapes_dir, tmp_path, attention) -> None:
    """SIGKILL mid-epoch (step 7 of 10, epochs of 4 steps), resume from last.ckpt (step 6):
    model, optimiser, schedule, hard-attention baseline, RNG and data position all continue."""
    att = ["--model.decoder.attention", attention]
    ref = _fit(shapes_dir, tmp_path / "ref", *att)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killer = '{"class_path": "tests.helpers.KillAtStep", "init_args": {"step": 7}}'
    run = tmp_path / "run"
    killed = _fit(shapes_dir, run, *att, f"--trainer.callbacks+={killer}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    resumed = _fit(shapes_dir, run, *att, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 10
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, msg=f"{k} differs after resume")


# -- what a resumed run takes from its checkpoint ----------------------------------------------------
@pytest.fixture(scope="module")
def two_steps(shapes_dir, tmp_path_factory) -> Path:
    """last.ckpt of a 2-step run with one model setting given on the command line only."""
    from captioner.cli import main

    root = tmp_path_factory.mktemp("two_steps")
    assert main(fit_args(shapes_dir, root, "--trainer.max_steps", "2", "--model.loss.label_smoothing", "0.1")) == 0
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(("flag", "value", "theirs"), [
    ("--model.decoder.decoder_dim", "32", "16"),
    ("--model.optim.lr", "0.0001", "0.0035"),  # configs/shapes.yaml's
])
def test_resume_refuses_a_setting_it_cannot_honour(flag, value, theirs, two_steps, shapes_dir, tmp_path,
                                                   capsys) -> None:
    from captioner.cli import main

    run = tmp_path / "run"
    argv = fit_args(shapes_dir, run, "--trainer.max_steps", "4", "--model.loss.label_smoothing", "0.1",
                    "--ckpt_path", str(two_steps), flag, value)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("captioner: error:"), err
    key = flag[2:]
    assert f"{key} is {value} here but {theirs} in the checkpoint" in err, err
    assert f"--model.init_from {two_steps}" in err
    assert not run.exists()  # nothing trained, nothing written


# the checkpoint comes from another run folder on purpose: Lightning notes its dirpath changed
@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_resume_with_the_same_settings_honours_the_trainer_and_decoding(two_steps, shapes_dir, tmp_path,
                                                                         caplog) -> None:
    """The run's own command again, longer: no error, max_steps and the validation beam follow
    the command; a model setting the command leaves at its default comes from the checkpoint,
    and config.yaml records what the run used."""
    import logging

    import yaml

    from captioner.cli import main

    run = tmp_path / "run"
    same = fit_args(shapes_dir, run, "--trainer.max_steps", "3", "--model.loss.label_smoothing", "0.1",
                    "--ckpt_path", str(two_steps))
    assert main(same) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    caplog.set_level(logging.INFO)
    longer = fit_args(shapes_dir, run, "--trainer.max_steps", "4", "--model.decoding.beam_size", "2",
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))  # label_smoothing left out
    assert main(longer) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["decoding"]["beam_size"] == 2
    assert ckpt["hyper_parameters"]["loss"]["label_smoothing"] == 0.1
    assert "model.loss.label_smoothing 0.1 from the checkpoint" in caplog.text
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 4
    assert saved["model"]["decoding"]["beam_size"] == 2
    assert saved["model"]["loss"]["label_smoothing"] == 0.1


def test_resume_refuses_another_vocabulary(two_steps, shapes_dir, tmp_path, capsys) -> None:
    from captioner.cli import main

    argv = fit_args(shapes_dir, tmp_path / "run", "--trainer.max_steps", "4", "--model.loss.label_smoothing", "0.1",
                    "--data.max_vocab", "8", "--ckpt_path", str(two_steps))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ckpt_path: its vocabulary" in err and "differs from the data's (8 words)" in err, err


# the checkpoint comes from another run folder on purpose: Lightning notes its dirpath changed
@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_validate_scores_the_checkpoints_model_and_says_what_differs(two_steps, shapes_dir, tmp_path,
                                                                       caplog) -> None:
    import logging

    from captioner.cli import main

    caplog.set_level(logging.INFO)
    argv = fit_args(shapes_dir, tmp_path / "run", "--model.decoder.decoder_dim", "32", "--ckpt_path", str(two_steps))
    argv[0] = "validate"
    assert main(argv) == 0
    assert "validate: model.decoder.decoder_dim 16 from the checkpoint (not the 32)" in caplog.text


def test_a_muon_run_saves_and_resumes_both_optimisers_states(shapes_dir, tmp_path) -> None:
    """model.optim.optimizer muon: last.ckpt holds Muon's momentum and AdamW's moments, and a
    resumed run loads them (a torch.load with weights_only reads them: plain tensors and numbers)."""
    from captioner.cli import main

    run = tmp_path / "run"
    muon = ("--model.optim.optimizer", "muon", "--model.optim.scheduler", "wsd")
    assert main(fit_args(shapes_dir, run, "--trainer.max_steps", "2", *muon)) == 0
    last = run / "checkpoints" / "last.ckpt"
    (state,) = torch.load(last, weights_only=True)["optimizer_states"]
    assert set(state) == {"muon", "adam"}
    assert all("momentum_buffer" in s for s in state["muon"]["state"].values()) and state["muon"]["state"]
    assert all("exp_avg_sq" in s for s in state["adam"]["state"].values()) and state["adam"]["state"]
    assert main(fit_args(shapes_dir, run, "--trainer.max_steps", "4", *muon, "--ckpt_path", str(last))) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 4
    steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["adam"]["state"].values()}
    assert steps == {4.0}  # AdamW went on from its saved step 2, not from 0
