"""A full disk ends every command that writes with one line naming the file and the space it
needed (exit 2), leaves nothing torn, and the same command goes on once space is freed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
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


def test_fit_on_a_real_full_file_system(shapes_dir, tmp_path, capsys) -> None:
    """The same on a 1 MB tmpfs (needs root; skipped elsewhere): torch.save's own error on a full
    disk ("unexpected pos") becomes the one line, and the run resumes once a file is removed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount)")
    try:
        filler = disk / "filler"
        # ~400 kB left: the step-2 last.ckpt (~250 kB) fits, a second one beside it does not
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 400_000))
        run = disk / "run"
        args = fit_args(shapes_dir, run, "--trainer.max_steps", "4", "--last_checkpoint.every_n_steps", "2")
        capsys.readouterr()
        assert main(args) == 2
        line = _one_error_line(capsys.readouterr().err)
        last = (run / "checkpoints" / "last.ckpt").resolve()
        assert re.search(rf"writing {re.escape(str(last))} \(needs [\d.]+ kB, [\d.]+ kB free\)", line), line
        assert torch.load(last, weights_only=False)["global_step"] == 2
        _no_temporaries(run)
        filler.unlink()  # space freed
        assert main([*args, "--ckpt_path", str(last)]) == 0
        assert torch.load(last, weights_only=False)["global_step"] == 4
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("log", ["metrics.csv", "events.out.tfevents.*"])
def test_fit_whose_logs_fill_the_disk_ends_in_one_line(log, shapes_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = fit_args(shapes_dir, run, "--trainer.max_steps", "4", "--trainer.logger", "true",
                    "--trainer.log_every_n_steps", "1")
    with FullDisk(log) as disk:
        capsys.readouterr()
        assert main(args) == 2
    assert disk.failed
    line = _one_error_line(capsys.readouterr().err)
    folder = "logs" if log == "metrics.csv" else "tensorboard"
    assert f"writing {run / folder / 'version_0'}" in line and "100.0 kB free" in line, line
