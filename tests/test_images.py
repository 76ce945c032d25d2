"""load_image: every PIL mode to RGB, every kind of bad file to an ImageLoadError naming it, with
TorchCodec installed and without it."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import images
from captioner.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    iter_image_paths,
    load_image,
    load_image_bytes,
)

W, H = 12, 8


@pytest.fixture(autouse=True, params=["torchcodec", "pil"])
def decoder(request, monkeypatch) -> str:
    """Every test twice: with TorchCodec decoding what it takes, and PIL alone (no TorchCodec)."""
    if request.param == "pil":
        monkeypatch.setattr(images, "_torchcodec", lambda: None)
    elif images._torchcodec() is None:
        pytest.skip("needs TorchCodec (captioner[torchcodec])")
    return request.param


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _noise_jpeg(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _save(Image.fromarray(arr), path, quality=95)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG that claims ``width x height`` pixels but holds a single row: huge, yet tiny on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((width + 7) // 8 + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _header(path: Path) -> tuple[str, tuple[int, int], dict]:
    with Image.open(path) as img:
        return img.mode, img.size, dict(img.info)


def _check_rgb(img: Image.Image, size=(W, H)) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == size
    return np.asarray(img)


# ---------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode,ext", [
    ("RGB", "jpg"), ("RGB", "png"), ("RGB", "bmp"), ("RGB", "webp"), ("L", "png"), ("L", "jpg"),
    ("1", "png"), ("P", "gif"), ("P", "png"), ("CMYK", "jpg"), ("CMYK", "tiff"), ("LA", "png"),
    ("RGBA", "png"), ("RGBA", "webp"), ("I;16", "png"), ("I", "tiff"), ("F", "tiff"),
])
def test_every_mode_loads_as_rgb(tmp_path, mode, ext):
    src = Image.new(mode, (W, H))
    path = _save(src, tmp_path / f"img.{ext}")
    _check_rgb(load_image(path))


def test_sixteen_bit_scaled_by_full_range(tmp_path):
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    assert _header(path)[0].startswith("I;16")
    out = _check_rgb(load_image(path), size=(3, 1))
    assert out[0, :, 0].tolist() == [0, 100, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32_bit_int_and_float_scaled(tmp_path):
    small = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32))
    assert _check_rgb(load_image(_save(small, tmp_path / "i8.tiff")), (3, 1))[0, :, 0].tolist() == [0, 7, 255]
    wide = Image.fromarray(np.array([[-100, 0, 155]], dtype=np.int32))  # no standard range: min-max
    assert _check_rgb(load_image(_save(wide, tmp_path / "iw.tiff")), (3, 1))[0, :, 0].tolist() == [0, 100, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _check_rgb(load_image(_save(unit, tmp_path / "f.tiff")), (3, 1))[0, :, 0].tolist() == [0, 128, 255]


def test_one_bit_keeps_black_and_white(tmp_path):
    img = Image.new("1", (W, H), 0)
    img.putpixel((0, 0), 1)
    out = _check_rgb(load_image(_save(img, tmp_path / "bw.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 0, 0]


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    out = _check_rgb(load_image(_save(img, tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())


def test_la_composited_on_white(tmp_path):
    img = Image.new("LA", (W, H), (0, 0))
    img.putpixel((1, 0), (0, 255))
    out = _check_rgb(load_image(_save(img, tmp_path / "la.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_transparency_composited_on_white(tmp_path, ext):
    img = Image.new("P", (W, H), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    path = _save(img, tmp_path / f"p.{ext}", transparency=0)
    assert "transparency" in _header(path)[2]
    out = _check_rgb(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]  # index 0 is transparent black
    assert out[0, 1].tolist() == [255, 0, 0]


def test_cmyk_tiff_colours(tmp_path):
    img = Image.new("CMYK", (W, H), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow = red
    out = _check_rgb(load_image(_save(img, tmp_path / "c.tif")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]


def test_exif_rotation_swaps_width_and_height(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _save(Image.new("RGB", (40, 20), "red"), tmp_path / "rot.jpg", exif=exif)
    assert _header(path)[1] == (40, 20)
    assert load_image(path).size == (20, 40)


def test_returned_image_outlives_file(tmp_path):
    path = _save(Image.new("RGB", (W, H), "blue"), tmp_path / "b.png")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((0, 0)) == (0, 0, 255)


def test_str_and_path_both_accepted(tmp_path):
    path = _save(Image.new("RGB", (W, H)), tmp_path / "x.png")
    assert load_image(str(path)).size == load_image(path).size


# ---------------------------------------------------------------------------- bad files


def _assert_error(path, match: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError, match=match) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.jpg", "file not found")


def test_directory(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    _assert_error(tmp_path / "d.jpg", "directory")


def test_zero_byte(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _assert_error(tmp_path / "empty.jpg", "zero-byte file")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("definitely not a picture\n")
    _assert_error(tmp_path / "notes.jpg", "not an image")


def test_truncated_jpeg(tmp_path):
    full = _noise_jpeg(tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    _assert_error(tmp_path / "cut.jpg", "truncated image")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    full = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "f.png")
    data = full.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _assert_error(tmp_path / "cut.png", "truncated image")


def test_corrupt_png_body(tmp_path):
    rng = np.random.default_rng(1)
    full = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "f.png")
    data = bytearray(full.read_bytes())
    start = data.index(b"IDAT") + 60
    data[start:start + 140] = b"\x13" * 140  # garbage inside the compressed stream
    (tmp_path / "bad.png").write_bytes(bytes(data))
    _assert_error(tmp_path / "bad.png", "corrupt image")


@pytest.mark.parametrize("side", [10_000, 30_000])  # above the limit; above twice the limit
def test_decompression_bomb_refused(tmp_path, side):
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    assert path.stat().st_size < 10_000
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    err = _assert_error(path, "decompression bomb")
    assert f"{side * side} pixels > {images.MAX_IMAGE_PIXELS}" in err.reason
    assert before_limit == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == before_filters


def test_bomb_limit_is_the_module_constant(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    err = _assert_error(path, "decompression bomb")
    assert err.reason == "decompression bomb: 400 pixels > 100"
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 400)
    assert load_image(path).size == (20, 20)


# ---------------------------------------------------------------------------- bytes


def test_load_image_bytes(tmp_path):
    data = _save(Image.new("RGBA", (W, H), (0, 0, 0, 0)), tmp_path / "u.png").read_bytes()
    out = _check_rgb(load_image_bytes(data))
    assert out[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("data,match", [
    (b"", "zero-byte file"),
    (b"hello world", "not an image"),
])
def test_load_image_bytes_errors_name_the_upload(data, match):
    with pytest.raises(ImageLoadError, match=match) as info:
        load_image_bytes(data, name="cat.jpg")
    assert info.value.path == "cat.jpg" and "cat.jpg" in str(info.value)


def test_load_image_bytes_truncated_and_bomb(tmp_path, monkeypatch):
    full = _noise_jpeg(tmp_path / "full.jpg").read_bytes()
    with pytest.raises(ImageLoadError, match="truncated image"):
        load_image_bytes(full[: len(full) // 2])
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(ImageLoadError, match="decompression bomb: 4096 pixels > 4095"):
        load_image_bytes(full)


# ---------------------------------------------------------------------------- paths


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)


def test_iter_image_paths(tmp_path):
    d = tmp_path / "photos"
    (d / "b" / "deep").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for name in ["z.PNG", "a.jpg", "b/c.JpEg", "b/deep/d.tiff", "notes.txt", ".hidden/e.jpg", "b/.f.gif"]:
        (d / name).write_bytes(b"x")
    explicit = tmp_path / "given.txt"
    explicit.write_text("x")
    got = list(iter_image_paths([explicit, str(d), tmp_path / "missing.jpg"]))
    assert got == [
        explicit,
        d / "a.jpg", d / "b" / "c.JpEg", d / "b" / "deep" / "d.tiff", d / "z.PNG",
        tmp_path / "missing.jpg",
    ]
    assert all(isinstance(p, Path) for p in got)
