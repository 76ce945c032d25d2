"""Every shipped config parses and resolves (tests/test_config_runs.py trains each for a few steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captioner.models import ATTENTIONS

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
    assert resolved["model"]["decoder"]["attention"] in ATTENTIONS
    assert resolved["best_checkpoint"]["monitor"] == "val/CIDEr"

