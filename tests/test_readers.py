"""Karpathy split files (COCO and Flickr flavours) and official COCO caption files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.data.coco import coco_references, read_coco_annotations
from captioner.data.karpathy import read_karpathy
from captioner.data.vocab import tokenize


def _sent(raw: str, sentid: int, tokens: list[str] | None = None) -> dict:
    s = {"raw": raw, "sentid": sentid, "imgid": 0}
    if tokens is not None:
        s["tokens"] = tokens
    return s


def karpathy_coco(tmp_path: Path) -> Path:
    images = [
        {"filepath": "train2014", "filename": "COCO_train2014_1.jpg", "imgid": 0, "cocoid": 101,
         "split": "train", "sentids": [0, 1],
         "sentences": [_sent("A dog runs.", 0, ["a", "dog", "runs"]), _sent("A dog.", 1, ["a", "dog"])]},
        {"filepath": "val2014", "filename": "COCO_val2014_2.jpg", "imgid": 1, "cocoid": 202,
         "split": "restval", "sentids": [2], "sentences": [_sent("A cat sits.", 2, ["a", "cat", "sits"])]},
        {"filepath": "val2014", "filename": "COCO_val2014_3.jpg", "imgid": 2, "cocoid": 303,
         "split": "val", "sentids": [3], "sentences": [_sent("Two birds.", 3, ["two", "birds"])]},
        {"filepath": "val2014", "filename": "COCO_val2014_4.jpg", "imgid": 3, "cocoid": 404,
         "split": "test", "sentids": [4], "sentences": [_sent("A red bus.", 4, ["a", "red", "bus"])]},
        {"filepath": "val2014", "filename": "COCO_val2014_5.jpg", "imgid": 4, "cocoid": 505,
         "split": "restval", "sentids": [5], "sentences": [_sent("A boat.", 5, ["a", "boat"])]},
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def karpathy_flickr(tmp_path: Path) -> Path:
    images = [
        {"filename": "1000.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": [_sent("A child in a PINK dress, climbing stairs.", 0),  # no tokens: tokenised here
                       _sent("A girl's dog.", 1, [])]},
        {"filename": "1001.jpg", "imgid": 1, "split": "test", "sentids": [2],
         "sentences": [_sent("ignored raw", 2, ["keep", "these", "tokens"])]},
        {"filename": "1002.jpg", "imgid": 2, "split": "val", "sentids": [], "sentences": []},
    ]
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


# ---------------------------------------------------------------------------- Karpathy


def test_karpathy_coco_restval_folded_into_train(tmp_path):
    splits = read_karpathy(karpathy_coco(tmp_path), tmp_path / "coco")
    assert set(splits) == {"train", "val", "test"}
    assert [r.image_id for r in splits["train"]] == [101, 202, 505]  # file order kept
    assert [r.image_id for r in splits["val"]] == [303]
    assert [r.image_id for r in splits["test"]] == [404]
    assert all(r.split == "train" for r in splits["train"])
    first = splits["train"][0]
    assert first.path == tmp_path / "coco" / "train2014" / "COCO_train2014_1.jpg"
    assert first.filename == "COCO_train2014_1.jpg"
    assert first.captions == [["a", "dog", "runs"], ["a", "dog"]]
    assert first.raw == ["A dog runs.", "A dog."]
    assert first.sentids == [0, 1]
    assert splits["test"][0].path == tmp_path / "coco" / "val2014" / "COCO_val2014_4.jpg"


def test_karpathy_coco_restval_kept_apart(tmp_path):
    splits = read_karpathy(karpathy_coco(tmp_path), tmp_path, restval_to_train=False)
    assert set(splits) == {"train", "val", "test", "restval"}
    assert [r.image_id for r in splits["train"]] == [101]
    assert [r.image_id for r in splits["restval"]] == [202, 505]
    assert all(r.split == "restval" for r in splits["restval"])


def test_karpathy_flickr(tmp_path):
    splits = read_karpathy(karpathy_flickr(tmp_path), str(tmp_path / "Flicker8k_Dataset"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1, "val": 1, "test": 1}
    rec = splits["train"][0]
    assert rec.image_id == 0  # no cocoid: imgid
    assert rec.path == tmp_path / "Flicker8k_Dataset" / "1000.jpg"
    # missing tokens and empty tokens both fall back to tokenising the raw text
    assert rec.captions == [tokenize("A child in a PINK dress, climbing stairs."), tokenize("A girl's dog.")]
    assert rec.captions[0] == ["a", "child", "in", "a", "pink", "dress", "climbing", "stairs"]
    assert splits["test"][0].captions == [["keep", "these", "tokens"]]
    assert splits["val"][0].captions == [] and splits["val"][0].image_id == 2


def test_karpathy_sentids_from_entry_when_sentences_lack_them(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "imgid": 7, "split": "train", "sentids": [40, 41],
         "sentences": [{"raw": "one"}, {"raw": "two"}]},
    ]}))
    rec = read_karpathy(path, tmp_path)["train"][0]
    assert rec.sentids == [40, 41] and rec.raw == ["one", "two"]


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "broken.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _img(**over) -> dict:
    base = {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [{"tokens": ["a"], "raw": "a"}]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("data,field", [
    ("{not json", "not valid JSON"),
    ([1, 2], "'images'"),
    ({"dataset": "coco"}, "'images'"),
    ({"images": {"a": 1}}, "'images'"),
    ({"images": ["a.jpg"]}, r"images\[0\]: expected an object"),
    ({"images": [_img(), _img(filename=None)]}, r"images\[1\]: missing or empty 'filename'"),
    ({"images": [_img(split="holdout")]}, r"images\[0\] \(a.jpg\): 'split'"),
    ({"images": [_img(split=None)]}, "'split'"),
    ({"images": [_img(imgid=None)]}, "'cocoid' or 'imgid'"),
    ({"images": [_img(imgid="7")]}, "'cocoid' or 'imgid'"),
    ({"images": [_img(sentences="a dog")]}, "'sentences' must be a list"),
    ({"images": [_img(sentences=[{"sentid": 1}])]}, r"sentences\[0\]: needs 'tokens' or 'raw'"),
    ({"images": [_img(sentences=[{"tokens": "a dog"}])]}, "'tokens' must be a list of strings"),
    ({"images": [_img(filepath=3)]}, "'filepath' must be a string"),
])
def test_karpathy_malformed(tmp_path, data, field):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=field) as info:
        read_karpathy(path, tmp_path)
    assert str(path) in str(info.value)


def test_karpathy_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_karpathy(tmp_path / "nope.json", tmp_path)


# ---------------------------------------------------------------------------- COCO


def coco_captions(tmp_path: Path) -> Path:
    data = {
        "info": {}, "licenses": [],
        "images": [
            {"id": 9, "file_name": "COCO_val2014_9.jpg", "width": 64, "height": 48},
            {"id": 3, "file_name": "COCO_val2014_3.jpg", "width": 64, "height": 48},
            {"id": 5, "file_name": "COCO_val2014_5.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 31, "image_id": 3, "caption": "A Man riding a wave on top of a surfboard.\n"},
            {"id": 12, "image_id": 9, "caption": "Two dogs, playing."},
            {"id": 30, "image_id": 3, "caption": " A surfer on a big wave. "},
        ],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path


def test_read_coco_annotations(tmp_path, capsys):
    recs = read_coco_annotations(coco_captions(tmp_path), tmp_path / "val2014", split="val")
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are silenced
    assert [r.image_id for r in recs] == [3, 5, 9]
    first = recs[0]
    assert first.split == "val"
    assert first.path == tmp_path / "val2014" / "COCO_val2014_3.jpg"
    assert first.filename == "COCO_val2014_3.jpg"
    assert first.sentids == [30, 31]  # annotation-id order
    assert first.raw == ["A surfer on a big wave.", "A Man riding a wave on top of a surfboard."]
    assert first.captions[1] == ["a", "man", "riding", "a", "wave", "on", "top", "of", "a", "surfboard"]
    assert recs[1].captions == []  # an image without captions is kept, for `data check`
    assert recs[2].captions == [["two", "dogs", "playing"]]


def test_read_coco_default_split_is_train(tmp_path):
    assert {r.split for r in read_coco_annotations(coco_captions(tmp_path), tmp_path)} == {"train"}


def test_coco_references(tmp_path, capsys):
    refs = coco_references(coco_captions(tmp_path))
    assert capsys.readouterr().out == ""
    assert refs == {
        3: ["A surfer on a big wave.", "A Man riding a wave on top of a surfboard."],
        9: ["Two dogs, playing."],
    }


@pytest.mark.parametrize("data,match", [
    ("{oops", "not valid JSON"),
    ([], "COCO annotation object"),
    ({"annotations": []}, "'images'"),
    ({"images": [{"file_name": "a.jpg"}], "annotations": []}, "missing or bad field"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}, "no 'caption'"),
])
def test_coco_malformed(tmp_path, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=match) as info:
        read_coco_annotations(path, tmp_path)
    assert str(path) in str(info.value)


def test_coco_image_without_file_name(tmp_path):
    path = _write(tmp_path, {"images": [{"id": 4}], "annotations": []})
    with pytest.raises(ValueError, match="image 4 has no 'file_name'"):
        read_coco_annotations(path, tmp_path)


def test_coco_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_references(tmp_path / "nope.json")
