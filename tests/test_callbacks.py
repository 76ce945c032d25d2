"""Precise BatchNorm: validation sees statistics of the current weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from captioner.callbacks import PreciseBatchNorm, recompute_batchnorm
from tests.test_system import _batch, _system


def _stale_system():
    """A tiny system whose encoder weights moved after its running statistics were taken."""
    system = _system("soft")
    system.train()
    system.model.encode(_batch(b=8)["images"])  # running stats of the old weights
    with torch.no_grad():
        for p in system.model.encoder.parameters():
            p.mul_(1.5).add_(0.05)
    return system


def test_recomputed_statistics_make_eval_mode_match_the_batch_statistics() -> None:
    system = _stale_system()
    encoder = system.model.encoder
    images = _batch(b=16)["images"]
    encoder.train()
    with torch.no_grad():
        train_mode = encoder(images)[0]  # normalised with this batch's own statistics
    encoder.eval()
    with torch.no_grad():
        stale = encoder(images)[0]
    def rel(x):
        return ((x - train_mode).norm() / train_mode.norm()).item()

    assert rel(stale) > 1.0
    norms = [m for m in encoder.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    recompute_batchnorm(encoder, norms, [images])
    assert not encoder.training and all(not m.training for m in norms)
    assert [m.momentum for m in norms] == momenta
    with torch.no_grad():
        precise = encoder(images)[0]
    # equal up to the running variance being unbiased (n / (n - 1) per layer, n = 256 in the last)
    assert rel(precise) < 0.01


def test_statistics_are_the_average_over_the_kept_batches() -> None:
    system = _stale_system()
    encoder = system.model.encoder
    first = next(m for m in encoder.modules() if isinstance(m, _BatchNorm))
    a, b = _batch(b=8)["images"], _batch(b=8)["images"].flip(0) * 0.5
    recompute_batchnorm(encoder, [first], [a, b])
    conv = encoder.body[0][0]  # the first BatchNorm's input
    with torch.no_grad():
        means = [conv(x).mean(dim=(0, 2, 3)) for x in (a, b)]
    torch.testing.assert_close(first.running_mean, (means[0] + means[1]) / 2, atol=1e-5, rtol=1e-5)


def test_callback_uses_a_fixed_training_sample_before_validation(shapes_dir) -> None:
    from captioner.data.datamodule import CaptionDataModule
    from captioner.data.transforms import Preprocessing

    dm = CaptionDataModule(dataset="shapes", shapes={"data_dir": str(shapes_dir), "image_size": 32}, min_count=1,
                           batch_size=8, num_workers=0, preprocessing=Preprocessing(32))
    system = _stale_system().eval()
    cb = PreciseBatchNorm(batches=2)
    first = next(m for m in system.model.encoder.modules() if isinstance(m, _BatchNorm))
    before = first.running_mean.clone()
    cb.on_validation_epoch_start(SimpleNamespace(sanity_checking=True, datamodule=dm), system)
    assert torch.equal(first.running_mean, before)  # not during the sanity check
    cb.on_validation_epoch_start(SimpleNamespace(sanity_checking=False, datamodule=dm), system)
    after = first.running_mean.clone()
    assert not torch.equal(after, before)
    assert not system.model.encoder.training and not first.training
    # the same sample every time (and after a resume: a new callback draws the same images)
    again = PreciseBatchNorm(batches=2).sample(dm)
    assert [x.shape for x in again] == [(8, 3, 32, 32)] * 2
    for x, y in zip(cb.sample(dm), again, strict=True):
        assert torch.equal(x, y)
    cb.on_validation_epoch_start(SimpleNamespace(sanity_checking=False, datamodule=dm), system)
    torch.testing.assert_close(first.running_mean, after)
    # a feature cache has no images: nothing to do
    assert PreciseBatchNorm().sample(SimpleNamespace(feature_cache="cache/", batch_size=8)) == []
    with pytest.raises(ValueError, match="precise_bn.batches"):
        PreciseBatchNorm(batches=-1)


def test_fit_says_its_scale_at_start(shapes_dir, tmp_path, capsys) -> None:
    """One process: the global batch is the per-device batch times accumulation, the learning
    rates as configured, and no line about scaling them."""
    from captioner.cli import main
    from tests.conftest import fit_args

    args = fit_args(shapes_dir, tmp_path, "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
                    "--trainer.accumulate_grad_batches", "2", "--model.optim.lr", "0.002",
                    "--model.optim.encoder_lr", "0.0005")
    assert main(args) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fit: ")]
    assert lines == ["fit: 1 process (1 device x 1 node), global batch 16 (8 per device x 1 process "
                     "x 2 accumulated batches); lr 0.002 (decoder), 0.0005 (encoder)"], lines


def test_scale_lines_of_many_processes_say_the_lr_is_not_scaled() -> None:
    from captioner.callbacks import scale_lines

    first, second = scale_lines(world_size=16, devices=8, nodes=2, batch_size=64, accumulate=1,
                                lr=4e-4, encoder_lr=None)
    assert first == ("fit: 16 processes (8 devices x 2 nodes), global batch 1024 (64 per device x 16 processes); "
                     "lr 0.0004 (decoder), encoder frozen")
    assert "not scaled" in second and "16x" in second and "docs/training.md" in second
    assert len(scale_lines(1, 1, 1, 64, 1, 4e-4, 1e-4)) == 1
