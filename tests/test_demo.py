"""scripts/demo.sh after training, as a user with `captioner[serve]` runs it: TorchCodec, an
optional extra, is not installed there (the demo once stopped on `--jpeg-decode device`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_to_the_end_without_the_optional_extras(tiny_checkpoint, tmp_path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copytree(ROOT / "configs", root / "configs")
    ckpt = root / "runs" / "shapes" / "checkpoints" / "best.ckpt"  # trained already: the demo skips fit
    ckpt.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, ckpt)
    hide = tmp_path / "hide"  # `import torchcodec` fails as it does where the extra is not installed
    hide.mkdir()
    (hide / "torchcodec.py").write_text("raise ImportError(\"No module named 'torchcodec'\")\n")
    env = {**os.environ, "DEMO_NO_VENV": "1", "PYTHONPATH": f"{hide}{os.pathsep}{ROOT}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(root / "scripts" / "demo.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "of 6 images" in out.stdout  # the int8 comparison, after the JPEG step
    demo = root / "demo_out"
    assert len((demo / "captions.jsonl").read_text().splitlines()) == 6
    assert len(list((demo / "attention").glob("*.png"))) == 3
    assert (demo / "metrics.json").is_file()
