"""Captions in French, German, Chinese and Japanese: convert -> fit a few steps -> caption, with
the tokenizer stored in the checkpoint and the caption written back as the language writes it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import regex
import torch
from PIL import Image

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.data.tokenizers import get_tokenizer
from captioner.inference import Caption, CaptionPipeline

CONFIG = Path(__file__).parent.parent / "configs" / "shapes.yaml"

# (tokenizer, two captions per colour): red images get the first pair, blue ones the second
LANGUAGES = {
    "fr": ("unicode", [["Un carré rouge l'été.", "Le carré rouge à gauche."],
                       ["Un cercle bleu l'été.", "Le cercle bleu à droite."]]),
    "de": ("unicode", [["Ein rotes Quadrat auf der Straße.", "Das rote Quadrat, groß."],
                       ["Ein blauer Kreis auf der Straße.", "Der blaue Kreis, groß."]]),
    "zh": ("char", [["一个红色的方块。", "红色方块在左边。"], ["一个蓝色的圆。", "蓝色圆在右边。"]]),
    "ja": ("char", [["赤い四角があります。", "左に赤い四角。"], ["青い丸があります。", "右に青い丸。"]]),
}
_CJK_PAIR = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}] [\p{Han}\p{Hiragana}\p{Katakana}]")


def _data(root: Path, captions: list[list[str]]) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    with open(root / "captions.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(10):
            Image.new("RGB", (32, 32), (220, 30, 30) if i % 2 == 0 else (30, 30, 220)).save(images / f"{i}.png")
            for c in captions[i % 2]:
                w.writerow([f"{i}.png", c])
    return images


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_convert_fit_caption(lang: str, tmp_path: Path, capsys) -> None:
    tokenizer, captions = LANGUAGES[lang]
    images = _data(tmp_path, captions)
    split_file = tmp_path / "dataset.json"
    assert main(["data", "convert", "--from", "csv", str(tmp_path / "captions.csv"), "--image-root",
                 str(images), "--out", str(split_file), "--tokenizer", tokenizer,
                 "--val-fraction", "0.2", "--test-fraction", "0"]) == 0
    tokens = json.loads(split_file.read_text())["images"][0]["sentences"][0]["tokens"]
    assert tokens == get_tokenizer(tokenizer).tokenize(captions[0][0])
    run = tmp_path / "run"
    torch.manual_seed(0)
    main(["fit", "--config", str(CONFIG), "--data.dataset", "karpathy",
          "--data.karpathy.split_file", str(split_file), "--data.karpathy.image_root", str(images),
          "--data.tokenizer", tokenizer, "--data.min_count", "1", "--data.num_workers", "0",
          "--data.batch_size", "4", "--data.eval_batch_size", "4",
          "--model.encoder.channels", "16", "--model.encoder.grid", "4", "--model.encoder.image_size", "32",
          "--model.decoder.embed_dim", "16", "--model.decoder.attention_dim", "16",
          "--model.decoder.decoder_dim", "16", "--model.optim.warmup_steps", "0", "--model.optim.lr", "0.02",
          "--trainer.max_steps", "40", "--trainer.max_epochs", "null", "--trainer.max_time", "null",
          "--trainer.num_sanity_val_steps", "0", "--model.loss.attention_supervision", "0",
          "--data.shapes.grounding", "false", "--data.shapes.ground_relations", "false",
          "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"])
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["captioner"]["tokenizer"] == tokenizer
    loaded = load_checkpoint(ckpt)
    assert loaded.tokenizer == tokenizer
    vocab = set(loaded.vocab.to_list())
    assert set(tokens) <= vocab  # the vocabulary holds the tokenizer's words ("l'été", "straße", "红")
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(ckpt), "--json", str(images / "0.png")]) == 0
    text = json.loads(capsys.readouterr().out.splitlines()[0])["caption"]
    assert text.strip(), "the model wrote no words"
    if tokenizer == "char":
        assert not _CJK_PAIR.search(text), text  # no space between two Chinese or Japanese characters
    else:
        assert " " in text, text


def test_caption_text_joins_with_the_checkpoints_tokenizer() -> None:
    alphas = torch.zeros(3, 1, 1)
    assert Caption(["一", "只", "狗"], 0.0, alphas, (1, 1), tokenizer="char").text == "一只狗"
    assert Caption(["a", "red", "dog"], 0.0, alphas, (1, 1)).text == "a red dog"


# -- the tokenizer travels with the data ----------------------------------------------------------
CUSTOM = Path(__file__).parent.parent / "configs" / "custom.yaml"
_NON_ASCII_LETTER = regex.compile(r"[\p{L}--\p{ASCII}]", regex.V1)


def _char_split_file(root: Path) -> tuple[Path, Path]:
    """A split file made by `data convert --tokenizer char` from Japanese captions."""
    from captioner.data.convert import Row, convert_rows

    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
        rows.append(Row(f"{i}.png", "茶色い犬が緑の芝生の上で赤いボールを追いかけて走っています。", None, "-"))
    data, _ = convert_rows(rows, images, tokenizer="char", val_fraction=0.2, test_fraction=0.2)
    (root / "dataset.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return root / "dataset.json", images


def test_the_split_files_tokenizer_is_used_when_data_tokenizer_is_unset(tmp_path: Path) -> None:
    from captioner.data.datamodule import CaptionDataModule

    split_file, images = _char_split_file(tmp_path)
    dm = CaptionDataModule(dataset="karpathy", karpathy={"split_file": str(split_file), "image_root": str(images)},
                           min_count=1)
    assert dm.tokenizer_name == "char" and dm.max_caption_length == 50
    (caption,) = dm.records["train"][0].captions
    assert caption == get_tokenizer("char").tokenize("茶色い犬が緑の芝生の上で赤いボールを追いかけて走っています")
    assert len(caption) == 29  # not cut at 20
    assert "-char-" in dm.vocab_path.name and "茶" in dm.vocab
    assert len(dm.dataset_for("train")[0]["caption"]) == 29 + 2  # <start> 29 characters <end>


def test_the_data_module_refuses_a_tokenizer_other_than_the_split_files(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from captioner.data.datamodule import CaptionDataModule
    from captioner.evaluation import evaluate_checkpoint

    split_file, images = _char_split_file(tmp_path)
    karpathy = {"split_file": str(split_file), "image_root": str(images)}
    dm = CaptionDataModule(dataset="karpathy", karpathy=karpathy, tokenizer="unicode")
    with pytest.raises(ValueError, match="data.tokenizer unicode differs from the tokenizer 'char'"):
        dm.tokenizer_name  # noqa: B018
    # a checkpoint trained with another tokenizer is not scored against these words
    simple_model = SimpleNamespace(loaded=SimpleNamespace(tokenizer="simple"))
    with pytest.raises(ValueError, match="the checkpoint's captions are split with the 'simple' tokenizer, "
                       "the data's with 'char'"):
        evaluate_checkpoint(simple_model, CaptionDataModule(dataset="karpathy", karpathy=karpathy))


def test_a_split_file_read_with_simple_warns_once_of_lost_letters(tmp_path: Path, caplog) -> None:
    from captioner.data.datamodule import CaptionDataModule

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    sentences = [{"raw": "un homme âgé", "tokens": ["un", "homme", "g"]}, {"raw": "die Straße"},
                 {"raw": "a dog", "tokens": ["a", "dog"]}]
    split_file = tmp_path / "dataset.json"  # no "tokenizer": Karpathy's format, read with simple
    split_file.write_text(json.dumps({"images": [{"filename": "0.png", "imgid": 0, "split": "train",
                                                  "sentences": sentences}]}))
    dm = CaptionDataModule(dataset="karpathy", karpathy={"split_file": str(split_file), "image_root": str(tmp_path)})
    with caplog.at_level("WARNING"):
        assert dm.records["train"][0].captions == [["un", "homme", "g"], ["die", "stra", "e"], ["a", "dog"]]
        dm.records  # noqa: B018 - read once
    (warning,) = [r.getMessage() for r in caplog.records if "dropped letters" in r.getMessage()]
    assert warning.startswith("the simple tokenizer dropped letters from 2 caption(s), e.g. 'un homme âgé' -> "
                              "'un homme g'; make the split file again with `captioner data convert`")


def test_a_data_tokenizer_that_differs_from_the_split_files_is_one_line(tmp_path: Path, capsys) -> None:
    split_file, images = _char_split_file(tmp_path)
    assert main(["fit", "--config", str(CUSTOM), "--data.karpathy.split_file", str(split_file),
                 "--data.karpathy.image_root", str(images), "--data.tokenizer", "simple",
                 "--model.encoder.name", "shapes_cnn", "--model.encoder.pretrained", "false",
                 "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line != "Seed set to 0"]  # Lightning's
    assert len(err) == 1 and err[0].startswith("captioner: error: "), err
    assert (f"data.tokenizer simple differs from the tokenizer 'char' that {split_file} was made with; "
            "leave data.tokenizer unset") in err[0]


def _french_german_csv(root: Path) -> tuple[Path, Path]:
    """What Excel writes on a French Windows: cp1252, ';' between fields, ',' inside captions."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = ["image;caption"]
    for i in range(10):
        Image.new("RGB", (32, 32), (220, 30, 30) if i % 2 == 0 else (30, 30, 220)).save(images / f"{i}.png")
        if i % 2 == 0:
            lines += [f"{i}.png;un homme âgé marche sur la plage, à côté de l'été",
                      f"{i}.png;un homme âgé marche sur la plage"]
        else:
            lines += [f"{i}.png;ein älterer Mann läuft über die Straße", f"{i}.png;ein Mann auf der Straße"]
    (root / "captions.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    return root / "captions.csv", images


def _japanese_folder(root: Path) -> Path:
    folder = root / "photos"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (32, 32), (220, 30, 30) if i % 2 == 0 else (30, 30, 220)).save(folder / f"{i}.png")
        text = "赤い車が道を走っています。\n赤い車があります。" if i % 2 == 0 else "青い鳥が空を飛んでいます。\n青い鳥がいます。"
        (folder / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("language", ["fr-de", "ja"])
def test_multilingual_end_to_end_with_the_shipped_config(language: str, tmp_path: Path, capsys) -> None:
    """Convert with the default flags, train a few steps with configs/custom.yaml as shipped (only
    the paths, a small offline encoder, the steps and min_count given), caption: the letters and
    the spacing of the language come back."""
    split_file = tmp_path / "dataset.json"
    if language == "ja":
        images = _japanese_folder(tmp_path)
        convert = ["--from", "folder", str(images)]
    else:
        table, images = _french_german_csv(tmp_path)
        convert = ["--from", "csv", str(table), "--image-root", str(images)]
    assert main(["data", "convert", *convert, "--out", str(split_file)]) == 0
    run = tmp_path / "run"
    assert main(["fit", "--config", str(CUSTOM), "--data.karpathy.split_file", str(split_file),
                 "--data.karpathy.image_root", str(images),
                 "--model.encoder.name", "shapes_cnn", "--model.encoder.pretrained", "false",
                 "--model.encoder.image_size", "32", "--model.encoder.grid", "4", "--model.encoder.channels", "16",
                 "--trainer.max_steps", "15", "--data.min_count", "1", "--data.num_workers", "0",
                 "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false"]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    assert loaded.tokenizer == "unicode"  # data convert's default, recorded in the split file
    # the config leaves the length limits to the tokenizer: 50 tokens, not 20 characters
    assert loaded.decoding["max_length"] is None and CaptionPipeline(loaded).max_length == 50
    vocab = set(loaded.vocab.to_list())
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(ckpt), "--json", str(images / "0.png"), str(images / "1.png")]) == 0
    texts = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert all(t.strip() for t in texts), texts
    if language == "ja":
        assert {"赤", "い", "車", "が", "鳥"} <= vocab
        assert all(regex.search(r"[\p{Hiragana}\p{Katakana}\p{Han}]", t) for t in texts), texts
        assert not any(" " in t for t in texts), texts  # no space between Japanese characters
    else:
        assert {"âgé", "à", "côté", "l'été", "älterer", "über", "straße"} <= vocab
        assert all(_NON_ASCII_LETTER.search(t) for t in texts), texts  # "âgé", "straße" came back whole
        for t in texts:
            assert " " in t and set(t.split()) <= vocab, texts  # words spaced, every one the vocabulary's
