"""scripts/train_flickr8k.sh and scripts/train_coco.sh: the whole recipe, end to end, on tiny data
sets packed as the real archives are (given with --source instead of the URLs), with a
random-weight backbone and two steps per fit; run again, every stage is skipped."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).parent.parent
SCRIPTS = ROOT / "scripts"
STAGES = ["download", "data check", "features", "cross-entropy training", "SCST fine-tuning",
          "evaluate the cross-entropy model", "evaluate the SCST model", "export"]

# Settings after `--`, for every stage: a random-weight ResNet-50 on 32-px images (a 1x1 map
# pooled to 2x2), a 16-wide decoder, two optimiser steps per fit (one epoch of CE, two of SCST).
SETTINGS = [
    "--model.encoder.name", "resnet50", "--model.encoder.pretrained", "false",
    "--model.encoder.image_size", "32", "--model.encoder.grid", "2",
    "--model.decoder.embed_dim", "16", "--model.decoder.attention_dim", "16",
    "--model.decoder.decoder_dim", "16",
    "--data.min_count", "1", "--data.num_workers", "0", "--data.batch_size", "16",
    "--data.eval_batch_size", "16",
    "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
]
COLOURS = {"red": (200, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 200), "yellow": (220, 210, 40),
           "black": (10, 10, 10)}
THINGS = ("dog", "ball", "car", "boat", "kite")


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 36), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _entries(names: list[str], splits: list[str], **extra) -> list[dict]:
    """Karpathy split-file entries, five captions each, as dataset_*.json holds them."""
    out, sentid = [], 0
    for imgid, (name, split) in enumerate(zip(names, splits)):
        colour = list(COLOURS)[imgid % len(COLOURS)]
        sentences = []
        for k in range(5):
            tokens = ["a", colour, THINGS[(imgid + k) % len(THINGS)], "in", "the", "park"]
            sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".",
                              "imgid": imgid, "sentid": sentid})
            sentid += 1
        out.append({"filename": name, "imgid": imgid, "split": split, **extra.get(name, {}),
                    "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    return out


SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2


def _colour(i: int) -> tuple[int, int, int]:
    return list(COLOURS.values())[i % len(COLOURS)]


def flickr8k_source(folder: Path) -> tuple[Path, dict]:
    """Flickr8k_Dataset.zip (its images under Flicker8k_Dataset/, spelt so, beside a stray
    __MACOSX/) and caption_datasets.zip (the three split files), as the download URLs give them."""
    folder.mkdir(parents=True)
    names = [f"{1000268201 + 17 * i}_{i:03x}d5c6.jpg" for i in range(len(SPLITS))]
    dataset = {"dataset": "flickr8k", "images": _entries(names, SPLITS)}
    with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "w") as z:
        for i, name in enumerate(names):
            z.writestr(f"Flicker8k_Dataset/{name}", _jpeg(_colour(i)))
        z.writestr(f"__MACOSX/Flicker8k_Dataset/._{names[0]}", b"\0\5\26\7")
    with zipfile.ZipFile(folder / "caption_datasets.zip", "w") as z:
        z.writestr("dataset_flickr8k.json", json.dumps(dataset))
        z.writestr("dataset_flickr30k.json", json.dumps({"dataset": "flickr30k", "images": []}))
    return folder, dataset


def coco_source(folder: Path) -> tuple[Path, dict]:
    """train2014.zip, val2014.zip (images under train2014/, val2014/) and caption_datasets.zip."""
    folder.mkdir(parents=True)
    names, extra = [], {}
    for i, split in enumerate(SPLITS):
        sub = "train2014" if split == "train" else "val2014"
        name = f"COCO_{sub}_{100 + i:012d}.jpg"
        names.append(name)
        extra[name] = {"filepath": sub, "cocoid": 100 + i}
    dataset = {"dataset": "coco", "images": _entries(names, SPLITS, **extra)}
    for sub in ("train2014", "val2014"):
        with zipfile.ZipFile(folder / f"{sub}.zip", "w") as z:
            for i, name in enumerate(names):
                if extra[name]["filepath"] == sub:
                    z.writestr(f"{sub}/{name}", _jpeg(_colour(i)))
    with zipfile.ZipFile(folder / "caption_datasets.zip", "w") as z:
        z.writestr("dataset_coco.json", json.dumps(dataset))
    return folder, dataset


def run_recipe(script: str, *args: str, tmp: Path, without: str | None = None,
               captioner: str | None = None) -> subprocess.CompletedProcess:
    """``bash scripts/SCRIPT ARGS`` in ``tmp``, with `captioner` on the PATH: this checkout's, or
    the program text ``captioner``; ``without``: a program left off the PATH."""
    shim = tmp / ("bin" if captioner is None else "fake-bin")
    shim.mkdir(exist_ok=True)
    (shim / "captioner").write_text(
        captioner or f'#!/bin/sh\nexec "{sys.executable}" -m captioner.cli "$@"\n')
    (shim / "captioner").chmod(0o755)
    path = [str(shim), *os.environ["PATH"].split(os.pathsep)]
    if without is not None:
        path[1:] = [str(_programs_except(without, tmp / f"no-{without}", path[1:]))]
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PATH": os.pathsep.join(path), "PYTHONPATH": pythonpath}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=900)


def _programs_except(name: str, folder: Path, path: list[str]) -> Path:
    """A folder linking every program of ``path`` but ``name`` (the first of each name wins)."""
    folder.mkdir(exist_ok=True)
    for d in map(Path, path):
        for prog in sorted(d.iterdir()) if d.is_dir() else ():
            link = folder / prog.name
            if prog.name != name and not link.is_symlink() and prog.is_file() and os.access(prog, os.X_OK):
                link.symlink_to(prog)
    return folder


def stage_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("== ")]


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_flickr8k_recipe_end_to_end_then_every_stage_skipped(tmp_path) -> None:
    from captioner import CaptionPipeline

    source, dataset = flickr8k_source(tmp_path / "archives")
    data, work = tmp_path / "data", tmp_path / "work"
    args = ["--source", str(source), "--data", "data", "--work", "work", "--no-meteor", "--", *SETTINGS]

    proc = run_recipe("train_flickr8k.sh", *args, tmp=tmp_path)
    lines = stage_lines(_ok(proc))
    assert [line.split(" ", 2)[2] for line in lines] == STAGES, lines  # each ran, in order
    assert f"Flickr8k_Dataset.zip: from {source}" in proc.stderr

    # download: the archives' layout, unpacked from --source, nothing left over
    assert json.loads((data / "dataset_flickr8k.json").read_text()) == dataset
    assert sorted(p.name for p in (data / "Flicker8k_Dataset").iterdir()) == sorted(
        im["filename"] for im in dataset["images"])
    names = sorted(p.name for p in data.iterdir())
    assert names[:2] == ["Flicker8k_Dataset", "dataset_flickr8k.json"] and len(names) == 3
    assert names[2].startswith("vocab-dataset_flickr8k-min1-")  # the vocabulary, named after its data
    assert "no problems found" in (work / "data-check.txt").read_text()
    index = json.loads((work / "features" / "index.json").read_text())
    assert index["complete"] and index["counts"]["images"] == 10 and index["encoder"]["name"] == "resnet50"
    for run in ("ce", "scst"):
        assert (work / run / "checkpoints" / "best.ckpt").is_file(), run
        assert "captioner fit --config" in (work / run / "recipe.done").read_text()
    scst = yaml.safe_load((work / "scst" / "config.yaml").read_text())
    assert scst["model"]["init_from"] == str(work / "ce" / "checkpoints" / "best.ckpt")
    assert scst["model"]["scst"]["enabled"] and scst["data"]["feature_cache"] == str(work / "features")
    for name in ("eval-ce", "eval-scst"):
        metrics = json.loads((work / name / "metrics.json").read_text())
        assert metrics["split"] == "test" and metrics["num_images"] == 2 and "CIDEr" in metrics, name
        assert len(json.loads((work / name / "results.json").read_text())) == 2
        assert (work / name / "summary.md").is_file()
    model = work / "captioner-flickr8k"
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "CIDEr" in (model / "README.md").read_text()  # the card holds the test scores
    test_image = data / "Flicker8k_Dataset" / dataset["images"][-1]["filename"]
    assert isinstance(CaptionPipeline.from_pretrained(model)(str(test_image)).text, str)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*.unzip"))

    # again: every stage says it is skipped, and nothing is touched
    before = snapshot(data, work)
    out = _ok(run_recipe("train_flickr8k.sh", *args, tmp=tmp_path))
    lines = stage_lines(out)
    assert len(lines) == len(STAGES) and all(": skipped (" in line for line in lines), lines
    assert snapshot(data, work) == before

    # a run killed during SCST (no recipe.done yet) resumes it, then does what follows it
    (work / "scst" / "recipe.done").unlink()
    for name in ("eval-scst", "captioner-flickr8k"):
        shutil.rmtree(work / name)
    out = _ok(run_recipe("train_flickr8k.sh", *args, tmp=tmp_path))
    ran = [line.split(" ", 2)[2] for line in stage_lines(out) if ": skipped (" not in line]
    assert ran == ["SCST fine-tuning", "evaluate the SCST model", "export"], stage_lines(out)
    assert f"resuming from {work / 'scst' / 'checkpoints' / 'last.ckpt'}" in out
    assert (model / "config.json").is_file()


# `captioner` for the COCO test: `data check` runs for real (it reads the layout the download
# made); fit, evaluate and export only make their outputs. Each call's arguments go to LOG.
RECORDING_CAPTIONER = """#!{python}
import json
import sys
from pathlib import Path

args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")


def value(flag):
    return Path(args[args.index(flag) + 1])


if args[0] == "data":
    from captioner.cli import main

    sys.exit(main(args))
if args[0] == "fit":
    folder = value("--trainer.default_root_dir") / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.ckpt").touch()
elif args[0] == "evaluate":
    value("--report").mkdir(parents=True)
    (value("--report") / "metrics.json").write_text("{{}}")
elif args[0] == "export":
    value("--out").mkdir()
else:
    sys.exit("unexpected: " + " ".join(args))
"""


def test_coco_recipe_lays_out_coco_and_runs_each_stage_with_its_config(tmp_path) -> None:
    """COCO's layout (train2014/, val2014/ in the data folder, the split file's filepath), unzipped
    with Python's zipfile where there is no unzip, and the commands of the stages (a whole run is
    the Flickr8k test's; this one records them), with --no-features."""
    source, dataset = coco_source(tmp_path / "archives")
    data, work, log = tmp_path / "data", tmp_path / "work", tmp_path / "calls.jsonl"
    fake = RECORDING_CAPTIONER.format(python=sys.executable, log=str(log))
    args = ["--source", str(source), "--data", "data", "--work", "work", "--no-features",
            "--", "--data.num_workers", "0"]
    proc = run_recipe("train_coco.sh", *args, tmp=tmp_path, without="unzip", captioner=fake)
    lines = stage_lines(_ok(proc))
    assert [line.split(" ", 2)[2].split(":")[0] for line in lines] == STAGES, lines
    assert "features: skipped (--no-features" in lines[2]

    assert sorted(p.name for p in data.iterdir()) == ["dataset_coco.json", "train2014", "val2014"]
    assert len(list((data / "train2014").iterdir())) == 6 and len(list((data / "val2014").iterdir())) == 4
    assert json.loads((data / "dataset_coco.json").read_text()) == dataset
    assert "no problems found" in (work / "data-check.txt").read_text()  # every image found

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["data", "fit", "fit", "evaluate", "evaluate", "export"]
    karpathy = ["--data.karpathy.split_file", str(data / "dataset_coco.json"),
                "--data.karpathy.image_root", str(data)]  # filepath/filename below the data folder
    assert calls[0] == ["data", "check", "--karpathy-json", karpathy[1], "--image-root", str(data)]
    ce_best = str(work / "ce" / "checkpoints" / "best.ckpt")
    assert calls[1] == ["fit", "--config", str(ROOT / "configs" / "coco.yaml"), *karpathy,
                        "--trainer.default_root_dir", str(work / "ce"), "--data.num_workers", "0"]
    assert calls[2] == ["fit", "--config", str(ROOT / "configs" / "coco-scst.yaml"), *karpathy,
                        "--trainer.default_root_dir", str(work / "scst"), "--model.init_from", ce_best,
                        "--data.num_workers", "0"]
    assert calls[3][:5] == ["evaluate", "--checkpoint", ce_best, "--split", "test"]
    assert calls[5] == ["export", "--checkpoint", str(work / "scst" / "checkpoints" / "best.ckpt"),
                        "--out", str(work / "captioner-coco"),
                        "--metrics", str(work / "eval-scst" / "metrics.json")]

    proc = run_recipe("train_coco.sh", *args, tmp=tmp_path, without="unzip", captioner=fake)
    assert all(": skipped (" in line for line in stage_lines(_ok(proc)))
    assert len(log.read_text().splitlines()) == len(calls)  # nothing ran again


@pytest.mark.parametrize("script", ["train_flickr8k.sh", "train_coco.sh"])
def test_scripts_parse_and_refuse_unknown_options(script, tmp_path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0
    proc = run_recipe(script, "--help", tmp=tmp_path)
    assert proc.returncode == 0 and "--source DIR" in proc.stdout
    proc = run_recipe(script, "--epochs", "3", tmp=tmp_path)
    assert proc.returncode == 2 and "unknown option: --epochs (config settings go after --)" in proc.stderr
    proc = run_recipe(script, "--source", str(tmp_path / "nowhere"), tmp=tmp_path)
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was started
