"""The DataModule: batches, padding, caption sampling, vocabulary, bad images."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from captioner.data.datamodule import CaptionDataModule, collate_captions
from captioner.data.images import ImageLoadError
from captioner.data.sources import ShapesSource
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary

PRE = Preprocessing(32, [0.5] * 3, [0.5] * 3)


def _dm(shapes_dir, tmp_path, **kw) -> CaptionDataModule:
    kw.setdefault("vocab_path", str(tmp_path / "vocab.json"))
    dm = CaptionDataModule(shapes=ShapesSource(data_dir=str(shapes_dir)), num_workers=0, batch_size=8,
                           min_count=1, preprocessing=PRE, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_are_padded_with_lengths(shapes_dir, tmp_path) -> None:
    dm = _dm(shapes_dir, tmp_path)
    batch = next(iter(dm.train_dataloader()))
    b, length = batch["captions"].shape
    assert batch["images"].shape == (b, 3, 32, 32) and b == 8
    assert batch["lengths"].max() == length
    for cap, n in zip(batch["captions"], batch["lengths"]):
        assert cap[0] == START_ID and cap[n - 1] == END_ID
        assert (cap[n:] == PAD_ID).all() and (cap[1 : n - 1] > END_ID).all()


def test_vocab_from_training_split_only_and_cached(shapes_dir, tmp_path) -> None:
    dm = _dm(shapes_dir, tmp_path)
    train_words = {w for r in dm.split_records("train") for c in r.captions for w in c}
    assert set(dm.vocab.itos[4:]) == train_words
    assert Vocabulary.load(tmp_path / "vocab.json") == dm.vocab


def test_random_reference_is_deterministic_and_changes_per_epoch(shapes_dir, tmp_path) -> None:
    def epoch_captions(epoch: int) -> list[list[int]]:
        dm = _dm(shapes_dir, tmp_path)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return sorted(c.tolist() for batch in loader for c in batch["captions"])

    assert epoch_captions(0) == epoch_captions(0)
    assert epoch_captions(0) != epoch_captions(1)


def test_all_captions_mode_and_evaluation_items(shapes_dir, tmp_path) -> None:
    dm = _dm(shapes_dir, tmp_path, captions_per_image="all")
    n_train = len(dm.split_records("train"))
    assert len(dm.dataset_for("train")) == 5 * n_train
    val = dm.dataset_for("val")
    assert len(val) == len(dm.split_records("val"))  # one item per image for evaluation
    refs = dm.references("val")
    assert all(len(r) == 5 for r in refs.values())


def test_limits(shapes_dir, tmp_path) -> None:
    dm = _dm(shapes_dir, tmp_path, limit_train=5, limit_eval=3)
    assert len(dm.dataset_for("train")) == 5 and len(dm.dataset_for("test")) == 3


def _broken_karpathy(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (20, 20), "red").save(root / "good.png")
    (root / "bad.png").write_bytes(b"")
    images = [
        {"filename": name, "imgid": i, "split": "train", "sentences": [{"tokens": ["a", "red", "box"], "raw": "A red box."}]}
        for i, name in enumerate(["good.png", "bad.png", "good.png"])
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return path, root


def test_bad_image_stops_with_its_name_or_is_skipped(tmp_path, caplog) -> None:
    path, root = _broken_karpathy(tmp_path)
    kw = {"dataset": "karpathy", "karpathy": {"split_file": str(path), "image_root": str(root)},
          "min_count": 1, "preprocessing": PRE, "num_workers": 0, "batch_size": 3}
    dm = CaptionDataModule(**kw)
    dm.setup()
    with pytest.raises(ImageLoadError, match=r"bad\.png.*zero-byte.*data check"):
        next(iter(dm.train_dataloader()))
    dm = CaptionDataModule(skip_bad_images=True, **kw)
    dm.setup()
    with caplog.at_level(logging.WARNING, logger="captioner.data.datamodule"):
        batch = next(iter(dm.train_dataloader()))
    assert batch["captions"].shape[0] == 2  # the rest of the batch is kept
    # docs/training.md: data.skip_bad_images skips "with a warning" that names the file
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1 and "bad.png" in skipped[0] and "zero-byte" in skipped[0], skipped
    assert collate_captions([None, None]) == {}


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="data.dataset must be one of coco, karpathy, shapes, got 'imagenet'"):
        CaptionDataModule(dataset="imagenet")
    with pytest.raises(ValueError, match="captions_per_image"):
        CaptionDataModule(captions_per_image="some")


def test_missing_shapes_data_is_generated(tmp_path) -> None:
    dm = CaptionDataModule(shapes={"data_dir": str(tmp_path / "gen"), "num_images": 30, "image_size": 32},
                           min_count=1, preprocessing=PRE, num_workers=0)
    assert len(dm.vocab) > 4  # property access prepares the data
    assert (tmp_path / "gen" / "dataset.json").is_file()
    assert torch.is_tensor(dm.dataset_for("train")[(0, 0)]["image"])


# -- the vocabulary cache proves what it was made from (issue 29) ------------------------------------
def _split_file(path, words: list[str]) -> None:
    """A Karpathy split file of two training images (each captioned with ``words``), one val."""
    images = [{"filename": f"{i}.png", "imgid": i, "split": "train" if i < 2 else "val",
               "sentences": [{"tokens": words, "raw": " ".join(words)}]} for i in range(3)]
    path.write_text(json.dumps({"images": images}))


def _karpathy_dm(split_file, **kw) -> CaptionDataModule:
    kw.setdefault("min_count", 1)
    return CaptionDataModule(dataset="karpathy", karpathy={"split_file": str(split_file),
                             "image_root": str(split_file.parent)}, preprocessing=PRE, **kw)


def test_two_split_files_in_one_folder_get_a_vocabulary_each(tmp_path) -> None:
    _split_file(tmp_path / "dataset_flickr8k.json", ["a", "dog", "runs"])
    _split_file(tmp_path / "dataset_flickr30k.json", ["una", "bicicleta", "roja"])
    eight, thirty = _karpathy_dm(tmp_path / "dataset_flickr8k.json"), _karpathy_dm(tmp_path / "dataset_flickr30k.json")
    assert eight.vocab.itos[4:] == ["a", "dog", "runs"]
    assert thirty.vocab.itos[4:] == ["bicicleta", "roja", "una"]
    assert eight.vocab_path != thirty.vocab_path and eight.vocab_path.parent == thirty.vocab_path.parent
    assert thirty.vocab_path.name.startswith("vocab-dataset_flickr30k-min1-")
    made = Vocabulary.load(thirty.vocab_path).made_from
    assert made["file"] == "dataset_flickr30k.json" and made["min_count"] == 1 and made["tokenizer"] == "simple"


def test_an_edited_split_file_gets_a_new_vocabulary(tmp_path) -> None:
    split_file = tmp_path / "dataset.json"
    _split_file(split_file, ["a", "dog", "runs"])
    assert _karpathy_dm(split_file).vocab.itos[4:] == ["a", "dog", "runs"]
    _split_file(split_file, ["a", "cat", "sleeps"])  # converted again from an edited CSV
    assert _karpathy_dm(split_file).vocab.itos[4:] == ["a", "cat", "sleeps"]


def test_a_default_cache_made_from_something_else_is_rebuilt(tmp_path, caplog) -> None:
    split_file = tmp_path / "dataset.json"
    _split_file(split_file, ["a", "dog", "runs"])
    dm = _karpathy_dm(split_file)
    path = dm.vocab_path
    Vocabulary([*Vocabulary.build([]).itos, "stale"], {**dm.vocab_made_from, "min_count": 7}).save(path)
    assert _karpathy_dm(split_file).vocab.itos[4:] == ["a", "dog", "runs"]
    assert "min count 7 vs 1" in caplog.text and "rebuilding it" in caplog.text
    assert Vocabulary.load(path).made_from == dm.vocab_made_from


@pytest.mark.parametrize(("change", "expected"), [
    ({"min_count": 2}, "min count 1 vs 2"),
    ({"tokenizer": "unicode"}, "tokenizer simple vs unicode"),
    ({"max_vocab": 5}, "max vocab null vs 5"),
    ({"split": "dataset_b.json"}, "file dataset_a.json vs dataset_b.json"),
])
def test_a_given_vocab_path_made_from_something_else_is_refused(tmp_path, change, expected) -> None:
    vocab = tmp_path / "vocab.json"
    _split_file(tmp_path / "dataset_a.json", ["a", "dog", "runs"])
    _split_file(tmp_path / "dataset_b.json", ["a", "dog", "runs"])
    _karpathy_dm(tmp_path / "dataset_a.json", vocab_path=str(vocab)).prepare_data()
    before = vocab.read_bytes()
    split = change.pop("split", "dataset_a.json")
    dm = _karpathy_dm(tmp_path / split, vocab_path=str(vocab), **change)
    with pytest.raises(ValueError, match=rf"data.vocab_path {vocab}: the vocabulary there was made from other data "
                       rf"or settings \(the file's vs this config's: .*{expected}"):
        dm.vocab  # noqa: B018
    assert vocab.read_bytes() == before  # the user's file is left alone


def test_a_vocab_file_of_an_earlier_release_is_used_with_a_warning(tmp_path, caplog) -> None:
    split_file = tmp_path / "dataset.json"
    _split_file(split_file, ["a", "dog", "runs"])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "dog"]}))
    dm = _karpathy_dm(split_file, vocab_path=str(vocab))
    dm.prepare_data()
    assert dm.vocab.itos[4:] == ["dog"]
    assert caplog.text.count("does not record what it was made from") == 1


def test_fit_with_a_vocab_path_of_other_settings_exits_2(shapes_dir, tmp_path, capsys) -> None:
    from captioner.cli import main
    from tests.conftest import fit_args

    vocab = tmp_path / "vocab.json"
    args = fit_args(shapes_dir, tmp_path / "run", "--data.vocab_path", str(vocab), "--trainer.fast_dev_run", "true")
    assert main(args) == 0
    assert main([*args, "--data.min_count", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"captioner: error: data.vocab_path {vocab}: the vocabulary there was made from") and \
        "min count 1 vs 3" in err, err


def test_in_memory_serves_the_same_batches_without_workers(shapes_dir, tmp_path, monkeypatch) -> None:
    import captioner.data.datamodule as datamodule

    disk = _dm(shapes_dir, tmp_path)
    expected = {"train": list(disk.train_dataloader()), "val": list(disk.val_dataloader())}
    ram = _dm(shapes_dir, tmp_path, in_memory=True)
    ram.num_workers = 2  # unused: the images are already in memory
    loaders = {"train": ram.train_dataloader(), "val": ram.val_dataloader()}  # reads each split once

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(datamodule, "load_image", no_reading)
    for split, loader in loaders.items():
        assert loader.num_workers == 0
        for a, b in zip(loader, expected[split], strict=True):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["captions"], b["captions"])


def test_in_memory_refuses_a_split_larger_than_half_the_memory(shapes_dir, tmp_path, monkeypatch, capsys) -> None:
    import captioner.data.datamodule as datamodule
    from captioner.cli import main
    from tests.conftest import fit_args

    monkeypatch.setattr(datamodule, "available_memory", lambda: 2**20)  # 1 MiB
    with pytest.raises(ValueError, match=r"data.in_memory: the train split's \d+ images at 32 px need"):
        _dm(shapes_dir, tmp_path, in_memory=True).train_dataloader()
    args = fit_args(shapes_dir, tmp_path / "run", "--data.in_memory", "true", "--trainer.fast_dev_run", "true")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("captioner: error: data.in_memory: the "), err
