"""Fast start: captioning on one process (`caption`, `attend`, the Python API) never imports
Lightning, which takes longer to import than torch; only the Trainer's paths do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.cli import main

ROOT = Path(__file__).parent.parent
HEAVY = ("lightning", "pytorch_lightning", "torchmetrics")


def _modules_after(code: str) -> tuple[list[str], str]:
    """Runs ``code`` in a fresh interpreter -> (the modules of ``HEAVY`` it imported, its stdout)."""
    probe = f"{code}\nimport sys\nprint('MODULES', ' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return [m for m in line.split()[1:] if m.split(".")[0] in HEAVY], out.stdout


def _image(shapes_dir: Path) -> Path:
    return sorted((shapes_dir / "images").glob("*.png"))[0]


def test_caption_on_one_process_imports_no_lightning(tiny_checkpoint, shapes_dir, tmp_path):
    options = tmp_path / "options.yaml"  # a --config file without a trainer section
    options.write_text("format: jsonl\nbeam_size: 2\n")
    argv = ["caption", "--checkpoint", str(tiny_checkpoint), "--config", str(options), str(_image(shapes_dir))]
    heavy, stdout = _modules_after(f"from captioner.cli import main\nassert main({argv!r}) == 0")
    assert heavy == []
    row = json.loads(stdout.splitlines()[0])
    assert row["image"] == str(_image(shapes_dir)) and row["caption"]


def test_attend_imports_no_lightning(tiny_checkpoint, shapes_dir, tmp_path):
    argv = ["attend", "--checkpoint", str(tiny_checkpoint), str(_image(shapes_dir)), "-o", str(tmp_path / "a.png")]
    heavy, _ = _modules_after(f"from captioner.cli import main\nassert main({argv!r}) == 0")
    assert heavy == []
    assert (tmp_path / "a.png").is_file()


def test_python_api_imports_no_lightning(tiny_checkpoint, shapes_dir):
    code = ("from captioner import CaptionPipeline\n"
            f"print(CaptionPipeline.from_pretrained({str(tiny_checkpoint)!r})({str(_image(shapes_dir))!r}).text)")
    heavy, stdout = _modules_after(code)
    assert heavy == []
    assert stdout.splitlines()[0].strip()


@pytest.mark.parametrize("where", ["flag", "config"])
def test_caption_trainer_section_from_a_flag_or_a_config_file(where, tiny_checkpoint, shapes_dir, tmp_path, capsys):
    """The trainer section is still parsed where it is given: two processes without --output are refused."""
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  accelerator: cpu\n  devices: 2\n")
    given = ["--trainer.accelerator", "cpu", "--trainer.devices", "2"] if where == "flag" else ["--config", str(config)]
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), *given, str(_image(shapes_dir))])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --output FILE" in err[0], err


def test_caption_help_lists_the_trainer_section(capsys):
    assert main(["caption", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--trainer.devices" in text and "--batch-size" in text and "--config" in text
