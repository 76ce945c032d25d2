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

from captioner.cli import main
from captioner.data.tokenizers import get_tokenizer
from captioner.inference import Caption, load_checkpoint

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
