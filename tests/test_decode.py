"""Decoding: TorchCodec's pixels where they are PIL's, PIL for the rest; large JPEGs decoded at
reduced size (JPEG DCT scaling) for the resize after it, the same way on every path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import images
from captioner.data.datamodule import CaptionDataset
from captioner.data.features import FORMAT, FeatureCacheError, FeatureStore, _Images
from captioner.data.images import dct_scale, load_image, load_image_bytes, read_image
from captioner.data.records import ImageRecord
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import Vocabulary

try:
    import torchcodec.decoders  # noqa: F401

    HAVE_TORCHCODEC = True
except Exception:
    HAVE_TORCHCODEC = False

needs_torchcodec = pytest.mark.skipif(not HAVE_TORCHCODEC, reason="needs TorchCodec (captioner[torchcodec])")


def _photo(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour fields plus noise, ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.fixture()
def spy(monkeypatch):
    """Records the formats TorchCodec decoded (it still decodes them)."""
    real = images._torchcodec()
    if real is None:
        pytest.skip("needs TorchCodec (captioner[torchcodec])")
    calls: list[str] = []

    def wrap(fmt):
        def decode(data, **kw):
            calls.append(fmt)
            return real[fmt](data, **kw)
        return decode

    monkeypatch.setattr(images, "_torchcodec", lambda: {fmt: wrap(fmt) for fmt in real})
    return calls


def _pil_only(monkeypatch) -> None:
    monkeypatch.setattr(images, "_torchcodec", lambda: None)


# ---------------------------------------------------------------------------- TorchCodec or PIL


@needs_torchcodec
@pytest.mark.parametrize("name,make", [
    ("rgb.jpg", lambda p: _save(_photo((97, 61)), p, quality=90)),
    ("progressive.jpg", lambda p: _save(_photo((97, 61)), p, quality=90, progressive=True)),
    ("444.jpg", lambda p: _save(_photo((64, 48)), p, quality=95, subsampling=0)),
    ("grey.jpg", lambda p: _save(_photo((80, 60), "L"), p)),
])
def test_torchcodec_gives_pils_pixels(tmp_path, spy, monkeypatch, name, make):
    path = make(tmp_path / name)
    fast = np.asarray(load_image(path))
    assert spy == ["JPEG"], "TorchCodec did not decode it"
    slow = np.asarray(load_image(path, torchcodec=False))  # PIL alone, as asked
    assert spy == ["JPEG"] and fast.shape == slow.shape and np.array_equal(fast, slow)
    _pil_only(monkeypatch)  # as without TorchCodec installed
    assert np.array_equal(np.asarray(load_image(path)), slow)


def _rotated_jpeg(path: Path, size=(48, 32)) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_photo(size), path, exif=exif)


@pytest.mark.parametrize("name,make", [
    ("rotated.jpg", _rotated_jpeg),
    ("cmyk.jpg", lambda p: _save(_photo((40, 30), "CMYK"), p)),
    ("palette.png", lambda p: _save(_photo((40, 30)).convert("P"), p)),
    ("rgba.png", lambda p: _save(_photo((40, 30)).convert("RGBA"), p)),
    ("transparent.png", lambda p: _save(_photo((40, 30)), p, transparency=(0, 0, 0))),
    ("sixteen.png", lambda p: _save(Image.fromarray(np.full((30, 40), 40000, np.uint16)), p)),
    ("photo.webp", lambda p: _save(_photo((40, 30)), p)),
    ("rgb.png", lambda p: _save(_photo((97, 61)), p)),
])
def test_what_torchcodec_would_decode_otherwise_goes_to_pil(tmp_path, spy, monkeypatch, name, make):
    """EXIF rotation, CMYK, palettes, alpha, 16 bits, PNGs (slower through TorchCodec, measured),
    other formats: PIL decodes them, as it did before TorchCodec."""
    path = make(tmp_path / name)
    got = np.asarray(load_image(path))
    assert spy == []
    _pil_only(monkeypatch)
    assert np.array_equal(got, np.asarray(load_image(path)))


@needs_torchcodec
def test_a_file_torchcodec_refuses_is_named_by_pil(tmp_path, spy):
    data = io.BytesIO()
    _photo((64, 64)).save(data, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(images.ImageLoadError, match="truncated"):
        load_image(path)
    assert spy == ["JPEG"]  # tried, refused, then PIL said why


def test_without_torchcodec_pil_decodes_everything(tmp_path, monkeypatch):
    """The fallback where TorchCodec is not installed (or built for another torch)."""
    _pil_only(monkeypatch)
    path = _save(_photo((50, 40)), tmp_path / "a.jpg")
    with Image.open(path) as ref:
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(ref.convert("RGB")))


# ---------------------------------------------------------------------------- DCT scaling


@pytest.mark.parametrize("w,h,size,scale", [
    (4000, 3000, 256, 8), (4000, 3000, 384, 4), (1100, 900, 256, 2), (1100, 900, 128, 4),
    (1100, 900, 500, 1), (511, 4000, 256, 1), (512, 512, 256, 2), (2048, 2047, 256, 4), (640, 480, 224, 2),
])
def test_dct_scale_keeps_both_sides_at_least_the_resize(w, h, size, scale):
    assert dct_scale(w, h, size) == scale
    assert -(-w // scale) >= size and -(-h // scale) >= size
    assert dct_scale(w, h, None) == 1


@pytest.mark.parametrize("size,expect", [(128, (275, 225)), (256, (550, 450)), (500, (1100, 900)), (None, (1100, 900))])
def test_large_jpeg_decoded_at_reduced_size(tmp_path, size, expect):
    path = _save(_photo((1100, 900)), tmp_path / "big.jpg", quality=90)
    img = load_image(path, size)
    assert img.size == expect and img.mode == "RGB"
    assert load_image_bytes(path.read_bytes(), "upload", size).size == expect


def test_png_and_small_jpeg_decoded_at_full_size(tmp_path):
    png = _save(_photo((1100, 900)), tmp_path / "big.png")
    small = _save(_photo((300, 200)), tmp_path / "small.jpg")
    assert load_image(png, 128).size == (1100, 900)
    assert load_image(small, 128).size == (300, 200)


def test_reduced_decoding_is_close_to_full_decoding(tmp_path):
    """The model's input after the resize moves by about a level, not more."""
    path = _save(_photo((1024, 768)), tmp_path / "big.jpg", quality=90)
    pre = Preprocessing(image_size=64, mean=[0.0] * 3, std=[1 / 255] * 3)  # 0..255 out
    full = pre(load_image(path))
    reduced = pre.load(path)
    diff = (full - reduced).abs()
    assert 0 < float(diff.mean()) < 2.0


def test_exif_orientation_still_applied_with_reduced_decoding(tmp_path):
    """A portrait photo stored on its side (orientation 6) comes out upright and reduced."""
    upright = np.zeros((1200, 800, 3), np.uint8)  # H, W: portrait
    upright[:300, :200] = (255, 0, 0)  # red top-left corner
    stored = Image.fromarray(upright).transpose(Image.ROTATE_90)  # 1200 x 800 landscape on disk
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)
    img = load_image(path, 100)  # 1200x800 // 8 -> 150 x 100, then turned upright
    assert img.size == (100, 150)
    a = np.asarray(img).astype(int)
    assert a[:30, :20, 0].mean() > 200 and a[:30, :20, 1].mean() < 60  # red where it belongs
    assert a[-30:, -20:].mean() < 40


def test_truncated_large_jpeg_still_refused_with_reduced_decoding(tmp_path):
    data = io.BytesIO()
    _photo((1100, 900)).save(data, "JPEG", quality=90, progressive=True)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) * 2 // 3])
    with pytest.raises(images.ImageLoadError, match="truncated"):
        load_image(path, 128)


def test_preprocessing_records_dct_scaling_and_old_records_read_without_it():
    pre = Preprocessing(image_size=64)
    assert pre.to_dict()["jpeg_dct_scaling"] is True and pre.decode_size == 64
    old = {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    assert Preprocessing.from_dict(old).jpeg_dct_scaling is False
    assert Preprocessing.from_dict(old).decode_size is None


def test_training_captioning_and_features_see_the_same_pixels(tiny_checkpoint, tmp_path):
    """A large JPEG through the data set (training), the Python API, the stream (the CLI) and
    feature extraction: one tensor, and the reduced decoding's, not the full one's."""
    from captioner.inference import CaptionPipeline

    path = _save(_photo((1100, 900)), tmp_path / "photo.jpg", quality=90)
    pipe = CaptionPipeline.from_pretrained(tiny_checkpoint, device="cpu")
    pre = pipe.loaded.preprocessing
    assert pre.jpeg_dct_scaling and dct_scale(1100, 900, pre.image_size) > 1
    rec = ImageRecord(image_id=1, path=path, split="test", captions=[["a", "b"]])
    training = CaptionDataset([rec], Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "b"]), pre)[0]["image"]
    api = pipe._pixels(path)
    stream, err = pipe.read(path)
    features = _Images([rec], pre)[0][1]
    assert err is None
    for x in (api, stream, features, read_image(path, pre)[0]):
        assert x.shape == training.shape and bool((x == training).all())
    assert not bool((pre(load_image(path)) == training).all())  # the full decode differs


# ---------------------------------------------------------------------------- feature cache


def test_a_cache_made_without_dct_scaling_does_not_match(tmp_path):
    """A feature cache whose index predates ``jpeg_dct_scaling`` was made from fully decoded
    JPEGs: a run that decodes them reduced is told so; one that does not is served."""
    old = {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    cache = tmp_path / "cache"
    cache.mkdir()
    index = {"format": FORMAT, "complete": True, "grid": [2, 2], "num_regions": 4, "dim": 8,
             "encoder": {"name": "shapes_cnn"}, "preprocessing": old, "paths": {}, "splits": {},
             "counts": {}, "shards": [], "index": {}, "done": []}
    (cache / "index.json").write_text(json.dumps(index))
    store = FeatureStore(cache)
    with pytest.raises(FeatureCacheError, match=r"jpeg dct scaling false vs true"):
        store.check(None, Preprocessing(64, [0.5] * 3, [0.5] * 3), [])
    store.check(None, Preprocessing(64, [0.5] * 3, [0.5] * 3, jpeg_dct_scaling=False), [])
