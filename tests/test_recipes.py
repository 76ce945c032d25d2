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


# `curl` for the recipes' downloads, offline: the URL's last part from the folder WEB (written as
# curl -f -o FILE writes it), else a 404 (curl's exit 22); each URL asked for goes to LOG.
FAKE_CURL = """#!/bin/sh
out=""; url=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o|-C|--retry|--retry-delay|--connect-timeout) [ "$1" != -o ] || out="$2"; shift 2 ;;
        -*) shift ;;
        *) url="$1"; shift ;;
    esac
done
echo "$url" >> "{log}"
name="${{url##*/}}"
[ -f "{web}/$name" ] || {{ echo "curl: (22) The requested URL returned error: 404" >&2; exit 22; }}
cp "{web}/$name" "$out"
"""


def run_recipe(script: str, *args: str, tmp: Path, without: str | None = None,
               captioner: str | None = None, web: Path | None = None) -> subprocess.CompletedProcess:
    """``bash scripts/SCRIPT ARGS`` in ``tmp``, with `captioner` on the PATH: this checkout's, or
    the program text ``captioner``; ``without``: a program left off the PATH; ``web``: the folder
    a fake `curl` serves (its requests in ``tmp/requests.log``)."""
    shim = tmp / ("bin" if captioner is None else "fake-bin")
    shim.mkdir(exist_ok=True)
    (shim / "captioner").write_text(
        captioner or f'#!/bin/sh\nexec "{sys.executable}" -m captioner.cli "$@"\n')
    (shim / "captioner").chmod(0o755)
    path = [str(shim), *os.environ["PATH"].split(os.pathsep)]
    if web is not None:
        (tmp / "web-bin").mkdir(exist_ok=True)
        (tmp / "web-bin" / "curl").write_text(FAKE_CURL.format(web=web, log=tmp / "requests.log"))
        (tmp / "web-bin" / "curl").chmod(0o755)
        path.insert(0, str(tmp / "web-bin"))
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
    args = ["--source", str(source), "--data", "data", "--work", "work", "--no-meteor", "--expect-images", "10",
            "--", *SETTINGS]

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
    args = ["--source", str(source), "--data", "data", "--work", "work", "--no-features", "--expect-images", "10",
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


# -- where the split file comes from: the sources in order, offline (a fake curl) ---------------
F8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"


def flickr8k_web(folder: Path, karpathy: bool, text: bool) -> dict:
    """The Flickr8k release as its URLs give it: Flickr8k_Dataset.zip (10 listed images and one in
    no list, as 91 of the real 8,091 are), with Flickr8k_text.zip and/or caption_datasets.zip."""
    _, dataset = flickr8k_source(folder)
    names = [im["filename"] for im in dataset["images"]]
    with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "a") as z:
        z.writestr("Flicker8k_Dataset/99_unlisted.jpg", _jpeg((1, 2, 3)))
    if not karpathy:
        (folder / "caption_datasets.zip").unlink()
    if text:
        tokens = [f"{im['filename']}#{k}\t{s['raw']}" for im in dataset["images"]
                  for k, s in enumerate(im["sentences"])] + ["99_unlisted.jpg#0\tA stray dog ."]
        lists = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                 "test": "Flickr_8k.testImages.txt"}
        with zipfile.ZipFile(folder / "Flickr8k_text.zip", "w") as z:
            z.writestr("Flickr8k.token.txt", "\n".join(tokens) + "\n")
            z.writestr("Flickr8k.lemma.token.txt", "")
            for split, name in lists.items():
                z.writestr(name, "".join(f"{n}\n" for n, s in zip(names, SPLITS) if s == split))
    return dataset


def requests(tmp: Path) -> list[str]:
    log = tmp / "requests.log"
    return log.read_text().split() if log.is_file() else []


@pytest.mark.parametrize("karpathy", [True, False])
def test_flickr8k_split_file_from_the_first_source_that_answers(tmp_path, karpathy) -> None:
    dataset = flickr8k_web(tmp_path / "web", karpathy=karpathy, text=True)
    proc = run_recipe("download_flickr8k.sh", "data", "--expect-images", "11", tmp=tmp_path, web=tmp_path / "web")
    out = _ok(proc)
    assert "disk: about 8.7 GB: 1.1 GB of archives, 1.1 GB of images, 6.5 GB of features (8,091 x 802,816 B;" in out
    assert "11 images in " in out
    tried = [F8K + "Flickr8k_Dataset.zip", KARPATHY] + ([] if karpathy else [F8K + "Flickr8k_text.zip"])
    assert requests(tmp_path) == tried  # in order, and no further than the first that answers
    made = json.loads((tmp_path / "data" / "dataset_flickr8k.json").read_text())
    if karpathy:
        assert made == dataset
        return
    assert "caption_datasets.zip: download failed (curl exit 22)" in proc.stderr
    assert "10 images, 50 captions (train 6, val 2, test 2)" in out
    assert "left out, in no split list: 1 captioned image(s) of Flickr8k.token.txt (99_unlisted.jpg)" in out
    assert made["dataset"] == "flickr8k"
    assert {im["filename"]: (im["split"], [s["raw"] for s in im["sentences"]]) for im in made["images"]} == {
        im["filename"]: (im["split"], [s["raw"] for s in im["sentences"]]) for im in dataset["images"]}
    # what train_flickr8k.sh goes on with: the data check stage reads it
    assert main_data_check(tmp_path / "data" / "dataset_flickr8k.json", tmp_path / "data" / "Flicker8k_Dataset")
    # run again: the download stage is skipped, nothing is asked for
    out = _ok(run_recipe("download_flickr8k.sh", "data", "--expect-images", "11", tmp=tmp_path, web=tmp_path / "web"))
    assert "== 1/8 download: skipped (already there" in out and len(requests(tmp_path)) == len(tried)


def main_data_check(split: Path, root: Path) -> bool:
    from captioner.cli import main

    return main(["data", "check", "--karpathy-json", str(split), "--image-root", str(root)]) == 0


def test_flickr8k_image_count_and_all_sources_failing_stop_with_the_way_on(tmp_path) -> None:
    flickr8k_web(tmp_path / "web", karpathy=False, text=False)
    proc = run_recipe("train_flickr8k.sh", "--data", "data", tmp=tmp_path, web=tmp_path / "web")
    assert proc.returncode == 2
    data = tmp_path / "data"
    assert (f"error: 11 images in {data / 'Flicker8k_Dataset'}, but flickr8k has 8091: an archive is incomplete "
            "or not flickr8k's; delete") in proc.stderr
    assert requests(tmp_path) == [F8K + "Flickr8k_Dataset.zip"]  # stopped before the split file

    proc = run_recipe("train_flickr8k.sh", "--data", "data", "--expect-images", "11", tmp=tmp_path, web=tmp_path / "web")
    assert proc.returncode == 2
    assert requests(tmp_path)[1:] == [KARPATHY, F8K + "Flickr8k_text.zip"]  # both tried, in order
    err = proc.stderr[proc.stderr.index("\nerror: ") + 1:]
    assert err.startswith("error: no source of dataset_flickr8k.json answered (caption_datasets.zip, Flickr8k_text.zip")
    assert f"put Karpathy's dataset_flickr8k.json in {data}" in err
    assert ("put Flickr8k.token.txt Flickr_8k.trainImages.txt Flickr_8k.devImages.txt Flickr_8k.testImages.txt "
            f"(from Flickr8k_text.zip) in {data} and run") in err
    assert (f"captioner data convert --from flickr8k {data}/Flickr8k.token.txt --image-root "
            f"{data}/Flicker8k_Dataset --out {data}/dataset_flickr8k.json") in err
    assert not (data / "dataset_flickr8k.json").exists()

    # the manual way, as the message says, then the recipe goes on from there
    flickr8k_web(tmp_path / "web2", karpathy=False, text=True)
    with zipfile.ZipFile(tmp_path / "web2" / "Flickr8k_text.zip") as z:
        z.extractall(data)
    line = err[err.index("captioner data convert"):].splitlines()[0].split()
    assert main_convert(line[1:]) == 0
    out = _ok(run_recipe("download_flickr8k.sh", "data", "--expect-images", "11", tmp=tmp_path, web=tmp_path / "web"))
    assert "download: skipped" in out


def main_convert(args: list[str]) -> int:
    from captioner.cli import main

    return main(args)


def coco_web(folder: Path, karpathy: bool, lavis: bool) -> tuple[dict, dict]:
    """train2014.zip, val2014.zip, and caption_datasets.zip and/or BLIP/LAVIS's coco_karpathy_*.json
    with annotations_trainval2014.zip (captions_*2014.json under annotations/, as COCO's is)."""
    _, dataset = coco_source(folder)
    if not karpathy:
        (folder / "caption_datasets.zip").unlink()
    coco = {sub: {"images": [], "annotations": []} for sub in ("train2014", "val2014")}
    lavis_files: dict[str, list] = {"train": [], "val": [], "test": []}
    for im in dataset["images"]:
        sub, cocoid = im["filepath"], im["cocoid"]
        coco[sub]["images"].append({"id": cocoid, "file_name": im["filename"], "width": 48, "height": 36})
        coco[sub]["annotations"] += [{"id": 10 * cocoid + k, "image_id": cocoid, "caption": s["raw"]}
                                     for k, s in enumerate(im["sentences"])]
        image = f"{sub}/{im['filename']}"
        if im["split"] == "train":
            lavis_files["train"] += [{"image": image, "caption": s["raw"], "image_id": f"coco_{cocoid}"}
                                     for s in im["sentences"]]
        else:
            lavis_files[im["split"]].append({"image": image, "caption": [s["raw"] for s in im["sentences"]]})
    if lavis:
        for split, entries in lavis_files.items():
            (folder / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
        with zipfile.ZipFile(folder / "annotations_trainval2014.zip", "w") as z:
            for sub, data in coco.items():
                z.writestr(f"annotations/captions_{sub}.json", json.dumps(data))
                z.writestr(f"annotations/instances_{sub}.json", "{}")
    return dataset, coco


def test_coco_split_file_from_lavis_files_then_all_failing(tmp_path) -> None:
    dataset, _ = coco_web(tmp_path / "web", karpathy=False, lavis=True)
    proc = run_recipe("download_coco.sh", "--data", "data", "--expect-images", "10", tmp=tmp_path,
                      web=tmp_path / "web", without="unzip")
    out = _ok(proc)
    assert "disk: about 137 GB: 19 GB of archives, 19 GB of images, 99 GB of features (123,287 x 802,816 B;" in out
    images = "http://images.cocodataset.org/zips/"
    assert requests(tmp_path) == [
        images + "val2014.zip", images + "train2014.zip", KARPATHY,
        *(f"{LAVIS}coco_karpathy_{s}.json" for s in ("train", "val", "test")),
        "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"]
    data = tmp_path / "data"
    made = json.loads((data / "dataset_coco.json").read_text())
    assert made["dataset"] == "coco" and "10 images, 50 captions (train 6, val 2, test 2)" in out
    assert [(im["filepath"], im["filename"], im["cocoid"], im["split"], [s["raw"] for s in im["sentences"]])
            for im in made["images"]] == [
        (im["filepath"], im["filename"], im["cocoid"], im["split"], [s["raw"] for s in im["sentences"]])
        for im in dataset["images"]]
    assert main_data_check(data / "dataset_coco.json", data)

    # nothing answers for the split file: the manual way
    shutil.rmtree(tmp_path / "data")
    coco_web(tmp_path / "web3", karpathy=False, lavis=False)
    proc = run_recipe("download_coco.sh", "--data", "data", "--expect-images", "10", tmp=tmp_path,
                      web=tmp_path / "web3")
    assert proc.returncode == 2
    err = proc.stderr[proc.stderr.index("\nerror: ") + 1:]
    assert err.startswith("error: no source of dataset_coco.json answered (caption_datasets.zip, coco_karpathy_*.json")
    assert "put coco_karpathy_train.json, coco_karpathy_val.json, coco_karpathy_test.json (BLIP/LAVIS)" in err
    assert f"captioner data convert --from coco-karpathy {data} --image-root {data} --out {data}/dataset_coco.json" in err


def test_flickr8k_listed_image_missing_after_conversion_stops_the_recipe(tmp_path) -> None:
    dataset = flickr8k_web(tmp_path / "web", karpathy=False, text=True)
    gone = dataset["images"][3]["filename"]
    archive = tmp_path / "web" / "Flickr8k_Dataset.zip"
    with zipfile.ZipFile(archive) as z:
        members = {n: z.read(n) for n in z.namelist() if not n.endswith(gone)}
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    proc = run_recipe("download_flickr8k.sh", "data", "--expect-images", "10", tmp=tmp_path, web=tmp_path / "web")
    data = tmp_path / "data"
    assert proc.returncode == 2
    assert (f"error: 1 image(s) of the split are not in {data / 'Flicker8k_Dataset'} (listed in "
            f"{data / 'convert-report.txt'}): mend the image folder and run again") in proc.stderr
    assert f"dropped, missing image: {data / 'Flicker8k_Dataset' / gone}" in (data / "convert-report.txt").read_text()
    assert not (data / "dataset_flickr8k.json").exists()  # not left for the next run to take as done


def test_coco_published_files_from_source_without_curl(tmp_path) -> None:
    """--source DIR holding BLIP/LAVIS's files and COCO's annotation archive (no Karpathy zip):
    nothing is downloaded, so no curl is needed; the JSON files are copied into the data folder."""
    dataset, _ = coco_web(tmp_path / "mirror", karpathy=False, lavis=True)
    out = _ok(run_recipe("download_coco.sh", "--data", "data", "--source", "mirror", "--expect-images", "10",
                         tmp=tmp_path, without="curl"))
    data = tmp_path / "data"
    assert "10 images, 50 captions (train 6, val 2, test 2)" in out
    assert sorted(p.name for p in data.iterdir()) == [
        "captions_train2014.json", "captions_val2014.json", "coco_karpathy_test.json", "coco_karpathy_train.json",
        "coco_karpathy_val.json", "convert-report.txt", "dataset_coco.json", "train2014", "val2014"]
    assert [im["cocoid"] for im in json.loads((data / "dataset_coco.json").read_text())["images"]] == [
        im["cocoid"] for im in dataset["images"]]
