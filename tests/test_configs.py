"""Every shipped config parses and resolves (tests/test_config_runs.py trains each for a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from captioner.commands.config import check_settings
from captioner.models import ATTENTIONS

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"shapes.yaml", "shapes-hard.yaml", "shapes-multihead.yaml", "flickr8k.yaml", "coco.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_resolves(config: Path, tmp_path, monkeypatch, capsys) -> None:
    from captioner.cli import main

    monkeypatch.chdir(tmp_path)  # in-process: one import of captioner for all configs
    code = main(["fit", "--config", str(config), "--print_config"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    resolved = yaml.safe_load(out.out)
    assert resolved["model"]["decoder"]["attention"] in ATTENTIONS
    assert resolved["best_checkpoint"]["monitor"] == "val/CIDEr"
    check_settings(resolved)  # what fit checks after parsing (--print_config stops before it)


def test_every_shipped_config_trains_on_one_device() -> None:
    """Lightning's `devices: auto` would start one process per GPU and multiply the global batch
    silently (docs/training.md, "Scaling to many devices"): more devices are asked for by flag."""
    for config in CONFIGS:
        trainer = yaml.safe_load(config.read_text())["trainer"]
        assert trainer.get("devices") == 1, (config.name, trainer.get("devices"))
        assert trainer.get("num_nodes", 1) == 1 and trainer.get("strategy", "auto") == "auto", config.name
