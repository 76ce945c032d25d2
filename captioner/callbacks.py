"""Training callbacks that belong to the model rather than to checkpointing."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from captioner.settings import NonNegativeInt, check_arguments

logger = logging.getLogger(__name__)


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, norms: Sequence[_BatchNorm], batches: Iterable[Tensor]) -> None:
    """Replace the running statistics of ``norms`` (BatchNorm layers inside ``module``) by their
    plain average over ``batches`` run through ``module`` with its current weights ("precise BN").
    Every other layer stays in its current mode; momenta and modes are restored afterwards."""
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    for images in batches:
        module(images)
    for m, (momentum, training) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.train(training)


class PreciseBatchNorm(L.Callback):
    """Before each validation, re-estimate the encoder's BatchNorm statistics with its current
    weights over a fixed sample of ``batches`` training batches ("precise BN").

    The running averages (momentum 0.1) trail the weights; at the learning rates that train
    ``shapes`` in 10 minutes they trail far enough that the eval-mode model captions much worse
    than its weights deserve (docs/results.md, "Seeds"), so validation CIDEr-D swung between
    epochs and the best checkpoint was chosen on that noise. Training is not
    changed: it normalises with each batch's own statistics. Only layers that update their
    statistics while training are touched (a frozen backbone's are not). The sample is drawn with
    ``seed`` from the training split, the same at every validation and after a resume; its images
    are kept in memory when they take at most ``cache_mb``. A feature cache has no images and
    nothing to do; ``batches: 0`` turns it off.
    """

    def __init__(self, batches: NonNegativeInt = 8, seed: int = 0, cache_mb: NonNegativeInt = 64) -> None:
        check_arguments(PreciseBatchNorm.__init__, "precise_bn", {"batches": batches, "cache_mb": cache_mb})
        self.batches = batches
        self.seed = seed
        self.cache_mb = cache_mb
        self._cache: list[Tensor] | None = None

    def sample(self, datamodule) -> list[Tensor]:
        """The training images used, as batches (B, 3, S, S) on the CPU; unreadable ones left out."""
        if self._cache is not None:
            return self._cache
        if not self.batches or getattr(datamodule, "feature_cache", None) or not hasattr(datamodule, "dataset_for"):
            return []
        from captioner.data.datamodule import collate_captions
        from captioner.data.images import ImageLoadError

        ds = datamodule.dataset_for("train", mode="first", grounding=False)  # images are all it needs
        size = datamodule.batch_size
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))
        order = order[: self.batches * size].tolist()

        def item(i: int):
            try:
                return ds[i]
            except ImageLoadError:  # validation must not stop on one bad training image
                return None

        out = []
        for k in range(0, len(order), size):
            batch = collate_captions([item(i) for i in order[k:k + size]])
            if batch:
                out.append(batch["images"])
        if sum(x.numel() * x.element_size() for x in out) <= self.cache_mb * 2**20:
            self._cache = out
        return out

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.batches:
            return
        encoder = pl_module.model.encoder
        was_training = encoder.training
        encoder.train()  # which layers would update their statistics while training
        norms = [m for m in encoder.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
        encoder.train(was_training)
        batches = self.sample(trainer.datamodule) if norms else []
        if batches:
            recompute_batchnorm(encoder, norms, (x.to(pl_module.device) for x in batches))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def scale_lines(world_size: int, devices: int, nodes: int, batch_size: int, accumulate: int,
                lr: float, encoder_lr: float | None) -> list[str]:
    """What ``fit`` says when it starts: processes, batch per device and in all, learning rates.
    ``devices``: per node; ``encoder_lr``: None when the encoder trains nothing (frozen)."""
    total = batch_size * world_size * accumulate
    per_step = f"{batch_size} per device x {_plural(world_size, 'process')}"
    if accumulate > 1:
        per_step += f" x {accumulate} accumulated batches"
    rates = f"lr {lr:g} (decoder)" + (f", {encoder_lr:g} (encoder)" if encoder_lr is not None else ", encoder frozen")
    lines = [f"fit: {_plural(world_size, 'process')} ({_plural(devices, 'device')} x {_plural(nodes, 'node')}), "
             f"global batch {total} ({per_step}); {rates}"]
    if world_size > 1:
        lines.append(f"fit: the learning rates are used as given, not scaled with the {world_size}x larger "
                     "global batch; docs/training.md#scaling-to-many-devices says how to scale them")
    return lines


class ScaleReport(L.Callback):
    """Says on rank 0, when ``fit`` starts, how many processes share each step and with what
    batch and learning rates: Lightning's ``devices: auto`` takes every GPU, and the global batch
    grows with them while the learning rates stay as configured."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        optim = pl_module.optim
        trains_encoder = any(p.requires_grad for p in pl_module.model.encoder.parameters())
        encoder_lr = (optim.encoder_lr if optim.encoder_lr is not None else optim.lr) if trains_encoder else None
        for line in scale_lines(trainer.world_size, trainer.num_devices, trainer.num_nodes,
                                trainer.datamodule.batch_size, trainer.accumulate_grad_batches,
                                optim.lr, encoder_lr):
            logger.info("%s", line)
