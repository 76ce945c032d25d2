"""The optimiser and its schedule: ``OptimConfig`` (``model.optim``) and ``build_optimizer``, the one
place a run's optimiser is made (``CaptioningSystem.configure_optimizers`` returns what it builds)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from captioner.settings import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    UnitInterval,
    check_fields,
)

# the optimisers and schedules a run can name (model.optim.optimizer, model.optim.scheduler)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
Optimizer = Literal["adam", "adamw", "rmsprop"]
Scheduler = Literal["none", "cosine", "step", "plateau"]


@dataclass
class OptimConfig:
    """Adam(W) with separate learning rates for the encoder and the decoder, and a schedule."""

    lr: PositiveFloat = 4e-4
    encoder_lr: PositiveFloat | None = None  # None: same as lr
    weight_decay: NonNegativeFloat = 0.0
    optimizer: Optimizer = "adam"  # rmsprop: the paper's Flickr choice
    scheduler: Scheduler = "none"  # plateau: on val CIDEr-D
    step_size: PositiveInt = 10  # epochs, "step"
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.8  # "step" and "plateau" decay
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: UnitInterval = 0.05  # "cosine" floor
    # "time": with trainer.max_time set, the cosine decay's progress is the larger of the steps'
    # share and the time budget's share used, so a run stopped by its time ends decayed (and one
    # that reaches max_epochs first ends as "steps" would). Warm-up stays counted in steps.
    schedule_by: Literal["steps", "time"] = "steps"

    def __post_init__(self) -> None:
        check_fields(self, "model.optim")


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: Callable[[], float]):
    """The optimiser of ``model``'s trainable parameters (the decoder's at ``lr``, the encoder's, when
    any, at ``encoder_lr``) and its schedule, in the form ``LightningModule.configure_optimizers``
    returns: the optimiser alone, or a dict with its ``lr_scheduler``. ``total_steps()`` (the run's
    optimiser steps) is asked only by the cosine schedule, which ends with the run."""
    o = config
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    dec = [p for p in model.decoder.parameters() if p.requires_grad]
    groups = [{"params": dec, "lr": o.lr}]
    if enc:
        groups.append({"params": enc, "lr": o.encoder_lr if o.encoder_lr is not None else o.lr})
    optimizer = OPTIMIZERS[o.optimizer](groups, weight_decay=o.weight_decay)
    if o.scheduler == "none" and not o.warmup_steps:
        return optimizer
    if o.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=o.gamma, patience=2)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "monitor": "val/CIDEr"}}
    if o.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, o.step_size, o.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    total = max(1, int(total_steps())) if o.scheduler == "cosine" else None
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(o.warmup_steps, total, o.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WarmupCosine:
    """Linear warm-up, then cosine decay to ``floor`` (constant when ``total`` is None).
    A class rather than a lambda so that the scheduler's state stays picklable-free: its state is
    plain numbers, ``budget_used`` among them (the share of a time budget spent, in [0, 1], set from
    outside by whoever keeps the clock; the decay's progress is at least that share)."""

    def __init__(self, warmup: int, total: int | None, floor: float) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor
        self.budget_used = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total is None:
            return 1.0
        progress = min(1.0, max((step - self.warmup) / max(1, self.total - self.warmup), self.budget_used))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_budget_used(scheduler, share: float) -> None:
    """Tell a ``WarmupCosine`` schedule (``build_optimizer``'s) that ``share`` of the run's time
    budget is spent; other schedules do not follow time."""
    for fn in getattr(scheduler, "lr_lambdas", ()):
        if isinstance(fn, WarmupCosine):
            fn.budget_used = min(1.0, max(0.0, share))
