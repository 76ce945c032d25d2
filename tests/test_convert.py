"""`captioner data convert`: CSV, TSV, JSON Lines, folders and COCO files -> a Karpathy split file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.data.convert import (
    ConvertError,
    Row,
    assign_splits,
    convert_rows,
    path_image_id,
    read_rows,
    table_dialect,
)
from captioner.data.karpathy import read_karpathy


def _images(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(root / f"{i}.png")


def test_csv_with_bom_quotes_missing_empty_and_duplicates(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "img", 5)
    (tmp_path / "c.csv").write_bytes(
        "image,caption\n0.png,\"A dog, running\nfast\"\n0.png,A cat\n0.png,A cat\n1.png,\" \"\n"
        "2.png,Un chien\n9.png,gone\n3.png,x\n4.png,y\n".encode("utf-8-sig"))
    out = tmp_path / "dataset.json"
    args = ["data", "convert", "--from", "csv", str(tmp_path / "c.csv"), "--image-root",
            str(tmp_path / "img"), "--out", str(out)]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "4 images, 5 captions" in text
    assert "missing image: " + str(tmp_path / "img" / "9.png") in text
    assert "empty caption: " in text and "(1.png)" in text
    assert "duplicate caption: " in text and "'A cat'" in text
    data = json.loads(out.read_text())
    first = data["images"][0]
    assert first["filename"] == "0.png"
    assert first["sentences"][0] == {"tokens": ["a", "dog", "running", "fast"], "raw": "A dog, running fast",
                                     "imgid": path_image_id("0.png"), "sentid": 0}
    records = read_karpathy(out, tmp_path / "img")
    assert sum(len(v) for v in records.values()) == 4
    assert main([*args, "--allow-missing"]) == 0
    assert main(["data", "check", "--karpathy-json", str(out), "--image-root", str(tmp_path / "img")]) == 0


def test_missing_column_names_the_columns_found(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.tsv").write_text("file\ttext\na.png\thello\n")
    assert main(["data", "convert", "--from", "tsv", str(tmp_path / "c.tsv"), "--image-root",
                 str(tmp_path), "--out", str(tmp_path / "d.json")]) == 2
    assert "no column 'image' or 'caption'; found 'file', 'text'" in capsys.readouterr().err
    rows = read_rows("tsv", tmp_path / "c.tsv", "file", "text")
    assert [(r.image, r.caption) for r in rows] == [("a.png", "hello")]
    (tmp_path / "bad.csv").write_bytes(b"image,caption\n\x81\xfe,x\n")  # neither UTF-8 nor cp1252
    with pytest.raises(ConvertError, match="cannot read as cp1252 .* --encoding"):
        read_rows("csv", tmp_path / "bad.csv")


def test_jsonl_folder_and_coco_inputs(tmp_path: Path) -> None:
    _images(tmp_path, 3)
    (tmp_path / "c.jsonl").write_text(
        '{"image": "0.png", "caption": "a red square"}\n'
        '{"image": "1.png", "captions": ["one", "two"], "split": "test"}\n')
    data, report = convert_rows(read_rows("jsonl", tmp_path / "c.jsonl"), tmp_path, val_fraction=0,
                                test_fraction=0)
    assert [e["split"] for e in data["images"]] == ["train", "test"]
    assert report.captions == 3 and not report.dropped
    (tmp_path / "0.txt").write_text("a red square\nA red box\n")
    (tmp_path / "1.txt").write_text("one\n")
    data, report = convert_rows(read_rows("folder", tmp_path), tmp_path)
    assert [e["filename"] for e in data["images"]] == ["0.png", "1.png"]
    assert report.empty_captions == [f"{tmp_path / '2.txt'} (not found) (2.png)"]
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "2.png"}],
        "annotations": [{"id": 1, "image_id": 7, "caption": "A dot."}]}))
    data, _ = convert_rows(read_rows("coco", tmp_path / "coco.json"), tmp_path)
    assert data["images"][0]["sentences"][0]["tokens"] == ["a", "dot"]
    assert data["images"][0]["imgid"] == 7  # COCO's own id


def test_splits_are_deterministic_by_image_whatever_the_order() -> None:
    images = [f"{i}.jpg" for i in range(100)]
    a = assign_splits(images, {}, 0.1, 0.2, seed=3)
    b = assign_splits(images[::-1], {}, 0.1, 0.2, seed=3)
    assert a == b
    assert sorted(a.values()).count("val") == 10 and sorted(a.values()).count("test") == 20
    assert assign_splits(images, {}, 0.1, 0.2, seed=4) != a
    assert assign_splits(["x", "y"], {"x": "val"}, 0, 0, seed=0) == {"x": "val", "y": "train"}


def test_tokenizer_decides_the_tokens(tmp_path: Path) -> None:
    _images(tmp_path, 1)
    rows = read_rows("jsonl", _write(tmp_path / "c.jsonl", {"image": "0.png", "captions": ["L'été à Paris", "一只狗。"]}))
    data, _ = convert_rows(rows, tmp_path, tokenizer="unicode")
    assert [s["tokens"] for s in data["images"][0]["sentences"]] == [["l'été", "à", "paris"], ["一", "只", "狗"]]


def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _convert(tmp_path: Path, *args: str) -> list[str]:
    return ["data", "convert", *args, "--out", str(tmp_path / "dataset.json")]


def test_default_tokenizer_keeps_every_letter(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "img", 2)
    (tmp_path / "c.csv").write_text("image,caption\n0.png,un homme âgé marche sur la plage\n"
                                    "1.png,Ein Hund auf der Straße\n", encoding="utf-8")
    assert main(_convert(tmp_path, "--from", "csv", str(tmp_path / "c.csv"), "--image-root",
                         str(tmp_path / "img"), "--json")) == 0
    data = json.loads((tmp_path / "dataset.json").read_text())
    tokens = {e["filename"]: e["sentences"][0]["tokens"] for e in data["images"]}
    assert tokens == {"0.png": ["un", "homme", "âgé", "marche", "sur", "la", "plage"],
                      "1.png": ["ein", "hund", "auf", "der", "straße"]}
    assert data["tokenizer"] == "unicode"
    report = json.loads(capsys.readouterr().out)
    assert report["scripts"] == {"Latin": 2} and report["lost_letters"] == 0 and not report["warnings"]


def test_japanese_txt_folder_converts_with_the_default_flags(tmp_path: Path, capsys) -> None:
    _images(tmp_path, 3)
    for i, text in enumerate(["赤い四角があります。", "左に青い丸。\n犬が走っている。", "一只狗在草地上。"]):
        (tmp_path / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    assert main(_convert(tmp_path, "--from", "folder", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "4 captions" in out and "dropped" not in out
    assert "captions by script: Hiragana/Katakana 2, Han 2" in out
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert data["images"][0]["sentences"][0]["tokens"] == list("赤い四角があります")


def test_simple_warns_once_with_a_count_and_an_example(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "img", 3)
    (tmp_path / "c.csv").write_text("image,caption\n0.png,un homme âgé marche sur la plage\n"
                                    "1.png,Die Straße\n2.png,a dog\n2.png,犬\n", encoding="utf-8")
    args = _convert(tmp_path, "--from", "csv", str(tmp_path / "c.csv"), "--image-root", str(tmp_path / "img"),
                    "--tokenizer", "simple")
    assert main([*args, "--allow-missing"]) == 0  # the Japanese caption is empty for simple, dropped
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "dropped letters" in line]
    assert lines == ["the simple tokenizer dropped letters from 3 caption(s), e.g. 'un homme âgé marche "
                     "sur la plage' -> 'un homme g marche sur la plage'; --tokenizer unicode (any alphabet, "
                     "the default) or char (Chinese, Japanese) keeps them"], err


def test_cp1252_csv_with_semicolons_converts_with_the_default_flags(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "img", 2)
    text = ("image;caption\n0.png;un homme âgé, sur la plage\n1.png;\"Die Straße; nass\"\n"
            "1.png;ein Hund läuft\n")
    (tmp_path / "c.csv").write_bytes(text.encode("cp1252"))  # what Excel writes on a French Windows
    assert main(_convert(tmp_path, "--from", "csv", str(tmp_path / "c.csv"), "--image-root",
                         str(tmp_path / "img"))) == 0
    out = capsys.readouterr().out
    assert "read as cp1252 (not UTF-8; --encoding sets it), delimiter ';'" in out
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert [[s["raw"] for s in e["sentences"]] for e in data["images"]] == [
        ["un homme âgé, sur la plage"], ["Die Straße; nass", "ein Hund läuft"]]
    # given by hand, the same; a wrong encoding is one line
    assert main(_convert(tmp_path, "--from", "csv", str(tmp_path / "c.csv"), "--image-root",
                         str(tmp_path / "img"), "--encoding", "cp1252", "--delimiter", ";")) == 0
    assert json.loads((tmp_path / "dataset.json").read_text()) == data
    assert main(_convert(tmp_path, "--from", "csv", str(tmp_path / "c.csv"), "--image-root",
                         str(tmp_path / "img"), "--encoding", "utf-8")) == 2
    assert "cannot read as utf-8" in capsys.readouterr().err


def test_utf16_tab_table_is_sniffed(tmp_path: Path) -> None:
    _images(tmp_path, 1)
    (tmp_path / "c.csv").write_bytes("image\tcaption\n0.png\tL'été, à Paris\n".encode("utf-16"))
    rows = read_rows("csv", tmp_path / "c.csv")
    assert [(r.image, r.caption) for r in rows] == [("0.png", "L'été, à Paris")]
    assert table_dialect(tmp_path / "c.csv") == ("utf-16", "\t")


def test_image_ids_survive_editing_and_reordering_the_table(tmp_path: Path) -> None:
    _images(tmp_path / "img", 4)
    lines = [f"{i}.png,caption number {i}" for i in range(4)]
    (tmp_path / "a.csv").write_text("image,caption\n" + "\n".join(lines) + "\n")
    (tmp_path / "b.csv").write_text("image,caption\n" + "\n".join(lines[:0:-1]) + "\n")  # reversed, 0.png gone
    ids = []
    for name in ("a.csv", "b.csv"):
        data, _ = convert_rows(read_rows("csv", tmp_path / name), tmp_path / "img")
        ids.append({e["filename"]: e["imgid"] for e in data["images"]})
        assert all(s["imgid"] == e["imgid"] for e in data["images"] for s in e["sentences"])
    assert ids[1] == {k: v for k, v in ids[0].items() if k != "0.png"}
    assert len(set(ids[0].values())) == 4 and all(0 <= v < 2**48 for v in ids[0].values())
    # a reader's own ids (COCO's) win; two images with one id are an error naming both
    data, _ = convert_rows([Row("0.png", "a", None, "x", image_id=7)], tmp_path / "img")
    assert data["images"][0]["imgid"] == 7
    with pytest.raises(ConvertError, match="images '0.png' and '1.png' get the same id 7"):
        convert_rows([Row("0.png", "a", None, "x", image_id=7), Row("1.png", "b", None, "y", image_id=7)],
                     tmp_path / "img")


def test_image_suffixes_are_the_image_modules_one_constant() -> None:
    """The folder reader takes the suffixes `caption` takes (captioner.data.images); the old
    convert.IMAGE_SUFFIXES stays one release, warning."""
    from captioner.data import convert
    from captioner.data.images import IMAGE_EXTENSIONS

    with pytest.warns(DeprecationWarning, match="IMAGE_EXTENSIONS"):
        assert convert.IMAGE_SUFFIXES is IMAGE_EXTENSIONS
    with pytest.raises(AttributeError):
        convert.NO_SUCH_NAME  # noqa: B018
