"""A full disk ends every command that writes with one line naming the file and the space it
needed (exit 2), leaves nothing torn, and the same command goes on once space is freed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from captioner.data.features import FeatureStore
from tests.conftest import fit_args
from tests.helpers import FullDisk


@pytest.fixture(scope="module")
def quick_checkpoint(shapes_dir, tmp_path_factory) -> Path:
    """A checkpoint of two training steps: what export and caption write does not depend on
    how well it captions."""
    root = tmp_path_factory.mktemp("run")
    assert main(fit_args(shapes_dir, root, "--trainer.max_steps", "2")) == 0
    return root / "checkpoints" / "last.ckpt"


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


def test_fit_that_cannot_write_its_config_says_to_run_again(shapes_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    with FullDisk("*config.yaml*"):
        assert main(fit_args(shapes_dir, run, "--trainer.max_steps", "2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    _needs(line, run / "config.yaml")
    assert line.endswith("free space and run the same command again (no checkpoint was saved yet)"), line
    _no_temporaries(run)


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


def _needs(line: str, path: Path) -> None:
    """The line names ``path``, a size it needed and the (faked) free space."""
    assert re.search(rf"writing {re.escape(str(path))} \(needs [\d.]+ (bytes|kB|MB), 100.0 kB free\); free space",
                     line), line


def test_features_extract_on_a_full_disk_keeps_its_chunks_and_resumes(shapes_dir, tmp_path, capsys) -> None:
    from tests.test_features import _write_config

    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir)
    out = tmp_path / "cache"
    args = ["features", "extract", "--config", str(cfg), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--chunk-size", "4", "--splits", "val", "test"]
    # the rows go straight into the (reserved) shards; a chunk's record says they are there: the
    # first record is written, the second not
    with FullDisk("*chunk-*", skip=1) as disk:
        assert main(args) == 2
    assert disk.failed
    line = _one_error_line(capsys.readouterr().err)
    _needs(line, out / "parts" / "chunk-000000004-000004.json")
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["chunk-000000000-000004.json"]  # nothing torn
    assert main(args) == 0  # space freed: the same command
    err = capsys.readouterr().err
    assert "4 of 16 images already extracted" in err, err  # resumed after the first chunk
    FeatureStore(out)  # opens: a complete cache
    assert json.loads((out / "index.json").read_text())["complete"] is True
    assert not (out / "parts").exists()


def test_export_on_a_full_disk_leaves_no_folder(quick_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    args = ["export", "--checkpoint", str(quick_checkpoint), "--out", str(out)]
    with FullDisk("model.safetensors"):
        assert main(args) == 2
    _needs(_one_error_line(capsys.readouterr().err), out / "model.safetensors")
    assert sorted(tmp_path.iterdir()) == []  # no folder, no hidden temporary one
    assert main(args) == 0 and (out / "config.json").is_file()


def test_data_convert_on_a_full_disk_leaves_the_old_split_file(tmp_path, capsys) -> None:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"")
    (tmp_path / "c.csv").write_text("image,caption\na.png,a red square\nb.png,a blue circle\n")
    out = tmp_path / "dataset.json"
    out.write_text("old")
    args = ["data", "convert", "--from", "csv", str(tmp_path / "c.csv"), "--image-root", str(tmp_path / "img"),
            "--out", str(out), "--allow-missing"]
    with FullDisk("*dataset.json*"):
        assert main(args) == 2
    _needs(_one_error_line(capsys.readouterr().err), out)
    assert out.read_text() == "old"
    _no_temporaries(tmp_path)
    assert main(args) == 0 and json.loads(out.read_text())["images"]


def test_caption_output_on_a_full_disk_keeps_its_part_and_resumes(quick_checkpoint, shapes_dir, tmp_path, capsys) -> None:
    images = sorted((shapes_dir / "images").iterdir())[:6]
    out = tmp_path / "caps.jsonl"
    args = ["caption", "--checkpoint", str(quick_checkpoint), "--device", "cpu", "--batch-size", "2",
            "--format", "jsonl", "--output", str(out), *map(str, images)]
    with FullDisk("caps.jsonl.part", room=500):  # room for the rows of a few images
        assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    _needs(line, out.with_name("caps.jsonl.part"))
    assert "--resume" in line and not out.exists()
    kept = out.with_name("caps.jsonl.part").read_text().splitlines()
    assert 0 < len(kept) < len(images)
    assert main([*args, "--resume"]) == 0
    rows = [json.loads(r) for r in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(map(str, images))  # each image once
    assert out.read_text().splitlines()[:len(kept) - 1] == kept[:-1]  # the rows kept, not redone


@pytest.mark.parametrize(("flag", "written"), [("--output", "metrics.json"), ("--report", "report/summary.md")])
def test_evaluate_output_on_a_full_disk(flag, written, shapes_dir, tmp_path, capsys) -> None:
    data = json.loads((shapes_dir / "dataset.json").read_text())
    results = [{"image_id": im["imgid"], "caption": im["sentences"][0]["raw"]}
               for im in data["images"] if im["split"] == "test"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / written
    args = ["evaluate", "--predictions", str(tmp_path / "results.json"), "--references",
            str(shapes_dir / "dataset.json"), "--split", "test", "--no-meteor",
            flag, str(tmp_path / written.split("/")[0])]
    with FullDisk(f"*{out.name}*"):
        assert main(args) == 2
    _needs(_one_error_line(capsys.readouterr().err), out)
    _no_temporaries(tmp_path)
    assert not out.exists()
    assert main(args) == 0 and out.is_file()


def test_shapes_on_a_full_disk_leaves_no_data_set(tmp_path, capsys) -> None:
    out = tmp_path / "shapes"
    args = ["shapes", "--out", str(out), "--num-images", "6", "--image-size", "24"]
    with FullDisk("*.png", skip=2):  # two images fit
        assert main(args) == 2
    _needs(_one_error_line(capsys.readouterr().err), out / "images" / "000002.png")
    assert sorted(tmp_path.iterdir()) == []  # neither the data set nor its temporary folder
    assert main(args) == 0 and len(list((out / "images").iterdir())) == 6


def test_a_failed_write_without_errno_is_a_full_disk_only_when_space_is_short(tmp_path, monkeypatch) -> None:
    """torch's zip writer and numpy's tofile say "unexpected pos" / "N requested and M written"
    with no errno: the free space decides."""
    from captioner import files

    def torn(f):  # fails on the file, not when the size is measured
        f.write(b"x" * 1000)
        if hasattr(f, "fileno"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    for free, full in ((10, True), (10**9, False)):
        monkeypatch.setattr(files, "free_bytes", lambda path, free=free: free)
        with pytest.raises(files.DiskFullError if full else RuntimeError) as err:
            files.atomic_write(tmp_path / "x.ckpt", torn)
        assert isinstance(err.value, files.DiskFullError) == full
        if full:
            assert str(err.value).startswith(f"no space left on device writing {tmp_path / 'x.ckpt'} "
                                             "(needs 1.0 kB, 10 bytes free)")
        assert list(tmp_path.iterdir()) == []


def test_the_old_atomic_module_warns_and_is_captioner_files(monkeypatch) -> None:
    """captioner.data.atomic moved to captioner.files: the old name still works for one release,
    warns, and is the module itself (a patch through it reaches the writers)."""
    import importlib

    from captioner import files

    monkeypatch.delitem(sys.modules, "captioner.data.atomic", raising=False)
    with pytest.warns(DeprecationWarning, match="captioner.files"):
        old = importlib.import_module("captioner.data.atomic")
    assert old is files and old.DiskFullError is files.DiskFullError
