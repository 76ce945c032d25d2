"""`data check`: counts, vocabulary size and every broken file reported by path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import images
from captioner.data.check import CheckReport, check_dataset, run_data_check
from captioner.data.records import ImageRecord
from captioner.data.vocab import Vocabulary

CAPTIONS = ["a red square", "a red circle", "a blue square", "a small red square", "a big blue circle"]


def _entry(name: str, imgid: int, split: str, sentences: list[str] | None = None) -> dict:
    sentences = CAPTIONS if sentences is None else sentences
    return {"filename": name, "imgid": imgid, "split": split,
            "sentences": [{"raw": s, "sentid": imgid * 10 + j} for j, s in enumerate(sentences)]}


def make_dataset(root: Path) -> tuple[Path, dict[str, Path]]:
    """A Flickr-style Karpathy file over good images and one of each kind of broken file."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    for name in ["good1.png", "good2.jpg", "good3.png", "good4.png", "nocap.png", "emptycap.png"]:
        Image.new("RGB", (16, 12), "red").save(img_dir / name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    bad = {
        "truncated": img_dir / "truncated.jpg",
        "zero": img_dir / "zero.jpg",
        "text": img_dir / "text.jpg",
        "missing": img_dir / "missing.jpg",
        "nocap": img_dir / "nocap.png",
        "emptycap": img_dir / "emptycap.png",
    }
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("hello")
    entries = [
        _entry("good1.png", 0, "train"),
        _entry("good2.jpg", 1, "train"),
        _entry("truncated.jpg", 2, "train"),
        _entry("good3.png", 3, "val"),
        _entry("zero.jpg", 4, "val"),
        _entry("good4.png", 5, "test"),
        _entry("text.jpg", 6, "test"),
        _entry("missing.jpg", 7, "restval"),
        _entry("nocap.png", 8, "test", sentences=[]),
        _entry("emptycap.png", 9, "test", sentences=["a dog", "!!!"]),
    ]
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "test"}))
    return path, bad


def test_run_data_check_counts_vocab_and_problems(tmp_path):
    path, bad = make_dataset(tmp_path)
    report = run_data_check(karpathy_json=path, image_root=tmp_path / "images", min_count=3)
    assert report.splits == {
        "train": {"images": 4, "captions": 20},  # restval folded in
        "val": {"images": 2, "captions": 10},
        "test": {"images": 4, "captions": 12},
    }
    # train words: a(4x5=20+) red(12) square(12) blue(8) circle(8) small(4) big(4) -> all >= 3
    assert report.vocab_size == 4 + 7
    by_path = {p["path"]: p["error"] for p in report.problems}
    assert set(by_path) == {str(p) for p in bad.values()}
    assert "truncated image" in by_path[str(bad["truncated"])]
    assert by_path[str(bad["zero"])] == "zero-byte file"
    assert "not an image" in by_path[str(bad["text"])]
    assert by_path[str(bad["missing"])] == "file not found"
    assert "no captions" in by_path[str(bad["nocap"])]
    assert "empty caption" in by_path[str(bad["emptycap"])] and "index 1" in by_path[str(bad["emptycap"])]
    assert not report.ok


def test_vocab_size_matches_vocabulary_build(tmp_path):
    path, _ = make_dataset(tmp_path)
    for min_count in (1, 5, 9, 100):
        report = run_data_check(karpathy_json=path, min_count=min_count, verify_images=False)
        train = [c for _ in range(4) for c in CAPTIONS]
        expected = len(Vocabulary.build([s.split() for s in train], min_count=min_count))
        assert report.vocab_size == expected


def test_image_root_defaults_to_json_folder(tmp_path):
    path, _ = make_dataset(tmp_path)
    entries = json.loads(path.read_text())["images"]
    for e in entries:
        e["filename"] = "images/" + e["filename"]
    path.write_text(json.dumps({"images": entries}))
    report = run_data_check(karpathy_json=path)
    assert len(report.problems) == 6


def test_restval_kept_apart(tmp_path):
    path, _ = make_dataset(tmp_path)
    report = run_data_check(karpathy_json=path, restval_to_train=False, verify_images=False)
    assert report.splits["train"] == {"images": 3, "captions": 15}
    assert report.splits["restval"] == {"images": 1, "captions": 5}


def test_json_shape(tmp_path):
    path, _ = make_dataset(tmp_path)
    out = run_data_check(karpathy_json=path, image_root=tmp_path / "images").to_json()
    assert list(out) == ["splits", "vocab_size", "problems"]
    assert json.loads(json.dumps(out)) == out
    assert all(set(c) == {"images", "captions"} for c in out["splits"].values())
    assert all(set(p) == {"path", "error"} and isinstance(p["path"], str) for p in out["problems"])


def test_format_text_lists_splits_and_problems(tmp_path):
    path, bad = make_dataset(tmp_path)
    text = run_data_check(karpathy_json=path, image_root=tmp_path / "images").format_text()
    for word in ("train", "val", "test", "total", "vocabulary size", "6 problems"):
        assert word in text
    for p in bad.values():
        assert str(p) in text
    clean = CheckReport(splits={"train": {"images": 1, "captions": 5}}, vocab_size=4)
    assert "no problems found" in clean.format_text() and clean.ok


def test_without_verification_only_missing_files(tmp_path):
    path, bad = make_dataset(tmp_path)
    report = run_data_check(karpathy_json=path, image_root=tmp_path / "images", verify_images=False)
    assert {p["path"] for p in report.problems} == {str(bad[k]) for k in ("missing", "nocap", "emptycap")}


def test_deterministic_order_whatever_the_workers(tmp_path):
    path, _ = make_dataset(tmp_path)
    from captioner.data.karpathy import read_karpathy

    recs = read_karpathy(path, tmp_path / "images")
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    one = check_dataset(recs, workers=1).to_json()
    many = check_dataset(recs, workers=8).to_json()
    assert one == many
    # the threads leave PIL's limit and the warning filters as they found them
    assert warnings.filters == filters and limit == Image.MAX_IMAGE_PIXELS
    # problems follow split order, then file order
    names = [Path(p["path"]).name for p in one["problems"]]
    assert names == ["truncated.jpg", "missing.jpg", "zero.jpg", "text.jpg", "nocap.png", "emptycap.png"]


def test_duplicate_paths_and_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    caps = [["a", "dog"]]
    recs = {
        "train": [ImageRecord(1, tmp_path / "ok.png", "train", caps),
                  ImageRecord(2, tmp_path / "big.png", "train", caps)],
        "val": [ImageRecord(3, tmp_path / "ok.png", "val", caps)],
    }
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    report = check_dataset(recs, min_count=1)
    assert report.vocab_size == 6
    assert report.problems == [
        {"path": str(tmp_path / "big.png"), "error": "decompression bomb: 900 pixels > 100"},
        {"path": str(tmp_path / "ok.png"), "error": "duplicate image path (also in split 'train' as image 1)"},
    ]


def test_reader_errors_become_problems(tmp_path):
    broken = tmp_path / "dataset.json"
    broken.write_text(json.dumps({"images": [{"imgid": 0, "split": "train"}]}))
    report = run_data_check(karpathy_json=broken)
    assert report.problems == [{"path": str(broken), "error": "images[0]: missing or empty 'filename'"}]
    assert report.splits == {"train": {"images": 0, "captions": 0}, "val": {"images": 0, "captions": 0},
                             "test": {"images": 0, "captions": 0}}
    assert report.vocab_size == 4

    missing = tmp_path / "nope.json"
    report = run_data_check(karpathy_json=missing)
    assert report.problems == [{"path": str(missing), "error": "file not found"}]
    report = run_data_check(coco_annotations=missing)
    assert report.problems == [{"path": str(missing), "error": "file not found"}]


def test_coco_annotations_checked(tmp_path):
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val2014" / "a.jpg")
    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "A dog."},
                        {"id": 2, "image_id": 2, "caption": "A cat."}],
    }))
    report = run_data_check(coco_annotations=ann, image_root=tmp_path / "val2014", min_count=1)
    assert report.splits["val"] == {"images": 2, "captions": 2}  # split taken from the file name
    assert report.vocab_size == 4  # no training split
    assert report.problems == [{"path": str(tmp_path / "val2014" / "b.jpg"), "error": "file not found"}]


def test_needs_an_input():
    with pytest.raises(ValueError):
        run_data_check()


def test_the_command_names_each_problem_and_exits_1(tmp_path, capsys):
    """docs/data.md: `data check` prints "every problem ... by path; exit code 1 when there is any"."""
    from captioner.cli import main

    path, bad = make_dataset(tmp_path)
    args = ["data", "check", "--karpathy-json", str(path), "--image-root", str(tmp_path / "images")]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert all(str(p) in out for p in bad.values()), out
    assert main([*args, "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert {p["path"] for p in problems} == {str(p) for p in bad.values()}
