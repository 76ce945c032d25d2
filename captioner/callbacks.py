"""Training callbacks that belong to the model rather than to checkpointing."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


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
    weights over the images of the last ``batches`` training batches (kept on their device).

    The running averages (momentum 0.1) trail the weights; at the learning rates that train
    ``shapes`` in 10 minutes they trail far enough that the eval-mode model captions much worse
    than its weights deserve (on one mid-training checkpoint: 39 % validation exact match with the
    running averages, 62 % with statistics re-estimated on 640 training images), so validation
    CIDEr-D swung between epochs and the best checkpoint was chosen on that noise. Training is not
    changed: it normalises with each batch's own statistics. Only layers that update their
    statistics during training are touched (a frozen backbone's are not); a feature cache has no
    images and nothing to do. ``batches: 0`` turns it off.
    """

    def __init__(self, batches: int = 8) -> None:
        if batches < 0:
            raise ValueError(f"precise_bn.batches must be >= 0, got {batches}")
        self.batches = batches
        self._images: deque[Tensor] = deque(maxlen=max(batches, 1))
        self._norms: list[_BatchNorm] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.batches or not isinstance(batch, dict) or "images" not in batch:
            return
        self._images.append(batch["images"].detach())
        if not self._norms:  # the layers that are in training mode while training
            self._norms = [m for m in pl_module.model.encoder.modules()
                           if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._images or not self._norms:
            return
        recompute_batchnorm(pl_module.model.encoder, self._norms, list(self._images))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._norms = []  # found again on the next batch (the module may have been replaced)
