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
from captioner.data.atomic import atomic_write_json
from captioner.data.sampling import EpochSampler
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
