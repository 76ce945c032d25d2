"""The feature cache: extraction, resuming, refusing incomplete caches, training from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.cli import main
from captioner.data.datamodule import CaptionDataModule
from captioner.data.features import (
    FeatureCacheError,
    FeatureStore,
    bytes_per_image,
    extract_features,
    weights_sha256,
)
from captioner.models import Captioner, DecoderConfig, EncoderConfig, create_encoder
from captioner.models.encoder import encoder_fingerprint
from captioner.system import CaptioningSystem
from tests.conftest import fit_args
from tests.helpers import record_fits

# A frozen torchvision encoder at the fixture's 32 px: a 1x1 map pooled to a 2x2 grid.
ENCODER = {"name": "resnet50", "grid": 2, "image_size": 32, "trainable_blocks": 0}


def _datamodule(shapes_dir: Path, **kwargs) -> CaptionDataModule:
    enc = EncoderConfig(**ENCODER)
    return CaptionDataModule(dataset="shapes", shapes={"data_dir": str(shapes_dir), "image_size": 32}, min_count=1,
                             num_workers=0, batch_size=8, preprocessing=create_encoder(enc).preprocessing, **kwargs)


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder, counts forward passes and can fail after a number of them."""

    def __init__(self, encoder, fail_after: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        return self.encoder(images)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder(EncoderConfig(**ENCODER)).eval()


@pytest.fixture(scope="module")
def cache(shapes_dir, encoder, tmp_path_factory) -> Path:
    dm = _datamodule(shapes_dir)
    dm.prepare_data()
    out = tmp_path_factory.mktemp("features") / "cache"
    splits = {s: dm.split_records(s) for s in ("train", "val", "test")}
    extract_features(splits, encoder, out, dm.preprocessing, encoder_fingerprint(EncoderConfig(**ENCODER), encoder),
                     batch_size=8, shard_size=16)
    return out


def test_index_describes_the_cache(cache, shapes_dir, encoder) -> None:
    index = json.loads((cache / "index.json").read_text())
    dm = _datamodule(shapes_dir)
    counts = {s: len(dm.split_records(s)) for s in ("train", "val", "test")}
    total = sum(counts.values())
    assert index["complete"] and index["dtype"] == "float16"
    assert index["counts"] == {**counts, "images": total}
    assert index["grid"] == [2, 2] and index["num_regions"] == 4 and index["dim"] == 2048
    assert index["encoder"] == {"name": "resnet50", "grid": 2, "stem": "rgb", "weights": weights_sha256(encoder)}
    assert index["preprocessing"] == dm.preprocessing.to_dict()
    rec = dm.split_records("val")[0]
    assert Path(index["image_root"], index["paths"][str(rec.image_id)]) == Path(rec.path).resolve()
    assert index["splits"]["val"] == [r.image_id for r in dm.split_records("val")]
    rows = [s["rows"] for s in index["shards"]]
    assert sum(rows) == total and set(rows[:-1]) <= {16} and 0 < rows[-1] <= 16
    assert index["done"] == list(range(len(rows)))
    assert index["bytes_per_image"] == 4 * 2048 * 2
    assert len(index["index"]) == total
    # the COCO budget quoted in the docs: ResNet-101 14x14x2048 in float16
    assert bytes_per_image(196, 2048) == 802_816


def test_store_returns_the_encoder_output(cache, shapes_dir, encoder) -> None:
    from captioner.data.images import load_image

    dm = _datamodule(shapes_dir)
    store = FeatureStore(cache)
    assert len(store) == sum(len(dm.split_records(s)) for s in ("train", "val", "test"))
    assert store.grid == (2, 2)
    for rec in dm.split_records("test")[:2] + dm.split_records("train")[-2:]:
        with torch.inference_mode():
            expected = encoder(dm.preprocessing(load_image(rec.path)).unsqueeze(0))[0][0]
        got = store.get(rec.image_id)
        assert got.dtype == torch.float16 and got.shape == (4, 2048)
        torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=1e-3)
    with pytest.raises(FeatureCacheError, match="not in the feature cache"):
        store.get(10**9)


def test_interrupted_extraction_is_refused_then_resumed(shapes_dir, encoder, tmp_path) -> None:
    dm = _datamodule(shapes_dir)
    splits = {"train": dm.split_records("train")[:32]}  # 4 shards of 8, batches of 4, chunks of 4
    out = tmp_path / "cache"
    kw = {"batch_size": 4, "shard_size": 8, "chunk_size": 4}
    broken = CountingEncoder(encoder, fail_after=1 + 3)  # the probe, then 3 batches
    with pytest.raises(KeyboardInterrupt):
        extract_features(splits, broken, out, dm.preprocessing, ENCODER, **kw)
    index = json.loads((out / "index.json").read_text())
    assert not index["complete"] and index["done"] == []
    assert len(list((out / "parts").glob("chunk-*.json"))) == 3  # 12 images kept
    with pytest.raises(FeatureCacheError, match="incomplete .0 of 4 shards"):
        FeatureStore(out)

    counting = CountingEncoder(encoder)
    extract_features(splits, counting, out, dm.preprocessing, ENCODER, **kw)
    assert counting.calls == 1 + 5  # the probe, then only the 20 images left
    store = FeatureStore(out)
    assert len(store) == 32 and not (out / "parts").exists()
    first = (out / "shard-00000.npy").stat().st_mtime_ns
    counting.calls = 0  # a complete cache: nothing left to do
    extract_features(splits, counting, out, dm.preprocessing, ENCODER, **kw)
    assert counting.calls == 1 and (out / "shard-00000.npy").stat().st_mtime_ns == first


def test_unreadable_images_are_named_and_only_they_are_left(shapes_dir, encoder, tmp_path) -> None:
    import dataclasses
    import shutil

    dm = _datamodule(shapes_dir)
    records = dm.split_records("train")[:16]
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    splits = {"train": [*records[:10], dataclasses.replace(records[10], path=bad), *records[11:]]}
    out = tmp_path / "cache"
    kw = {"batch_size": 4, "shard_size": 8, "chunk_size": 4}
    with pytest.raises(FeatureCacheError, match=r"1 image\(s\) could not be read .the first: .*bad.png: not an image"):
        extract_features(splits, encoder, out, dm.preprocessing, ENCODER, **kw)
    assert json.loads((out / "index.json").read_text())["done"] == [0]  # the shard without it
    shutil.copy(records[10].path, bad)  # mended
    counting = CountingEncoder(encoder)
    extract_features(splits, counting, out, dm.preprocessing, ENCODER, **kw)
    assert counting.calls == 1 + 1  # the probe, then the one image
    reference = tmp_path / "reference"
    extract_features({"train": records[:10] + [dataclasses.replace(records[10], path=bad)] + records[11:]},
                     encoder, reference, dm.preprocessing, ENCODER, batch_size=4, shard_size=8)
    assert (out / "shard-00000.npy").read_bytes() == (reference / "shard-00000.npy").read_bytes()
    # image 10 was encoded alone the second time, not with its batch: the same up to float sums
    np.testing.assert_allclose(np.load(out / "shard-00001.npy").astype(np.float32),
                               np.load(reference / "shard-00001.npy").astype(np.float32), rtol=2e-3, atol=1e-3)


def test_a_different_cache_in_the_folder_is_refused(cache, shapes_dir, encoder) -> None:
    dm = _datamodule(shapes_dir)
    with pytest.raises(FeatureCacheError, match="made from something else .the cache.s vs now: shard size 16 vs 10."):
        extract_features({"train": dm.split_records("train"), "val": dm.split_records("val"),
                          "test": dm.split_records("test")}, encoder, cache, dm.preprocessing,
                         encoder_fingerprint(EncoderConfig(**ENCODER), encoder), shard_size=10)
    with pytest.raises(FeatureCacheError, match="no feature cache"):
        FeatureStore(cache.parent / "nowhere")


def test_datamodule_serves_features_without_reading_images(cache, shapes_dir, monkeypatch) -> None:
    import captioner.data.datamodule as datamodule

    def no_images(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(datamodule, "load_image", no_images)
    dm = _datamodule(shapes_dir, feature_cache=str(cache))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "images" not in batch
    assert batch["features"].shape == (8, 4, 2048) and batch["features"].dtype == torch.float32
    val = next(iter(dm.val_dataloader()))
    assert val["features"].shape[1:] == (4, 2048)

    torch.manual_seed(0)
    system = CaptioningSystem(encoder=EncoderConfig(**ENCODER),
                              decoder=DecoderConfig(embed_dim=16, attention_dim=16, decoder_dim=16),
                              vocab=dm.vocab.to_list()).train()
    opt = torch.optim.Adam([p for p in system.parameters() if p.requires_grad], lr=1e-3)
    loss = system.compute_loss(batch)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert system.model.decoder.lstm.weight_ih.grad.abs().sum() > 0


def _write_config(path: Path, shapes_dir: Path, **encoder) -> Path:
    import yaml

    cfg = {"model": {"encoder": {**ENCODER, **encoder}},
           "data": {"dataset": "shapes", "shapes": {"data_dir": str(shapes_dir), "image_size": 32},
                    "min_count": 1, "num_workers": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_extract_then_fit_from_the_cache(shapes_dir, tmp_path, capsys, monkeypatch) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir)
    out = tmp_path / "cache"
    code = main(["features", "extract", "--config", str(cfg), "--out", str(out), "--device", "cpu",
                 "--batch-size", "16", "--splits", "train", "val"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dm = _datamodule(shapes_dir)
    n_train, n_val = len(dm.split_records("train")), len(dm.split_records("val"))
    assert summary["counts"] == {"train": n_train, "val": n_val, "images": n_train + n_val}
    assert summary["bytes"] == (n_train + n_val) * 4 * 2048 * 2

    root = tmp_path / "run"
    fits = record_fits(monkeypatch)
    read = []
    get = FeatureStore.item
    monkeypatch.setattr(FeatureStore, "item", lambda self, image_id: read.append(image_id) or get(self, image_id))
    monkeypatch.setattr(Captioner, "encode", lambda self, images: pytest.fail("an image was encoded"))
    main(fit_args(shapes_dir, root, "--model.encoder.name", "resnet50", "--model.encoder.grid", "2",
                  "--model.encoder.image_size", "32", "--model.encoder.trainable_blocks", "0",
                  "--data.feature_cache", str(out), "--trainer.fast_dev_run", "true"))
    (trainer,) = fits
    assert trainer.state.status == "finished" and trainer.global_step == 1
    # a training batch and a validation batch, all from the cache
    store = FeatureStore(out)
    assert len(read) == 16 and all(image_id in store for image_id in read)


@pytest.mark.parametrize(("encoder", "message"), [
    ({"trainable_blocks": 1}, "trainable_blocks is 1"),
    ({"name": "shapes_cnn"}, "shapes_cnn always trains"),
    ({"stem": "split"}, "stem split trains a colour path"),
])
def test_cli_refuses_an_encoder_that_trains(shapes_dir, tmp_path, capsys, encoder, message) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir, **encoder)
    assert main(["features", "extract", "--config", str(cfg), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "frozen encoder" in err and message in err
    assert not (tmp_path / "c").exists()


def test_cli_reports_bad_configs(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  encoder:\n    name: resnet50\n    colour: red\n")
    assert main(["features", "extract", "--config", str(cfg), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captioner: error:") and "colour" in err and "\n" not in err.strip(), err
    assert main(["features", "extract", "--config", str(tmp_path / "nope.yaml"), "--out", "x"]) == 2


def test_cli_names_an_unreadable_image_exits_1_and_fit_refuses_the_cache(shapes_dir, tmp_path, capsys) -> None:
    """docs/usage.md: `features extract` "names the files it could not read and exits with 1; the
    cache stays incomplete (`fit` refuses it)"."""
    import shutil

    import yaml

    root = tmp_path / "images"
    root.mkdir()
    entries = []
    for i, src in enumerate(sorted((shapes_dir / "images").glob("*.png"))[:6]):
        shutil.copy(src, root / src.name)
        entries.append({"filename": src.name, "imgid": i, "split": "train" if i < 4 else "val",
                        "sentences": [{"tokens": ["a", "red", "square"], "raw": "a red square"}]})
    (root / "bad.png").write_text("not a picture")
    entries.append({"filename": "bad.png", "imgid": 6, "split": "train",
                    "sentences": [{"tokens": ["a", "blue", "circle"], "raw": "a blue circle"}]})
    split_file = tmp_path / "dataset.json"
    split_file.write_text(json.dumps({"images": entries}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"encoder": ENCODER}, "data": {
        "dataset": "karpathy", "karpathy": {"split_file": str(split_file), "image_root": str(root)},
        "min_count": 1, "num_workers": 0}}))
    out = tmp_path / "cache"
    assert main(["features", "extract", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{root / 'bad.png'}: not an image" in err and "1 image(s) could not be read" in err, err
    assert not json.loads((out / "index.json").read_text())["complete"]
    rc = main(["fit", "--config", str(cfg), "--data.feature_cache", str(out), "--trainer.max_steps", "1",
               "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "the feature cache is incomplete" in err and str(out) in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
# -- the cache proves what it was made from (issue 29) ---------------------------------------------
def _fit_from(shapes_dir: Path, root: Path, cache: Path, *extra: str) -> list[str]:
    return fit_args(shapes_dir, root, "--model.encoder.name", "resnet50", "--model.encoder.grid", "2",
                    "--model.encoder.image_size", "32", "--model.encoder.trainable_blocks", "0",
                    "--data.feature_cache", str(cache), "--trainer.fast_dev_run", "true", *extra)


def _error_line(capsys) -> str:
    """The one error line of a command that failed (log lines before it are the run's progress)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if line.startswith("captioner: error: ")] == lines[-1:], lines
    return lines[-1]


def _other_weights(path: Path) -> Path:
    """A resnet50 state dict (same width, same names) with weights of another seed."""
    import torchvision

    torch.manual_seed(7)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize(("extra", "expected"), [
    (("--model.encoder.grid", "1"), "grid 2 vs 1"),
    (("--model.encoder.image_size", "64"), "image size 32 vs 64"),
    (("--model.encoder.weights_path", "OTHER"), "weights sha256 {cache}.. vs {other}.."),
    (("--model.encoder.stem", "split"), "stem rgb vs split"),
])
def test_fit_refuses_a_cache_of_another_encoder(cache, shapes_dir, encoder, tmp_path, capsys, monkeypatch,
                                                extra, expected) -> None:
    if "OTHER" in extra:
        other = _other_weights(tmp_path / "resnet50-other.pth")
        extra = tuple(str(other) if a == "OTHER" else a for a in extra)
        from captioner.models import EncoderConfig as Config

        theirs = weights_sha256(create_encoder(Config(**ENCODER, weights_path=str(other))))
        expected = expected.format(cache=weights_sha256(encoder)[:8], other=theirs[:8])
    steps = []
    monkeypatch.setattr(CaptioningSystem, "training_step", lambda self, *a: steps.append(1) or pytest.fail("trained"))
    assert main(_fit_from(shapes_dir, tmp_path / "run", cache, *extra)) == 2
    err = _error_line(capsys)
    assert f"{cache}: the feature cache does not match this run" in err and expected in err, err
    assert "extract a new cache into another folder" in err
    assert not steps and not (tmp_path / "run" / "checkpoints").exists()
    if extra[0] == "--model.encoder.grid":  # validate (and test) check in the same place, for their split
        args = _fit_from(shapes_dir, tmp_path / "run", cache, *extra)
        assert main(["validate", *args[1:]]) == 2
        assert expected in _error_line(capsys)


def test_fit_refuses_a_cache_whose_ids_now_name_other_images(shapes_dir, encoder, tmp_path, capsys) -> None:
    """A split file converted again (image ids are positions) hands an id to another file: the
    cache made for the first must not serve the second."""
    data = json.loads((shapes_dir / "dataset.json").read_text())
    images = data["images"][:12]
    for k, im in enumerate(images):
        im["split"] = "train" if k < 10 else "val"
    split_file = tmp_path / "dataset.json"
    split_file.write_text(json.dumps({"images": images}))
    source = ["--data.dataset", "karpathy", "--data.karpathy.split_file", str(split_file),
              "--data.karpathy.image_root", str(shapes_dir / "images"),
              "--model.loss.attention_supervision", "0"]  # configs/shapes.yaml's: grounding is shapes' own
    dm = CaptionDataModule(dataset="karpathy", min_count=1, num_workers=0,
                           karpathy={"split_file": str(split_file), "image_root": str(shapes_dir / "images")},
                           preprocessing=create_encoder(EncoderConfig(**ENCODER)).preprocessing)
    out = tmp_path / "cache"
    extract_features({s: dm.split_records(s) for s in ("train", "val")}, encoder, out, dm.preprocessing,
                     encoder_fingerprint(EncoderConfig(**ENCODER), encoder), batch_size=4, shard_size=4)
    first = images[0]["filename"]
    # converted again from an edited list: ids 0 and 1 now name each other's file (and captions)
    for key in ("filename", "sentences"):
        images[0][key], images[1][key] = images[1][key], images[0][key]
    split_file.write_text(json.dumps({"images": images}))
    assert main(_fit_from(shapes_dir, tmp_path / "run", out, *source)) == 2
    err = _error_line(capsys)
    assert "2 image id(s) name other files than when it was made" in err and first in err, err
    assert "another encoder" not in err


def test_extract_refuses_to_resume_a_cache_of_other_weights(shapes_dir, tmp_path, capsys) -> None:
    """The same settings, the same weights file name, other weights in it."""
    weights = _other_weights(tmp_path / "resnet50.pth")
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir, weights_path=str(weights))
    out = tmp_path / "cache"
    args = ["features", "extract", "--config", str(cfg), "--out", str(out), "--splits", "val", "--device", "cpu"]
    assert main(args) == 0
    made = json.loads((out / "index.json").read_text())["encoder"]["weights"]
    import torchvision

    torch.manual_seed(8)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    capsys.readouterr()
    assert main(args) == 2
    err = _error_line(capsys)
    assert f"{out}: the feature cache there was made from something else" in err, err
    assert f"weights sha256 {made[:8]}.. vs " in err and "--overwrite" in err, err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "index.json").read_text())["encoder"]["weights"] != made


def test_a_cache_of_the_earlier_format_says_to_extract_again(cache, tmp_path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cache, old)
    index = json.loads((old / "index.json").read_text())
    index["format"] = 1
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(FeatureCacheError, match=r"format 1, made by an earlier captioner.*extract it again"):
        FeatureStore(old)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_extraction_needs_no_more_disk_than_the_cache(shapes_dir, encoder, tmp_path, monkeypatch, dtype) -> None:
    """The disk an extraction takes, measured after every file it writes, never exceeds 1.1x the
    finished cache plus one chunk (int8: its scale files too)."""
    import captioner.data.features as features

    out = tmp_path / "cache"
    peak = [0]

    def usage() -> int:  # allocated blocks, not sizes: sparse or reserved files count as they are
        return sum(p.stat().st_blocks * 512 for p in out.rglob("*") if p.is_file())

    def measured(fn):
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            peak[0] = max(peak[0], usage())
            return result
        return run

    for name in ("atomic_write", "atomic_write_json"):
        if hasattr(features, name):
            monkeypatch.setattr(features, name, measured(getattr(features, name)))
    monkeypatch.setattr(features.FeatureChunks, "write", measured(features.FeatureChunks.write))
    dm = _datamodule(shapes_dir)
    extract_features({"train": dm.split_records("train")[:40]}, encoder, out, dm.preprocessing, ENCODER,
                     batch_size=4, shard_size=8, chunk_size=4, dtype=dtype)
    final = usage()
    assert final >= 40 * bytes_per_image(4, 2048, dtype)
    assert peak[0] <= 1.1 * final + 4 * bytes_per_image(4, 2048, dtype), (peak[0], final)


def test_a_disk_too_small_for_the_cache_fails_before_any_image_is_encoded(shapes_dir, encoder, tmp_path,
                                                                          monkeypatch) -> None:
    import errno
    import os

    from captioner.files import DiskFullError

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    dm = _datamodule(shapes_dir)
    counting = CountingEncoder(encoder)
    out = tmp_path / "cache"
    with pytest.raises(DiskFullError, match=r"no space left on device writing \S*shard-00000.npy "
                       r"\(needs 131.2 kB") as err:
        extract_features({"train": dm.split_records("train")[:16]}, counting, out, dm.preprocessing, ENCODER,
                         batch_size=4, shard_size=8)
    assert err.value.errno == errno.ENOSPC
    assert counting.calls == 1  # the probe only: nothing was encoded for nothing
    assert not list(out.glob("shard-*")) and not list(out.glob(".shard-*"))


def test_fit_keeps_a_cache_made_before_dct_scaling_and_decodes_as_it_did(cache, shapes_dir, tmp_path, capsys) -> None:
    """A cache that predates ``jpeg_dct_scaling`` (its index has no such key: large JPEGs decoded
    whole) is not refused for it; the model trained from it records whole decoding, so that its
    captions see the pixels it trained on."""
    import shutil

    from captioner.checkpoint import load_checkpoint

    old = tmp_path / "old-cache"
    shutil.copytree(cache, old)
    index = json.loads((old / "index.json").read_text())
    assert index["preprocessing"].pop("jpeg_dct_scaling") is True
    (old / "index.json").write_text(json.dumps(index))
    args = _fit_from(shapes_dir, tmp_path / "run", old, "--trainer.fast_dev_run", "false",
                     "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", "cpu")
    assert loaded.preprocessing.jpeg_dct_scaling is False
