"""Every shipped config trains through ``captioner fit`` for a few steps, small and offline, and its
checkpoint records the config's own optimiser, schedule, loss, attention and decoding.

Each run overrides only size (images, widths, batches, epochs), where the data and the pretrained
weights are (written here; nothing is downloaded) and the CPU; everything else is the config's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from captioner.cli import main
from captioner.models.encoder import EncoderConfig, encoder_trains
from tests.conftest import fit_args

CONFIGS_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))
EPOCHS, BATCHES = 2, 2  # 4 optimiser steps, a validation pass and an epoch-end schedule step per epoch

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}

# Captions from few words, so each is seen often enough for the configs' min_count (5).
COLOURS, SHAPES, SIDES = ("red", "blue"), ("square", "circle"), ("left", "right")


def _caption(i: int, j: int) -> str:
    return f"a {COLOURS[i % 2]} {SHAPES[(i + j) % 2]} on the {SIDES[j % 2]}"


def _image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (200 * (i % 2), 40 * i % 256, 200 * (1 - i % 2))).save(path)


# (split in the Karpathy file, how many images); restval goes to train unless the config says not
KARPATHY_SPLITS = (("train", 4), ("restval", 1), ("val", 2), ("test", 1))


def karpathy_set(root: Path) -> list[str]:
    """A Karpathy split file in COCO's layout (``filepath``, ``cocoid``), JPEG and PNG images,
    five captions each -> the ``data.karpathy`` overrides that read it."""
    images, i = [], 0
    for split, n in KARPATHY_SPLITS:
        for _ in range(n):
            folder = "val2014" if split in ("val", "test") else "train2014"
            name = f"COCO_{folder}_{i:012d}.{'jpg' if i % 2 else 'png'}"
            _image(root / folder / name, i)
            images.append({"filepath": folder, "filename": name, "cocoid": 100 + i, "split": split,
                           "sentences": [{"tokens": _caption(i, j).split(), "raw": _caption(i, j)}
                                         for j in range(5)]})
            i += 1
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return ["--data.karpathy.split_file", str(root / "dataset.json"), "--data.karpathy.image_root", str(root)]


def coco_set(root: Path) -> list[str]:
    """COCO caption annotation files for train/val/test -> the ``data.coco`` overrides."""
    annotations, image_roots, i = {}, {}, 0
    for split, n in (("train", 5), ("val", 2), ("test", 1)):
        images, anns = [], []
        for _ in range(n):
            name = f"{i:012d}.jpg"
            _image(root / split / name, i)
            images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 40})
            anns += [{"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": _caption(i, j)} for j in range(5)]
            i += 1
        annotations[split] = str(root / f"captions_{split}.json")
        image_roots[split] = str(root / split)
        Path(annotations[split]).write_text(json.dumps({"images": images, "annotations": anns}))
    return ["--data.coco.annotations", json.dumps(annotations), "--data.coco.image_roots", json.dumps(image_roots)]


def tiny_fit_args(config: Path, settings: dict, dataset: str, shapes_dir: Path, tmp: Path) -> list[str]:
    """``captioner fit --config config`` made small, offline and CPU-only, on tiny data read by
    the ``dataset`` source (the config's own unless a test says otherwise)."""
    run = tmp / "run"
    common = [
        "--data.dataset", dataset,
        "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
        # 1 reaches Lightning as 1.0 (its Trainer types it float | int), i.e. every batch: the
        # val splits here are one batch each (shapes: 8 images at 8 a batch, karpathy/coco: 2 at 2)
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        # a config may ask for a GPU and its mixed precision
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    ]
    if dataset == "shapes":  # the session's 80 shapes images and conftest's small shapes_cnn
        args = fit_args(shapes_dir, run, *common)
        assert args[:2] == ["fit", "--config"], args[:3]
        return ["fit", "--config", str(config), *args[3:]]
    assert settings["model"]["encoder"]["name"] != "shapes_cnn", "shapes_cnn on other data: add its sizes here"
    data = {"karpathy": karpathy_set, "coco": coco_set}[dataset](tmp / "data")
    return [
        "fit", "--config", str(config), *data, *common,
        "--data.batch_size", "2", "--data.eval_batch_size", "2", "--data.num_workers", "0",
        "--data.feature_cache", "null",
        # The config's backbone (ResNet-101 for coco/flickr8k: 43 M weights, yet a few seconds at
        # this size), randomly initialised as nothing is downloaded here, on 32 px images: its
        # last map is 1 x 1, pooled to 2 x 2 regions so that attention has a choice.
        "--model.encoder.pretrained", "false", "--model.encoder.weights_path", "null",
        "--model.encoder.image_size", "32", "--model.encoder.grid", "2",
        "--model.decoder.embed_dim", "16", "--model.decoder.attention_dim", "16",
        "--model.decoder.decoder_dim", "16",
        "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.max_time", "null",
    ]


def _reference(cls, optim: dict) -> torch.optim.Optimizer:
    """``cls`` with the config's settings, stepped once on a probe (its state has every key)."""
    probe = torch.zeros(2, 2, requires_grad=True)
    options = {"weight_decay": optim["weight_decay"]}
    if cls is torch.optim.Muon:
        options["adjust_lr_fn"] = "match_rms_adamw"
    elif cls is not torch.optim.RMSprop:
        options["betas"] = tuple(optim.get("betas", (0.9, 0.999)))
    reference = cls([probe], **options)
    probe.grad = torch.ones(2, 2)
    reference.step()
    return reference


def check_optimizer(state: dict, hp: dict) -> None:
    """The saved optimiser is the configured class with its settings, with the encoder's group
    only when the encoder trains, and it stepped every batch. muon: Muon's part (the hidden
    matrices) and AdamW's (the rest), each with its own groups and state."""
    optim = hp["optim"]
    groups = 1 + encoder_trains(EncoderConfig(**hp["encoder"]))  # the decoder's, then the encoder's
    lrs = (optim["lr"], optim["encoder_lr"] or optim["lr"])
    if optim["optimizer"] == "muon":
        parts = [(state["muon"], torch.optim.Muon), (state["adam"], torch.optim.AdamW)]
    else:
        parts = [(state, OPTIMIZERS[optim["optimizer"]])]
    for part, cls in parts:
        reference = _reference(cls, optim)
        # e.g. Adam / AdamW: decoupled_weight_decay, betas; RMSprop: alpha, momentum, centered
        expected = {k: v for k, v in reference.state_dict()["param_groups"][0].items() if k not in ("params", "lr")}
        if cls is torch.optim.Muon:  # the encoder (convolutions) may have no hidden matrix
            assert 1 <= len(part["param_groups"]) <= groups
        else:
            assert len(part["param_groups"]) == groups
        for group, lr in zip(part["param_groups"], lrs):
            assert {k: group[k] for k in expected} == expected, (cls.__name__, group)
            assert group.get("initial_lr", group["lr"]) == pytest.approx(lr)
        param_state = next(iter(part["state"].values()))
        assert set(param_state) == set(reference.state_dict()["state"][0]), (cls.__name__, set(param_state))
        if "step" in param_state:  # (Muon keeps its momentum only)
            assert int(param_state["step"]) == EPOCHS * BATCHES


def check_scheduler(ckpt: dict, optim: dict, saved_as_best: bool = False) -> None:
    """The configured schedule is in the checkpoint and has stepped: per batch for cosine, per
    epoch for step, per epoch on a real val/CIDEr for plateau.

    ``saved_as_best``: the last validation improved val/CIDEr, so ``last.ckpt`` was written by the
    best-checkpoint callback at the end of the last epoch, before Lightning stepped the plateau
    schedule for it (otherwise PeriodicCheckpoint writes it at train end, after that step)."""
    schedulers = ckpt["lr_schedulers"]
    if optim["scheduler"] == "none" and not optim["warmup_steps"]:
        assert schedulers == []
        return
    (state,) = schedulers
    if optim["scheduler"] == "plateau":
        assert state["mode"] == "max" and state["factor"] == pytest.approx(optim["gamma"])
        assert state["last_epoch"] == EPOCHS - saved_as_best
        if not saved_as_best:  # the best val/CIDEr it saw is the one the best checkpoint was chosen by
            (best_checkpoint,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
            assert state["best"] == pytest.approx(float(best_checkpoint["best_model_score"]))
        assert state["num_bad_epochs"] in (0, 1)
    elif optim["scheduler"] == "step":
        assert (state["step_size"], state["last_epoch"]) == (optim["step_size"], EPOCHS)
        decays = EPOCHS // optim["step_size"]
        assert state["_last_lr"][0] == pytest.approx(optim["lr"] * optim["gamma"] ** decays)
    else:  # cosine, wsd (or warm-up alone): a LambdaLR stepped every optimiser step
        assert state["last_epoch"] == EPOCHS * BATCHES
        assert state["_last_lr"][0] != pytest.approx(optim["lr"])


def check_config_kept(settings: dict, hp: dict, args: list[str]) -> None:
    """What the config file says of the optimiser, schedule, loss, decoding and attention is in
    the checkpoint, except the settings the run overrode on purpose."""
    overridden = {a[2:] for a in args if a.startswith("--model.")}
    model = settings["model"]
    kept = [(s, k, v) for s in ("optim", "loss", "decoding", "scst") for k, v in model.get(s, {}).items()]
    kept += [("decoder", k, model["decoder"][k]) for k in ("attention", "num_heads", "semi_sampling")
             if k in model["decoder"]]
    kept += [("encoder", k, model["encoder"][k]) for k in ("name", "trainable_blocks") if k in model["encoder"]]
    for section, key, value in kept:
        if f"model.{section}.{key}" not in overridden:
            assert hp[section][key] == value, f"model.{section}.{key}"


def base_checkpoint(config: Path, shapes_dir: Path, tmp_path: Path) -> list[str]:
    """A fine-tuning config (``<name>-scst.yaml``) starts from a checkpoint of ``<name>.yaml``:
    made here at the same tiny size on the same data -> its ``--model.init_from``."""
    if not config.stem.endswith("-scst"):
        return []
    base = config.with_name(config.stem.removesuffix("-scst") + ".yaml")
    settings = yaml.safe_load(base.read_text())
    args = tiny_fit_args(base, settings, settings["data"]["dataset"], shapes_dir, tmp_path / "base")
    assert main([*args, "--trainer.max_epochs", "1"]) == 0
    return ["--model.init_from", str(tmp_path / "base" / "run" / "checkpoints" / "last.ckpt")]


def fit_and_check(config: Path, shapes_dir: Path, tmp_path: Path, capsys,
                  dataset: str | None = None, extra: tuple[str, ...] = ()) -> None:
    settings = yaml.safe_load(config.read_text())
    dataset = dataset or settings["data"]["dataset"]
    init = base_checkpoint(config, shapes_dir, tmp_path)
    args = [*tiny_fit_args(config, settings, dataset, shapes_dir, tmp_path), *init, *extra]
    assert main(args) == 0

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in last.parent.iterdir())
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == EPOCHS * BATCHES
    hp = ckpt["hyper_parameters"]
    check_config_kept(settings, hp, args)
    check_optimizer(ckpt["optimizer_states"][0], hp)
    best = torch.load(last.with_name("best.ckpt"), map_location="cpu", weights_only=True)
    check_scheduler(ckpt, hp["optim"], saved_as_best=best["global_step"] == EPOCHS * BATCHES)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["dataset"] == dataset

    capsys.readouterr()
    image = next((tmp_path / "data").rglob("*.jpg"), None) or next((shapes_dir / "images").iterdir())
    assert main(["caption", "--checkpoint", str(last), "--device", "cpu", str(image)]) == 0
    path, caption = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and caption


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_fits_a_few_steps(config: Path, shapes_dir, tmp_path, capsys) -> None:
    fit_and_check(config, shapes_dir, tmp_path, capsys)


def test_adamw_and_step_schedule_on_coco_files(shapes_dir, tmp_path, capsys) -> None:
    """No shipped config uses AdamW, StepLR or COCO's own annotation files (coco.yaml reads
    Karpathy's split file): coco.yaml with those three swapped in runs them."""
    fit_and_check(CONFIGS_DIR / "coco.yaml", shapes_dir, tmp_path, capsys, dataset="coco", extra=(
        "--model.optim.optimizer", "adamw", "--model.optim.weight_decay", "0.01",
        "--model.optim.scheduler", "step", "--model.optim.step_size", "1"))
