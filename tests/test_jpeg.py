"""JPEGs decoded and resized by torchvision on the model's device (here the CPU: the same code
the GPU runs, nvJPEG aside) against the PIL path."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.images import load_image
from captioner.data.jpeg import decode_jpegs, read_jpeg
from captioner.data.transforms import Preprocessing


def _photo(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, **save) -> Path:
    """Smooth colour fields plus noise (JPEG-like content), ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 10, (h, w, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(path, "JPEG", quality=90, **save)
    return path


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)"))]


@pytest.fixture()
def jpegs(tmp_path) -> list[Path]:
    return [
        _photo(tmp_path / "wide.jpg", (160, 120)),
        _photo(tmp_path / "wide2.jpg", (160, 120), seed=1),  # same size: resized together
        _photo(tmp_path / "tall.jpg", (50, 90), seed=2),  # upscaled
        _photo(tmp_path / "grey.jpg", (100, 100), mode="L", seed=3),
        _photo(tmp_path / "exact.jpg", (64, 64), seed=4),  # already the model's size
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_device_decoding_matches_pil(jpegs, device):
    """On the CPU decoding gives PIL's pixels exactly (both libjpeg-turbo) and the tensor resize
    stays within two 8-bit levels of PIL's bicubic, a fifth of a level on average. nvJPEG's
    IDCT and chroma upsampling differ from libjpeg-turbo's: on an H100, 1.3 levels on average
    (10-13 at most) on the 160x120 images, 3.7 (20 at most) on the small upscaled one."""
    pre = Preprocessing(image_size=64)
    files = [read_jpeg(p) for p in jpegs]
    assert all(isinstance(f, bytes) for f in files)
    decoded = decode_jpegs(files, device)
    exact = device == "cpu"
    for path, img in zip(jpegs, decoded, strict=True):
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and img.device.type == device
        pil = torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)
        diff = (img.cpu().int() - pil.int()).abs()
        print(f"{device} decode {path.name}: max {int(diff.max())} mean {float(diff.float().mean()):.3f} levels")
        assert diff.max() <= (0 if exact else 32), path.name
        assert diff.float().mean() <= (0 if exact else 6), path.name
    ours = pre.from_uint8(decoded)  # (B, 3, 64, 64)
    assert ours.device.type == device
    ref = torch.stack([pre(load_image(p)) for p in jpegs])
    assert ours.shape == ref.shape == (len(jpegs), 3, 64, 64)
    levels = (ours.cpu() - ref).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255  # in 8-bit levels
    print(f"{device} preprocessed: max {float(levels.max()):.2f} mean {float(levels.mean()):.3f} levels")
    assert levels.max() <= (2.01 if exact else 32.01)
    assert levels.mean() < (0.3 if exact else 6.0)
    if exact:
        assert torch.equal(ours[4], ref[4])  # no resize: identical


def test_read_jpeg_leaves_what_it_cannot_reproduce_to_pil(tmp_path, jpegs):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    rgb.save(tmp_path / "image.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _photo(tmp_path / "rotated.jpg", (60, 40), exif=exif)
    exif[0x0112] = 1
    _photo(tmp_path / "upright.jpg", (60, 40), exif=exif)
    (tmp_path / "png-named.jpg").write_bytes((tmp_path / "image.png").read_bytes())
    (tmp_path / "text.jpg").write_text("not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = jpegs[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 4 // 5])  # nvJPEG would decode it
    names = ("image.png", "cmyk.jpg", "rotated.jpg", "png-named.jpg", "text.jpg", "empty.jpg", "missing.jpg",
             "cut.jpg")
    for name in names:
        assert read_jpeg(tmp_path / name) is None, name
    assert read_jpeg(tmp_path / "upright.jpg") is not None
    assert read_jpeg(jpegs[3]) is not None  # greyscale: decoded to RGB as PIL's convert does


@pytest.mark.parametrize("device", DEVICES)
def test_one_corrupt_file_costs_only_itself(jpegs, device):
    files = [read_jpeg(jpegs[0]), b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9", read_jpeg(jpegs[1])]
    out = decode_jpegs(files, device)
    assert [o is None for o in out] == [False, True, False]
    assert decode_jpegs([], device) == []


def test_decoding_warns_nothing_and_installs_no_filter(jpegs, monkeypatch):
    """Decoding goes through TorchCodec, not torchvision's decoders (deprecated since 0.29): with
    every filter reset, importing captioner.data.jpeg and decoding warn nothing, and no
    ``catch_warnings`` (not thread-safe beside the reader threads) is entered."""
    import importlib

    import captioner.data.jpeg as jpeg

    files = [read_jpeg(p) for p in jpegs[:2]]
    entered = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        importlib.reload(jpeg)  # without pytest's configured filters
        with monkeypatch.context() as m:
            m.setattr(warnings, "catch_warnings", lambda *a, **k: entered.append(a) or pytest.fail("entered"))
            decoded = jpeg.decode_jpegs(files, "cpu")
    assert not entered and all(d is not None for d in decoded)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_from_uint8_rejects_bad_tensors():
    pre = Preprocessing(image_size=8)
    with pytest.raises(ValueError, match="at least one"):
        pre.from_uint8([])
    with pytest.raises(ValueError, match=r"image 1: expected a \(3, H, W\) uint8"):
        pre.from_uint8([torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 4)])


@pytest.mark.parametrize("device", DEVICES)
def test_caption_paths_on_device_decoding(tiny_checkpoint, tmp_path, shapes_dir, device):
    """jpeg_decode="device": PNGs and unusual JPEGs still go through PIL, bad files are named as
    on the PIL path, every good image is captioned, in input order."""
    from captioner.checkpoint import load_checkpoint
    from captioner.inference import CaptionPipeline

    folder = tmp_path / "mixed"
    folder.mkdir()
    pngs = []
    for i, src in enumerate(sorted((shapes_dir / "images").glob("*.png"))[:3]):
        pngs.append(folder / f"s{i}.png")
        shutil.copy(src, pngs[-1])
    jpgs = []
    for i, png in enumerate(pngs):  # the same scenes as JPEGs, one upscaled
        im = Image.open(png).convert("RGB")
        jpgs.append(folder / f"s{i}.jpg")
        (im.resize((96, 96), Image.BICUBIC) if i == 2 else im).save(jpgs[-1], "JPEG", quality=95)
    data = jpgs[2].read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) * 4 // 5])  # header intact, data cut
    (folder / "notes.jpg").write_text("not a picture")
    paths = [pngs[0], jpgs[0], folder / "cut.jpg", jpgs[1], pngs[1], folder / "notes.jpg", jpgs[2], pngs[2]]

    pipeline = CaptionPipeline(load_checkpoint(tiny_checkpoint, device=device), beam_size=2)
    assert pipeline.jpeg_on_device("auto") == (device == "cuda")  # PIL on a CPU unless asked
    with pytest.raises(ValueError, match="jpeg_decode must be one of"):
        pipeline.jpeg_on_device("gpu")
    cpu = _triples(pipeline.stream(paths, batch_size=3, jpeg_decode="cpu"))
    dev = _triples(pipeline.stream(paths, batch_size=3, jpeg_decode="device", num_workers=2))
    assert [p for p, _, _ in dev] == paths
    errors = {p.name: e for p, _, e in dev if e is not None}
    assert set(errors) == {"cut.jpg", "notes.jpg"}
    assert "truncated image" in errors["cut.jpg"] and "not an image" in errors["notes.jpg"]
    for (p, c1, e1), (_, c2, e2) in zip(dev, cpu, strict=True):
        assert e1 == e2
        if p.suffix == ".png" or (device == "cpu" and p in jpgs[:2]):  # identical pixels
            assert (c1.words, c1.score) == (c2.words, c2.score), p
            torch.testing.assert_close(c1.alphas, c2.alphas)
        elif c1 is not None and device == "cpu":  # resized within two levels: the same words
            assert c1.words == c2.words, p
        elif c1 is not None:  # nvJPEG's pixels differ a little more: a caption all the same
            assert c1.words


def test_a_jpeg_the_device_cannot_decode_goes_through_pil(tiny_checkpoint, jpegs, monkeypatch):
    """If the device decoder fails on a file read_jpeg accepted, PIL reads it (or names the
    problem); the other images of the batch are unaffected."""
    import captioner.data.jpeg as jpeg
    from captioner.checkpoint import load_checkpoint
    from captioner.inference import CaptionPipeline

    real = jpeg.decode_jpegs

    def failing_second(files, device):
        out = real(files, device)
        out[1] = None
        return out

    monkeypatch.setattr(jpeg, "decode_jpegs", failing_second)
    pipeline = CaptionPipeline(load_checkpoint(tiny_checkpoint, device="cpu"), beam_size=1)
    dev = _triples(pipeline.stream(jpegs, batch_size=len(jpegs), jpeg_decode="device"))
    pil = _triples(pipeline.stream(jpegs, batch_size=len(jpegs), jpeg_decode="cpu"))
    assert [p for p, _, _ in dev] == jpegs and all(e is None for _, _, e in dev)
    assert dev[1][1].words == pil[1][1].words and dev[1][1].score == pil[1][1].score


def _triples(results):
    """pipeline.stream's results as (path, first caption or None, error or None)."""
    from captioner.inference import ImageError

    return [(r.image, None, r.reason) if isinstance(r, ImageError) else (r[0].image, r[0], None) for r in results]


def test_without_torchcodec_device_decoding_says_what_to_install(tiny_checkpoint, monkeypatch):
    from captioner.checkpoint import load_checkpoint
    from captioner.inference import CaptionPipeline

    monkeypatch.setattr("captioner.data.jpeg.torchcodec_missing", lambda: "decoding JPEGs on the device "
                        "needs TorchCodec (pip install 'captioner[torchcodec]'): No module named 'torchcodec'")
    pipeline = CaptionPipeline(load_checkpoint(tiny_checkpoint, device="cpu"), beam_size=1)
    with pytest.raises(ValueError, match=r"--jpeg-decode device: .*captioner\[torchcodec\]"):
        pipeline.jpeg_on_device("device")
    assert pipeline.jpeg_on_device("auto") is False and pipeline.jpeg_on_device("cpu") is False
