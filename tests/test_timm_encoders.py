"""The ``timm/`` and ``open_clip/`` encoder families: region grids, prefix tokens, preprocessing,
fine-tuning, the feature cache, training through the CLI, and refusing bad input in one line.

Every model is small and random (nothing is downloaded): timm's ``convnext_atto``, ``resnet18``,
``vit_tiny_patch16_224`` and ``deit_tiny_distilled_patch16_224`` (two prefix tokens), and two tiny
open_clip configs registered here (a ViT and a ModifiedResNet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from captioner.cli import main
from captioner.data.features import FeatureStore
from captioner.models.encoder import (
    ENCODERS,
    EncoderConfig,
    WeightsUnavailable,
    create_encoder,
    encoder_preprocessing,
)
from captioner.viz.attention_maps import attention_json, upsample_map
from tests.conftest import fit_args
from tests.test_models import assert_split_stem_splits

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

# tiny CLIP towers: a 2-layer ViT with 8 px patches, a ModifiedResNet of one block per layer
TINY_CLIP = {
    "tiny-clip-vit": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "tiny-clip-rn": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_clip_configs(tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("open_clip")
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    for name, vision in TINY_CLIP.items():
        (folder / f"{name}.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(folder)


def _encode(name: str, size: int, grid: int, **kw) -> tuple[torch.Tensor, tuple[int, int], object]:
    enc = create_encoder(EncoderConfig(name=name, image_size=size, grid=grid, **kw)).eval()
    with torch.no_grad():
        regions, hw = enc(torch.randn(2, 3, size, size))
    return regions, hw, enc


@pytest.mark.parametrize(("name", "size", "grid", "dim"), [
    ("timm/convnext_atto", 64, 2, 320),  # last map 2x2 (stride 32), as it is
    ("timm/resnet18", 64, 4, 512),  # 2x2 pooled up to 4x4
    ("timm/vit_tiny_patch16_224", 64, 4, 192),  # 4x4 patches
    ("timm/vit_tiny_patch16_224", 48, 3, 192),  # another size: position embeddings resampled
    ("timm/deit_tiny_distilled_patch16_224", 64, 4, 192),  # class + distillation token dropped
    ("open_clip/tiny-clip-vit", 32, 4, 32),  # 4x4 patches of 8 px
    ("open_clip/tiny-clip-vit", 48, 6, 32),
    ("open_clip/tiny-clip-rn", 64, 2, 256),  # the map before attention pooling (width 8 * 32)
])
def test_regions_on_the_grid(name: str, size: int, grid: int, dim: int) -> None:
    regions, hw, enc = _encode(name, size, grid)
    assert regions.shape == (2, grid * grid, dim) and hw == (grid, grid)
    assert enc.out_dim == dim and torch.isfinite(regions).all()


def test_cnn_stage_picks_an_earlier_map() -> None:
    regions, hw, enc = _encode("timm/convnext_atto", 64, 8, stage=1)  # stride 8: 8x8 x 80
    assert regions.shape == (2, 64, 80) and hw == (8, 8)
    assert not hasattr(enc.net, "stages") or len(enc.net.stages) == 2  # later stages pruned


def _isolate_patches(enc) -> None:
    """Remove everything that mixes patches (blocks, position embeddings), so region k can only
    come from the pixels of patch k."""
    if hasattr(enc, "net"):  # timm ViT
        enc.net.blocks = torch.nn.Sequential()
        enc.net.pos_embed.data.zero_()
    else:  # open_clip ViT
        enc.visual.transformer.resblocks = torch.nn.ModuleList()
        enc.visual.positional_embedding.data.zero_()


@pytest.mark.parametrize(("name", "size", "patch"), [
    ("timm/vit_tiny_patch16_224", 64, 16),
    ("timm/deit_tiny_distilled_patch16_224", 64, 16),
    ("open_clip/tiny-clip-vit", 32, 8),
])
def test_each_region_is_its_own_patch(name: str, size: int, patch: int) -> None:
    """Prefix tokens dropped and patches laid row by row: changing the pixels of patch (i, j)
    changes region i * w + j only, and an attention map that puts all weight on that region lands
    on that patch's pixels in the attend figure."""
    grid = size // patch
    enc = create_encoder(EncoderConfig(name=name, image_size=size, grid=grid)).eval()
    _isolate_patches(enc)
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before, hw = enc(images)
        for i, j in [(0, 0), (0, grid - 1), (grid - 1, 1), (1, 2)]:
            changed = images.clone()
            changed[..., i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] += 1.0
            after, _ = enc(changed)
            moved = (after - before).abs().amax(-1)[0]  # (N,)
            k = i * hw[1] + j
            assert moved[k] > 1e-3 and torch.count_nonzero(moved > 1e-5) == 1, (i, j, moved)
            alpha = torch.zeros(hw[0] * hw[1])
            alpha[k] = 1.0
            (frame,) = attention_json(["word"], alpha[None], hw)["maps"]
            shown = upsample_map(np.asarray(frame), (size, size), smooth=False)  # (H, W)
            assert shown[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].sum() == pytest.approx(shown.sum())


def test_preprocessing_from_the_pretrained_config() -> None:
    vit = encoder_preprocessing(EncoderConfig(name="timm/vit_tiny_patch16_224"))
    assert (vit.image_size, vit.mean, vit.interpolation) == (224, [0.5] * 3, "bicubic")
    tv = encoder_preprocessing(EncoderConfig(name="timm/resnet18.tv_in1k", image_size=96))
    assert tv.image_size == 96 and tv.interpolation == "bilinear"
    assert tv.mean == pytest.approx([0.485, 0.456, 0.406])
    clip = encoder_preprocessing(EncoderConfig(name="open_clip/ViT-B-16:openai"))
    assert clip.image_size == 224 and clip.mean == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    # the encoder built carries the same, which the checkpoint stores
    enc = create_encoder(EncoderConfig(name="timm/resnet18.tv_in1k", image_size=96, grid=2))
    assert enc.preprocessing == tv


@pytest.mark.parametrize(("name", "size", "units"), [
    ("timm/convnext_atto", 64, lambda e: e.net.stages),
    ("timm/vit_tiny_patch16_224", 32, lambda e: e.net.blocks),
    ("open_clip/tiny-clip-vit", 32, lambda e: e.visual.transformer.resblocks),
])
def test_trainable_blocks_fine_tunes_the_last_ones(name: str, size: int, units) -> None:
    enc = create_encoder(EncoderConfig(name=name, image_size=size, grid=2, trainable_blocks=1))
    blocks = list(units(enc))
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not any(p.requires_grad for b in blocks[:-1] for p in b.parameters())
    frozen = create_encoder(EncoderConfig(name=name, image_size=size, grid=2))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in create_encoder(
        EncoderConfig(name=name, image_size=size, grid=2, trainable_blocks=-1)).parameters())


@pytest.mark.parametrize(("name", "size", "grid"), [
    ("timm/convnext_atto", 64, 2),  # a CNN stem with a bias
    ("timm/vit_tiny_patch16_224", 32, 2),  # the patch embedding
    ("open_clip/tiny-clip-vit", 32, 4),
    ("open_clip/tiny-clip-rn", 64, 2),
])
def test_split_stem_on_every_family(name: str, size: int, grid: int) -> None:
    assert_split_stem_splits(name, size, grid)


def test_families_are_listed(capsys) -> None:
    assert "timm/anything" in ENCODERS and "open_clip/x" in ENCODERS and "timm/" not in ENCODERS
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "timm/<model>" in out and "open_clip/<model>" in out and "captioner[clip]" in out


def _write_config(path: Path, shapes_dir: Path, encoder: dict) -> Path:
    cfg = {"model": {"encoder": encoder},
           "data": {"dataset": "shapes", "shapes": {"data_dir": str(shapes_dir), "image_size": 32},
                    "min_count": 1, "num_workers": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_feature_cache_then_fit_from_it(shapes_dir, tmp_path, capsys) -> None:
    encoder = {"name": "timm/convnext_atto", "grid": 2, "image_size": 64, "trainable_blocks": 0}
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir, encoder)
    out = tmp_path / "cache"
    assert main(["features", "extract", "--config", str(cfg), "--out", str(out), "--device", "cpu",
                 "--batch-size", "16", "--splits", "train", "val"]) == 0
    capsys.readouterr()
    index = json.loads((out / "index.json").read_text())
    assert index["grid"] == [2, 2] and index["dim"] == 320 and index["encoder"]["name"] == "timm/convnext_atto"
    assert index["preprocessing"] == encoder_preprocessing(EncoderConfig(**encoder)).to_dict()
    store = FeatureStore(out)
    assert store.get(index["splits"]["val"][0]).shape == (4, 320)
    root = tmp_path / "run"
    assert main(fit_args(shapes_dir, root, *[f"--model.encoder.{k}={v}" for k, v in encoder.items()],
                         "--data.feature_cache", str(out), "--trainer.max_steps", "3",
                         "--trainer.limit_val_batches", "1")) == 0
    assert (root / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(("name", "size", "grid", "stem"), [
    ("timm/vit_tiny_patch16_224", 32, 2, "rgb"),
    ("open_clip/tiny-clip-rn", 64, 2, "split"),  # the split conv and colour path come back too
])
def test_fit_a_few_steps_then_caption(name: str, size: int, grid: int, stem: str, shapes_dir, tmp_path,
                                      capsys) -> None:
    root = tmp_path / "run"
    assert main(fit_args(shapes_dir, root, "--model.encoder.name", name, "--model.encoder.image_size", str(size),
                         "--model.encoder.grid", str(grid), "--model.encoder.trainable_blocks", "1",
                         "--model.encoder.stem", stem,
                         "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1")) == 0
    ckpt = root / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["captioner"]["preprocessing"] == encoder_preprocessing(
        EncoderConfig(name=name, image_size=size)).to_dict()
    # a run on pretrained weights loads from its own state: no download, no weights file needed
    stored["hyper_parameters"]["encoder"].update(pretrained=True, weights_path="/nonexistent/weights.pth")
    torch.save(stored, ckpt)
    capsys.readouterr()
    image = next((shapes_dir / "images").iterdir())
    assert main(["caption", "--checkpoint", str(ckpt), "--device", "cpu", "--quantize", "int8", str(image)]) == 0
    path, caption = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and caption
    # the attend figure's raw maps are on the encoder's grid
    out = tmp_path / "attend.png"
    assert main(["attend", "--checkpoint", str(ckpt), str(image), "-o", str(out), "--json", "--device", "cpu"]) == 0
    maps = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and maps["grid"] == [grid, grid]


def _one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()  # info lines (the data read) may come first
    errors = [line for line in err.splitlines() if line.startswith("captioner: error:")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(("encoder", "needles"), [
    ({"name": "timm/convnext_atoo"}, ["unknown model", "convnext_atto"]),
    ({"name": "open_clip/ViT-B-61:openai"}, ["unknown model", "ViT-B-16:openai"]),
    ({"name": "open_clip/ViT-B-16:nope"}, ["no pretrained tag 'nope'", "openai"]),
    ({"name": "timm/vit_tiny_patch16_224", "image_size": 50}, ["image_size 50", "multiple of 16"]),
    ({"name": "timm/resnet18", "image_size": 32, "weights_path": "/nonexistent/r18.pth"},
     ["/nonexistent/r18.pth"]),
])
def test_bad_encoder_settings_fail_in_one_line(encoder: dict, needles: list[str], shapes_dir, tmp_path,
                                               capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir, {"grid": 2, "trainable_blocks": 0, **encoder})
    err = _one_line_error(capsys, ["features", "extract", "--config", str(cfg), "--out", str(tmp_path / "c")])
    assert all(n in err for n in needles), err


def test_weights_that_cannot_be_downloaded_name_weights_path(monkeypatch) -> None:
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We have no connection to huggingface.co")
        return create_model(*args, **kwargs)

    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsUnavailable, match="model.encoder.weights_path"):
        create_encoder(EncoderConfig(name="timm/resnet18", image_size=32, pretrained=True))
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("offline")))
    with pytest.raises(WeightsUnavailable, match="model.encoder.weights_path"):
        create_encoder(EncoderConfig(name="open_clip/RN50:openai", image_size=64, pretrained=True))


@pytest.mark.parametrize(("name", "extra"), [("timm/resnet18", "timm"), ("open_clip/RN50", "clip")])
def test_missing_extra_says_what_to_install(name: str, extra: str, monkeypatch, shapes_dir, tmp_path,
                                            capsys) -> None:
    monkeypatch.setitem(sys.modules, name.split("/")[0], None)  # import fails as if not installed
    cfg = _write_config(tmp_path / "cfg.yaml", shapes_dir, {"name": name, "grid": 2})
    err = _one_line_error(capsys, ["features", "extract", "--config", str(cfg), "--out", str(tmp_path / "c")])
    assert f"pip install 'captioner[{extra}]'" in err
