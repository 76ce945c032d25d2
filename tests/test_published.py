"""`captioner data convert --from flickr8k` / `--from coco-karpathy`: the published split files of
Flickr8k (Flickr8k.token.txt and its split lists) and COCO (BLIP/LAVIS's coco_karpathy_*.json with
COCO's caption files), made tiny in their real formats, -> Karpathy split files that `data check`
and `fit` read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.data.karpathy import read_karpathy
from captioner.data.published import read_coco_karpathy, read_flickr8k

THINGS = ("dog", "ball", "car", "boat", "kite")
COLOURS = ("red", "green", "blue", "yellow", "black")


def _caption(i: int, k: int) -> str:
    return f"A {COLOURS[i % 5]} {THINGS[(i + k) % 5]} in the park ."


def _jpeg(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (40 * (i % 6), 90, 200 - 30 * (i % 6))).save(path, format="JPEG")


# 8 listed images (4 train, 2 dev, 2 test) + 1 captioned image in no list + the token file's
# "<name>.jpg.1" entry that the real file has (no such image, in no list).
F_SPLITS = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
F_NAMES = [f"{1000268201 + 17 * i}_{i:03x}d5c6.jpg" for i in range(9)]


def flickr8k_text(folder: Path, images: Path | None = None, skip_image: int | None = None) -> Path:
    """Flickr8k_text.zip's files in ``folder`` (and its images in ``images``, one left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, name in enumerate(F_NAMES):
        lines += [f"{name}#{k}\t{_caption(i, k)}" for k in range(5)]
        if images is not None and i != skip_image:
            _jpeg(images / name, i)
    lines.append(f"{F_NAMES[0]}.1#0\tA stray entry .")
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    lists = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    for split, list_name in lists.items():
        (folder / list_name).write_text("".join(f"{n}\n" for n, s in zip(F_NAMES, F_SPLITS) if s == split))
    return folder / "Flickr8k.token.txt"


def test_flickr8k_token_file_and_lists_to_a_split_file(tmp_path: Path, capsys) -> None:
    images = tmp_path / "Flicker8k_Dataset"
    tokens = flickr8k_text(tmp_path / "text", images)
    out = tmp_path / "dataset_flickr8k.json"
    assert main(["data", "convert", "--from", "flickr8k", str(tokens), "--image-root", str(images),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 images, 40 captions (train 4, val 2, test 2)" in text
    assert f"left out, in no split list: 2 captioned image(s) of Flickr8k.token.txt ({F_NAMES[8]}, {F_NAMES[0]}.1)" in text
    data = json.loads(out.read_text())
    assert data["dataset"] == "flickr8k"
    by_name = {e["filename"]: e for e in data["images"]}
    assert set(by_name) == set(F_NAMES[:8])
    for i, name in enumerate(F_NAMES[:8]):
        entry = by_name[name]
        assert entry["split"] == F_SPLITS[i] and "filepath" not in entry and "cocoid" not in entry
        assert [s["raw"] for s in entry["sentences"]] == [_caption(i, k) for k in range(5)]
    assert by_name[F_NAMES[0]]["sentences"][0]["tokens"] == ["a", "red", "dog", "in", "the", "park"]
    records = read_karpathy(out, images)
    assert {k: len(v) for k, v in records.items()} == {"train": 4, "val": 2, "test": 2}
    # the folder holding the text files works as INPUT too, the same file results
    assert main(["data", "convert", "--from", "flickr8k", str(tokens.parent), "--image-root", str(images),
                 "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text()) == data
    capsys.readouterr()
    assert main(["data", "convert", "--from", "flickr8k", str(tokens), "--image-root", str(images),
                 "--out", str(tmp_path / "again.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"] == {"train": 4, "val": 2, "test": 2} and report["left_out"] == [
        f"left out, in no split list: 2 captioned image(s) of Flickr8k.token.txt ({F_NAMES[8]}, {F_NAMES[0]}.1)"]


def test_flickr8k_missing_image_and_lists_given_elsewhere(tmp_path: Path, capsys) -> None:
    images = tmp_path / "img"
    tokens = flickr8k_text(tmp_path / "text", images, skip_image=5)
    lists = tmp_path / "lists"
    lists.mkdir()
    (tokens.parent / "Flickr_8k.devImages.txt").rename(lists / "dev.txt")
    args = ["data", "convert", "--from", "flickr8k", str(tokens), "--image-root", str(images),
            "--out", str(tmp_path / "d.json")]
    assert main(args) == 2  # the dev list is not beside the token file any more
    err = capsys.readouterr().err
    assert f"{tokens.parent / 'Flickr_8k.devImages.txt'}: not found" in err and "--val-list FILE" in err
    assert main([*args, "--val-list", str(lists / "dev.txt")]) == 1  # image 5 dropped
    text = capsys.readouterr().out
    assert "7 images, 35 captions (train 4, val 1, test 2)" in text
    assert f"dropped, missing image: {images / F_NAMES[5]} ({tokens}:26)" in text


@pytest.mark.parametrize("line, where", [
    ("1000268201_000d5c6.jpg 0\tA dog .", "Flickr8k.token.txt:47"),  # no '#'
    ("1000268201_000d5c6.jpg#0 A dog .", "Flickr8k.token.txt:47"),  # no tab
    ("1000268201_000d5c6.jpg#x\tA dog .", "Flickr8k.token.txt:47"),
])
def test_flickr8k_malformed_token_line_is_named_by_file_and_line(tmp_path: Path, capsys, line, where) -> None:
    tokens = flickr8k_text(tmp_path)
    with open(tokens, "a") as f:
        f.write(line + "\n")
    assert main(["data", "convert", "--from", "flickr8k", str(tokens), "--image-root", str(tmp_path),
                 "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / where}: expected '<image>#<number><TAB><caption>'" in err[0], err
    assert not (tmp_path / "d.json").exists()


def test_an_option_of_another_format_is_refused(tmp_path: Path, capsys) -> None:
    coco_files(tmp_path, tmp_path)
    assert main(["data", "convert", "--from", "coco-karpathy", str(tmp_path), "--image-root", str(tmp_path),
                 "--out", str(tmp_path / "d.json"), "--test-list", str(tmp_path / "t.txt")]) == 2
    assert capsys.readouterr().err.strip() == (
        "captioner: error: --test-list is an option of --from flickr8k, not of --from coco-karpathy")
    assert not (tmp_path / "d.json").exists()


def test_flickr8k_image_in_two_lists_and_listed_without_caption(tmp_path: Path) -> None:
    tokens = flickr8k_text(tmp_path, tmp_path)
    with open(tmp_path / "Flickr_8k.testImages.txt", "a") as f:
        f.write(F_NAMES[8] + "\n")  # captioned, now listed: kept
        f.write("999_nocaption.jpg\n")
    published = read_flickr8k(tokens)
    assert [r.where for r in published.rows if r.caption is None] == [
        f"{tmp_path / 'Flickr_8k.testImages.txt'}:4 (no caption in {tokens})"]
    with open(tmp_path / "Flickr_8k.testImages.txt", "a") as f:
        f.write(F_NAMES[0] + "\n")
    with pytest.raises(ValueError, match=rf"testImages.txt:5: {F_NAMES[0]} is already listed at "
                                         rf".*trainImages.txt:1"):
        read_flickr8k(tokens)


# COCO: 7 images, train2014 (4) and val2014 (3); Karpathy: train 3 (one from val2014, like restval)
# + val 1 + test 1; one train2014 image in no Karpathy split; one image with six captions.
C_IMAGES = [("train2014", 9), ("train2014", 25), ("train2014", 30), ("train2014", 42),
            ("val2014", 73), ("val2014", 74), ("val2014", 133)]
C_SPLITS = {9: "train", 25: "train", 73: "train", 74: "val", 133: "test"}


def _coco_captions(i: int, cocoid: int) -> list[str]:
    return [_caption(i, k) for k in range(5)] + (["A close view of a ball ."] if cocoid == 25 else [])


def coco_files(folder: Path, root: Path | None = None) -> Path:
    """coco_karpathy_{train,val,test}.json (BLIP/LAVIS's layout) and annotations/captions_*2014.json
    in ``folder``; the images under ``root``/train2014, val2014."""
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    coco: dict[str, dict] = {sub: {"images": [], "annotations": []} for sub in ("train2014", "val2014")}
    karpathy: dict[str, list] = {"train": [], "val": [], "test": []}
    for i, (sub, cocoid) in enumerate(C_IMAGES):
        name = f"COCO_{sub}_{cocoid:012d}.jpg"
        if root is not None:
            _jpeg(root / sub / name, i)
        captions = _coco_captions(i, cocoid)
        coco[sub]["images"].append({"id": cocoid, "file_name": name, "width": 40, "height": 40})
        # annotation ids out of order: captions come back ordered by id
        coco[sub]["annotations"] += [{"id": 1000 * cocoid + 9 - k, "image_id": cocoid, "caption": c}
                                     for k, c in enumerate(captions)]
        split = C_SPLITS.get(cocoid)
        if split == "train":  # one entry per caption (the first five, as BLIP's file has)
            karpathy["train"] += [{"image": f"{sub}/{name}", "caption": c, "image_id": f"coco_{cocoid}"}
                                  for c in captions[:5]]
        elif split:
            karpathy[split].append({"image": f"{sub}/{name}", "caption": captions[:5]})
    for sub, data in coco.items():
        (folder / "annotations" / f"captions_{sub}.json").write_text(json.dumps(data))
    for split, entries in karpathy.items():
        (folder / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
    return folder


def test_coco_karpathy_files_with_coco_captions_to_a_split_file(tmp_path: Path, capsys) -> None:
    coco_files(tmp_path / "ann", tmp_path / "coco")
    out = tmp_path / "coco" / "dataset_coco.json"
    assert main(["data", "convert", "--from", "coco-karpathy", str(tmp_path / "ann"), "--image-root",
                 str(tmp_path / "coco"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "5 images, 26 captions (train 3, val 1, test 1)" in text
    assert "left out, in no Karpathy split: 2 image(s) of COCO's caption files (COCO_train2014_000000000030.jpg, COCO_train2014_000000000042.jpg)" in text
    data = json.loads(out.read_text())
    assert data["dataset"] == "coco"
    by_id = {e["cocoid"]: e for e in data["images"]}
    assert set(by_id) == set(C_SPLITS)
    for i, (sub, cocoid) in enumerate(C_IMAGES):
        if cocoid not in C_SPLITS:
            continue
        entry = by_id[cocoid]
        assert (entry["filepath"], entry["filename"], entry["split"]) == (sub, f"COCO_{sub}_{cocoid:012d}.jpg",
                                                                         C_SPLITS[cocoid])
        # COCO's every caption (six for image 25), ordered by annotation id
        assert [s["raw"] for s in entry["sentences"]] == _coco_captions(i, cocoid)[::-1]
    records = read_karpathy(out, tmp_path / "coco")
    assert {k: [r.image_id for r in v] for k, v in records.items()} == {"train": [9, 25, 73], "val": [74], "test": [133]}
    assert all(r.path.is_file() for v in records.values() for r in v)
    assert main(["data", "check", "--karpathy-json", str(out), "--image-root", str(tmp_path / "coco")]) == 0


def test_coco_karpathy_problems_are_named(tmp_path: Path, capsys) -> None:
    folder = coco_files(tmp_path, tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000074.jpg").unlink()
    args = ["data", "convert", "--from", "coco-karpathy", str(tmp_path / "coco_karpathy_test.json"),
            "--image-root", str(tmp_path), "--out", str(tmp_path / "d.json")]
    assert main(args) == 1
    assert f"dropped, missing image: {tmp_path / 'val2014' / 'COCO_val2014_000000000074.jpg'}" in capsys.readouterr().out
    published = read_coco_karpathy(folder / "coco_karpathy_val.json")  # any of the three: its folder
    assert published.cocoids["val2014/COCO_val2014_000000000073.jpg"] == 73
    assert {r.image_id for r in published.rows} == set(C_SPLITS)
    # only the train captions: the val2014 images are named as not found in the files given
    assert main([*args, "--coco-captions", str(folder / "annotations" / "captions_train2014.json")]) == 2
    err = capsys.readouterr().err
    assert "coco_karpathy_train.json: entry 10: COCO_val2014_000000000073.jpg is in none of COCO's caption files" in err
    entries = json.loads((folder / "coco_karpathy_val.json").read_text())
    entries.append({"image": "val2014/COCO_val2014_000000000133.jpg", "caption": ["x"]})
    (folder / "coco_karpathy_val.json").write_text(json.dumps(entries))
    assert main(args) == 2
    assert ("coco_karpathy_test.json: entry 0: val2014/COCO_val2014_000000000133.jpg is already in the val "
            "split") in capsys.readouterr().err
    (folder / "coco_karpathy_val.json").write_text(json.dumps([{"image": "val2014/x.jpg", "caption": 3}]))
    assert main(args) == 2
    assert "coco_karpathy_val.json: entry 0 (val2014/x.jpg): 'caption' must be a string or a list of strings" in capsys.readouterr().err
    (folder / "coco_karpathy_val.json").unlink()
    assert main(args) == 2
    assert "coco_karpathy_val.json: not found (BLIP/LAVIS's coco_karpathy_val.json" in capsys.readouterr().err


def test_converted_files_train_a_few_steps(tmp_path: Path) -> None:
    """What the converters write is what `fit` reads (data.dataset: karpathy, image_root the
    folder holding train2014/ and val2014/ for COCO, the image folder for Flickr8k)."""
    from tests.test_config_runs import tiny_fit_args

    images = tmp_path / "f" / "Flicker8k_Dataset"
    tokens = flickr8k_text(tmp_path / "f", images)
    coco_files(tmp_path / "c", tmp_path / "c")
    made = {
        "flickr8k": (["--from", "flickr8k", str(tokens), "--image-root", str(images)], images),
        "coco": (["--from", "coco-karpathy", str(tmp_path / "c"), "--image-root", str(tmp_path / "c")], tmp_path / "c"),
    }
    for name, (convert, root) in made.items():
        split = tmp_path / f"dataset_{name}.json"
        assert main(["data", "convert", *convert, "--out", str(split)]) == 0
        args = tiny_fit_args(Path("configs/flickr8k.yaml"), {"model": {"encoder": {"name": "resnet101"}}},
                             "karpathy", tmp_path, tmp_path / name)
        at = args.index("--data.karpathy.split_file")
        args[at + 1: at + 4: 2] = [str(split), str(root)]
        assert main([*args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--data.min_count", "1"]) == 0, name
        assert list((tmp_path / name / "run").rglob("*.ckpt")), name
