"""Shared fixtures: a tiny generated `shapes` data set and a tiny trained-for-a-few-steps checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioner.data.shapes import ShapesConfig, generate_shapes


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_cli_log_handler_left():
    """``captioner.cli.main`` gives the root logger a handler on the test's (captured) stderr;
    remove it after the test, or a later test's log lines are written to a closed stream."""
    import logging

    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_captioner", False)]:
        root.removeHandler(handler)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """80 shapes images at 32 px, made once per test session."""
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes(out, ShapesConfig(num_images=80, seed=1, image_size=32))
    return out


def fit_args(shapes_dir: Path, root: Path, *extra: str) -> list[str]:
    """Arguments for a tiny, fast `captioner fit` on the session's shapes images."""
    return [
        "fit", "--config", str(Path(__file__).parent.parent / "configs" / "shapes.yaml"),
        "--data.shapes.data_dir", str(shapes_dir), "--data.shapes.image_size", "32",
        "--data.num_workers", "0", "--data.batch_size", "8", "--data.eval_batch_size", "8",
        "--data.min_count", "1",
        "--model.encoder.channels", "16", "--model.encoder.grid", "4", "--model.encoder.image_size", "32",
        "--model.decoder.embed_dim", "16", "--model.decoder.attention_dim", "16",
        "--model.decoder.decoder_dim", "16", "--model.optim.warmup_steps", "0",
        "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.max_time", "null",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_dir, tmp_path_factory) -> Path:
    """A checkpoint from 8 epochs of `captioner fit` on 64 training images (seconds)."""
    from captioner.cli import main

    root = tmp_path_factory.mktemp("run")
    main(fit_args(shapes_dir, root, "--trainer.max_epochs", "8", "--model.optim.lr", "0.01"))
    ckpt = root / "checkpoints" / "best.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (root / "checkpoints").iterdir())
    return ckpt
