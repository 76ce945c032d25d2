"""Every shipped config parses; the shapes variants train through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import fit_args
from tests.helpers import record_fits

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"shapes.yaml", "shapes-hard.yaml", "shapes-multihead.yaml", "flickr8k.yaml", "coco.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_resolves(config: Path, tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "fit", "--config", str(config), "--print_config"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = yaml.safe_load(out.stdout)
    assert resolved["model"]["decoder"]["attention"] in ("soft", "hard", "multihead")
    assert resolved["checkpoint"]["monitor"] == "val/CIDEr"


@pytest.mark.parametrize(("variant", "attention"), [("shapes-hard.yaml", "hard"),
                                                  ("shapes-multihead.yaml", "multihead")])
def test_attention_variants_fit(variant: str, attention: str, shapes_dir, tmp_path, monkeypatch) -> None:
    from captioner.cli import main

    args = fit_args(shapes_dir, tmp_path, "--trainer.fast_dev_run", "2", "--model.decoder.num_heads", "4")
    args[2] = str(Path(args[2]).parent / variant)
    fits = record_fits(monkeypatch)
    assert main(args) == 0
    (trainer,) = fits
    assert trainer.state.status == "finished" and trainer.global_step == 2
    assert trainer.lightning_module.model.decoder.config.attention == attention
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
