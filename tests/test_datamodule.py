"""The DataModule: batches, padding, caption sampling, vocabulary, bad images."""

from __future__ import annotations

import json

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


def test_bad_image_stops_with_its_name_or_is_skipped(tmp_path) -> None:
    path, root = _broken_karpathy(tmp_path)
    kw = {"dataset": "karpathy", "karpathy": {"split_file": str(path), "image_root": str(root)},
          "min_count": 1, "preprocessing": PRE, "num_workers": 0, "batch_size": 3}
    dm = CaptionDataModule(**kw)
    dm.setup()
    with pytest.raises(ImageLoadError, match=r"bad\.png.*zero-byte.*data check"):
        next(iter(dm.train_dataloader()))
    dm = CaptionDataModule(skip_bad_images=True, **kw)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["captions"].shape[0] == 2  # the rest of the batch is kept
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
