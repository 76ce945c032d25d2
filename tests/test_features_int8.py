"""The int8 feature cache (`features extract --dtype int8`): the quantiser's error bound, the size
on disk, training and evaluating from it, and a cache of the other dtype in --out refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.cli import main
from captioner.data.datamodule import collate_captions
from captioner.data.features import FeatureStore, bytes_per_image, dequantize, quantize
from captioner.system import CaptioningSystem
from captioner.training import batch_features
from tests.helpers import record_fits
from tests.test_features import _error_line, _fit_from, _write_config


def test_quantiser_round_trip_is_within_half_a_step_per_image_and_channel() -> None:
    g = torch.Generator().manual_seed(0)
    # channels whose ranges differ by orders of magnitude, signs of both kinds, an all-zero channel
    x = torch.randn(3, 49, 64, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(0)  # (B, N, D)
    x[:, :, 5] = 0
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == (3, 64)
    assert int(q.abs().max()) == 127 and bool((q[:, :, 5] == 0).all())
    back = dequantize(q, scale)  # (B, N, D) float32
    # every value within half a step of its (image, channel) scale: a bound per channel, so the
    # quiet channels keep their precision
    assert bool(((back - x).abs() <= scale.unsqueeze(1) / 2 * (1 + 1e-5)).all())
    assert bool((back[:, :, 5] == 0).all())
    rel = (back - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-30)  # (B, D)
    assert float(rel[:, 6:].max()) < 0.01


def _extract(shapes_dir: Path, tmp: Path, dtype: str) -> Path:
    out = tmp / f"cache-{dtype}"
    cfg = _write_config(tmp / "cfg.yaml", shapes_dir)
    assert main(["features", "extract", "--config", str(cfg), "--out", str(out), "--device", "cpu",
                 "--batch-size", "16", "--shard-size", "32", "--dtype", dtype]) == 0
    return out


@pytest.fixture(scope="module")
def int8_cache(shapes_dir, tmp_path_factory) -> Path:
    return _extract(shapes_dir, tmp_path_factory.mktemp("int8"), "int8")


@pytest.fixture(scope="module")
def cache(shapes_dir, tmp_path_factory) -> Path:
    """The float16 cache of the same encoder (the command seeds it: the same weights)."""
    return _extract(shapes_dir, tmp_path_factory.mktemp("fp16"), "fp16")


def test_an_int8_cache_holds_int8_rows_and_scales_and_halves_the_disk(int8_cache, cache) -> None:
    index = json.loads((int8_cache / "index.json").read_text())
    assert index["complete"] and index["dtype"] == "int8"
    n, d, images = index["num_regions"], index["dim"], index["counts"]["images"]
    assert index["bytes_per_image"] == n * d + 4 * d == bytes_per_image(n, d, "int8")
    for s in index["shards"]:
        rows = np.load(int8_cache / s["file"], mmap_mode="r")
        scales = np.load(int8_cache / s["scales"], mmap_mode="r")
        assert rows.dtype == np.int8 and rows.shape == (s["rows"], n, d)
        assert scales.dtype == np.float32 and scales.shape == (s["rows"], d)
    # the data on disk is what bytes_per_image says (npy headers aside), for both dtypes
    for folder in (int8_cache, cache):
        on_disk = sum(p.stat().st_size for p in folder.glob("*.npy"))
        per_image = json.loads((folder / "index.json").read_text())["bytes_per_image"]
        assert images * per_image <= on_disk <= images * per_image + 256 * len(list(folder.glob("*.npy")))
    # ResNet-101 at 14x14x2048: the scales add 2 % to half of float16's bytes; COCO's 123,287 images
    assert bytes_per_image(196, 2048, "int8") == 409_600
    assert bytes_per_image(196, 2048, "int8") / bytes_per_image(196, 2048) == pytest.approx(0.5102, abs=1e-4)
    assert 123_287 * bytes_per_image(196, 2048, "int8") == 50_498_355_200


def test_int8_features_are_the_float16_ones_within_the_bound(int8_cache, cache) -> None:
    """The same encoder (seed 0) made both caches: the int8 rows dequantised are the float16 rows
    within half a step; the batch carries int8 and the model gets floats (batch_features)."""
    fp16, int8 = FeatureStore(cache), FeatureStore(int8_cache)
    assert int8.dtype == "int8" and fp16.dtype == "float16"
    ids = fp16.splits["train"][:8]
    for i in ids:
        ref, got = fp16.get(i).float(), int8.get(i)  # (N, D)
        assert got.dtype == torch.float32
        step = ref.abs().amax(dim=0) / 127  # (D,)
        assert bool(((got - ref).abs() <= step / 2 + 1e-3 * ref.abs() + 1e-6).all())
        assert float((got - ref).norm() / ref.norm()) < 0.01
    batch = collate_captions([{"caption": torch.tensor([1, 5, 2]), "image_id": i, "index": k, **int8.item(i)}
                              for k, i in enumerate(ids)])
    assert batch["features"].dtype == torch.int8 and batch["feature_scales"].shape == (8, fp16.dim)
    feats = batch_features(None, batch)  # (B, N, D)
    assert feats.dtype == torch.float32 and torch.equal(feats, torch.stack([int8.get(i) for i in ids]))


def test_fit_and_test_read_an_int8_cache_without_a_flag(int8_cache, shapes_dir, tmp_path, monkeypatch) -> None:
    seen = []
    step = CaptioningSystem.training_step

    def recording(self, batch, *args):
        seen.append((batch["features"].dtype, batch_features(self.model, batch).dtype))
        return step(self, batch, *args)

    monkeypatch.setattr(CaptioningSystem, "training_step", recording)
    fits = record_fits(monkeypatch)
    args = _fit_from(shapes_dir, tmp_path / "run", int8_cache, "--trainer.fast_dev_run", "2")
    assert main(args) == 0
    (trainer,) = fits
    assert trainer.state.status == "finished" and trainer.global_step == 2
    assert seen == [(torch.int8, torch.float32)] * 2
    assert main(["test", *args[1:]]) == 0  # evaluates the test split from the cache


@pytest.mark.parametrize(("first", "then", "expected"), [("int8", "fp16", "dtype int8 vs float16"),
                                                         ("fp16", "int8", "dtype float16 vs int8")])
def test_a_cache_of_the_other_dtype_in_out_is_one_line(shapes_dir, tmp_path, capsys, first, then, expected) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir)
    out = tmp_path / "cache"
    args = ["features", "extract", "--config", str(cfg), "--out", str(out), "--splits", "val", "--device", "cpu"]
    assert main([*args, "--dtype", first]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    capsys.readouterr()
    assert main([*args, "--dtype", then]) == 2
    err = _error_line(capsys)
    assert f"{out}: the feature cache there was made from something else" in err, err
    assert expected in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == before  # left as it was
    assert main([*args, "--dtype", then, "--overwrite"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == {"fp16": "float16", "int8": "int8"}[then] and index["complete"]
    assert bool(list(out.glob("scale-*.npy"))) == (then == "int8")  # the other dtype's files gone


def test_a_cache_of_an_unknown_dtype_is_one_line(int8_cache, tmp_path) -> None:
    """A cache from a captioner that stores another dtype: refused by name, not misread."""
    import shutil

    from captioner.data.features import FeatureCacheError

    other = tmp_path / "other"
    shutil.copytree(int8_cache, other)
    index = json.loads((other / "index.json").read_text())
    index["dtype"] = "int4"
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(FeatureCacheError, match=r"^\S*other: feature cache dtype 'int4': this captioner stores float16, "
                       r"int8 \(made by a newer captioner\? upgrade it\)$"):
        FeatureStore(other)
