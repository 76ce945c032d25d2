"""A full disk ends every command that writes with one line naming the file and the space it
needed (exit 2), leaves nothing torn, and the same command goes on once space is freed."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from captioner.cli import main
from tests.conftest import fit_args
from tests.helpers import FullDisk


def _one_error_line(err: str) -> str:
    """The error line of a command's stderr: exactly one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("captioner: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".part"))], sorted(folder.rglob("*"))


def test_fit_on_a_full_disk_says_how_to_resume_and_resumes(shapes_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = fit_args(shapes_dir, run, "--trainer.max_steps", "4", "--last_checkpoint.every_n_steps", "2")
    with FullDisk("*last.ckpt*", skip=1) as disk:  # last.ckpt at step 2 is written, at step 4 not
        capsys.readouterr()
        assert main(args) == 2
    assert disk.failed
    line = _one_error_line(capsys.readouterr().err)
    last = (run / "checkpoints" / "last.ckpt").resolve()
    assert re.search(rf"writing {re.escape(str(last))} \(needs [\d.]+ kB, 100.0 kB free\); free space", line), line
    resume = re.search(r"--ckpt_path (\S+)", line)
    assert resume and Path(resume.group(1)).resolve() == last, line
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the step-2 checkpoint, whole
    _no_temporaries(run)
    # space freed: the command the line gives continues from step 2 to step 4
    assert main([*args, "--ckpt_path", resume.group(1)]) == 0
    assert torch.load(last, weights_only=False)["global_step"] == 4
