"""Distributed data parallel on CPU: 2 processes over gloo, through `captioner fit/validate`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.conftest import fit_args

ROOT = Path(__file__).resolve().parent.parent
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(29500 + os.getpid() % 1000))
    return subprocess.run([sys.executable, "-m", "captioner.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _metric(out: str, name: str) -> float:
    m = re.search(rf"{re.escape(name)}\s+│?\s*([0-9.e+-]+)", out)
    assert m, out[-2000:]
    return float(m.group(1))


@pytest.mark.slow
def test_two_process_ddp_fit_and_validation_equal_single_process(shapes_dir, tiny_checkpoint, tmp_path) -> None:
    fit = _run(fit_args(shapes_dir, tmp_path, "--trainer.max_steps", "4", "--last_checkpoint.every_n_steps", "2", *DDP),
               tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    # the scale is said once (rank 0), with the global batch of both ranks
    said = [x for x in fit.stderr.splitlines() if x.startswith("fit: ")]
    assert len(said) == 2 and said[0].startswith("fit: 2 processes (2 devices x 1 node), global batch 16 "), said
    assert "not scaled" in said[1], said
    # validation of the same (trained) weights: 2 ranks, gathered and de-duplicated, == 1 process
    val = fit_args(shapes_dir, tmp_path)[1:]  # drop "fit"
    single = _run(["validate", *val, "--ckpt_path", str(tiny_checkpoint)], tmp_path / "single")
    double = _run(["validate", *val, "--ckpt_path", str(tiny_checkpoint), *DDP], tmp_path / "double")
    assert single.returncode == 0, single.stderr[-3000:]
    assert double.returncode == 0, double.stderr[-3000:]
    assert _metric(single.stdout, "val/CIDEr") > 0  # a comparison of real captions, not of zeros
    for name in ("val/CIDEr", "val/Bleu_4", "val/exact_match"):
        assert _metric(double.stdout, name) == pytest.approx(_metric(single.stdout, name), abs=1e-6)
    assert "sync_dist" not in double.stderr  # no warning about our own logging


@pytest.mark.slow
def test_two_process_scst_fit_scores_each_ranks_own_images(shapes_dir, tiny_checkpoint, tmp_path) -> None:
    fit = _run(fit_args(shapes_dir, tmp_path, "--model.init_from", str(tiny_checkpoint), "--model.scst.enabled", "true",
                        "--model.scst.n_samples", "2", "--model.scst.max_length", "8", "--model.optim.lr", "5e-5",
                        "--trainer.max_steps", "2", "--trainer.logger", "true", "--trainer.log_every_n_steps", "1",
                        *DDP), tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert last["scst"]["documents"] == 64  # every rank built the reward from the whole training split
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    assert "train/reward" in metrics.read_text().splitlines()[0]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # best.ckpt read from another run
def test_a_command_destroys_its_process_group(shapes_dir, tiny_checkpoint, tmp_path) -> None:
    """Lightning destroys the process group at exit for NCCL only: a gloo group left to the
    interpreter's shutdown can abort a process whose run succeeded (SIGABRT, 'terminate called
    without an active exception'), which turns a finished multi-process run into exit status -6."""
    from captioner.cli import main

    # Lightning sets MASTER_*, LOCAL_RANK and NODE_RANK here: left behind, a later test's
    # 2-process run would take itself for a launched rank 1 and wait for a peer that never comes
    val = fit_args(shapes_dir, tmp_path)[1:]  # drop "fit"
    one = [*DDP[:-1], "1"]  # --trainer.devices 1
    with mock.patch.dict(os.environ, {"MASTER_PORT": str(29500 + (os.getpid() + 500) % 1000)}):
        assert main(["validate", *val, "--ckpt_path", str(tiny_checkpoint), *one]) == 0
        assert not torch.distributed.is_initialized()
