"""The optimiser and its schedule: ``OptimConfig`` (``model.optim``) and ``build_optimizer``, the one
place a run's optimiser is made (``CaptioningSystem.configure_optimizers`` returns what it builds)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from captioner.settings import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    UnitInterval,
    check_fields,
)

Optimizer = Literal["adam", "adamw", "rmsprop", "muon"]
Scheduler = Literal["none", "cosine", "wsd", "step", "plateau"]


@dataclass
class OptimConfig:
    """Adam(W) with separate learning rates for the encoder and the decoder, and a schedule."""

    lr: PositiveFloat = 4e-4
    encoder_lr: PositiveFloat | None = None  # None: same as lr
    weight_decay: NonNegativeFloat = 0.0
    # rmsprop: the paper's Flickr choice; muon: orthogonalised momentum for the hidden weight
    # matrices, AdamW (with ``betas``) for the rest (``MuonAdam``)
    optimizer: Optimizer = "adam"
    # Adam's (beta1, beta2); a lower beta2 (0.95..0.98) forgets old gradient scales sooner, which
    # damps the loss spikes of a high learning rate (docs/training.md, "Time to quality")
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    scheduler: Scheduler = "none"  # plateau: on val CIDEr-D
    step_size: PositiveInt = 10  # epochs, "step"
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.8  # "step" and "plateau" decay
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: UnitInterval = 0.05  # "cosine" and "wsd" floor
    # "wsd" (warm-up, stable, decay): the share of the run, at its end, over which the rate falls
    # linearly from lr to the floor; the rest after warm-up holds lr (Hu et al. 2024; Haegele et al. 2024)
    decay_fraction: Annotated[float, Range(gt=0, le=1)] = 0.2
    # "time": with trainer.max_time set, the cosine or wsd decay's progress is the larger of the steps'
    # share and the time budget's share used, so a run stopped by its time ends decayed (and one
    # that reaches max_epochs first ends as "steps" would). Warm-up stays counted in steps.
    schedule_by: Literal["steps", "time"] = "steps"

    def __post_init__(self) -> None:
        check_fields(self, "model.optim")


def _adam(groups: list[dict], o: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, betas=o.betas, weight_decay=o.weight_decay)


def _adamw(groups: list[dict], o: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=o.betas, weight_decay=o.weight_decay)


def _rmsprop(groups: list[dict], o: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, weight_decay=o.weight_decay)


def hidden_matrices(model: nn.Module) -> set[nn.Parameter]:
    """The weight matrices Muon orthogonalises: every 2-D weight with both sides above 1, but for
    the input and output layers - embeddings, and the layers that score the vocabulary (the
    decoder's ``output_layers()``) - which stay on AdamW (Jordan et al. 2024; Liu et al. 2025)."""
    outputs = {id(p) for layer in model.decoder.output_layers() for p in layer.parameters()}
    found = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() == 2 and min(p.shape) > 1 and id(p) not in outputs:
                found.add(p)
    return found


class MuonAdam(torch.optim.Optimizer):
    """Muon (torch.optim.Muon, Nesterov momentum 0.95, its update scaled to AdamW's RMS) on the
    hidden weight matrices, AdamW on the rest, as one optimiser: Lightning's automatic
    optimisation and the learning-rate schedules see one list of groups, each group of the
    settings split in two (its matrices, its other parameters) with the same ``lr``.

    The inner optimisers' own group dicts are the ones listed, so that a schedule setting ``lr``
    reaches both; and they share one ``state`` (their parameters are disjoint), so that moving the
    state to a device or saving it sees every parameter's."""

    def __init__(self, groups: list[dict], config: OptimConfig, matrices: set[nn.Parameter]) -> None:
        muon, adam = [], []
        for g in groups:
            params = list(g["params"])
            options = {k: v for k, v in g.items() if k != "params"}
            if mats := [p for p in params if p in matrices]:
                muon.append({**options, "params": mats})
            if rest := [p for p in params if p not in matrices]:
                adam.append({**options, "params": rest})
        self.muon = torch.optim.Muon(muon, weight_decay=config.weight_decay,
                                     adjust_lr_fn="match_rms_adamw") if muon else None
        self.adam = torch.optim.AdamW(adam, betas=config.betas, weight_decay=config.weight_decay) if adam else None
        super().__init__([p for g in groups for p in g["params"]], {})
        self._link()

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adam) if o is not None]

    def _link(self) -> None:
        self.param_groups = [g for o in self._inner() for g in o.param_groups]
        state = self.state
        for o in self._inner():
            state.update(o.state)
            o.state = state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self._inner():
            o.step()
        return loss

    def state_dict(self) -> dict:
        out = {}
        for name, o in (("muon", self.muon), ("adam", self.adam)):
            if o is None:
                out[name] = None
                continue
            own = {p for g in o.param_groups for p in g["params"]}
            o.state = defaultdict(dict, {p: v for p, v in self.state.items() if p in own})
            try:  # each inner optimiser packs only its own parameters' state
                out[name] = o.state_dict()
            finally:
                o.state = self.state
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"muon", "adam"}:
            raise ValueError("model.optim.optimizer: muon cannot resume from the state of another optimiser")
        for name, o in (("muon", self.muon), ("adam", self.adam)):
            if (o is None) != (state_dict[name] is None):
                raise ValueError(f"model.optim.optimizer: muon: the saved state and this model differ in "
                                 f"whether {name} has parameters")
            if o is not None:
                o.load_state_dict(state_dict[name])
        self.state = defaultdict(dict)
        self._link()


# model.optim.optimizer -> the optimiser of the parameter groups
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop,
    "muon": lambda groups, o, model: MuonAdam(groups, o, hidden_matrices(model)),
}


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: Callable[[], float]):
    """The optimiser of ``model``'s trainable parameters (the decoder's at ``lr``, the encoder's, when
    any, at ``encoder_lr``) and its schedule, in the form ``LightningModule.configure_optimizers``
    returns: the optimiser alone, or a dict with its ``lr_scheduler``. ``total_steps()`` (the run's
    optimiser steps) is asked only by the schedules that end with the run (cosine, wsd)."""
    o = config
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    dec = [p for p in model.decoder.parameters() if p.requires_grad]
    groups = [{"params": dec, "lr": o.lr}]
    if enc:
        groups.append({"params": enc, "lr": o.encoder_lr if o.encoder_lr is not None else o.lr})
    optimizer = OPTIMIZERS[o.optimizer](groups, o, model)
    if o.scheduler == "none" and not o.warmup_steps:
        return optimizer
    if o.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=o.gamma, patience=2)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "monitor": "val/CIDEr"}}
    if o.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, o.step_size, o.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    if o.scheduler in DECAYS:  # a decay that ends with the run
        schedule = WarmupDecay(o.warmup_steps, max(1, int(total_steps())), o.min_lr_ratio, o.scheduler,
                               o.decay_fraction)
    else:  # warm-up alone
        schedule = WarmupDecay(o.warmup_steps, None, o.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _cosine(progress: float, fraction: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(progress: float, fraction: float) -> float:
    # warm-up, stable, decay: lr held until the last ``fraction`` of the run, then a linear fall
    return min(1.0, (1.0 - progress) / fraction)


# model.optim.scheduler -> the share of the way from lr down to the floor still left at a progress
# in [0, 1] of the decay (warm-up excluded)
DECAYS: dict[str, Callable[[float, float], float]] = {"cosine": _cosine, "wsd": _wsd}


class WarmupDecay:
    """Linear warm-up, then a decay (``DECAYS[decay]``) to ``floor`` at step ``total`` (constant
    after warm-up when ``total`` is None).
    A class rather than a lambda so that the scheduler's state stays picklable-free: its state is
    plain numbers and the decay's name, ``budget_used`` among them (the share of a time budget
    spent, in [0, 1], set from outside by whoever keeps the clock; the decay's progress is at
    least that share)."""

    def __init__(self, warmup: int, total: int | None, floor: float, decay: str = "cosine",
                 decay_fraction: float = 0.2) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor
        self.decay, self.decay_fraction = decay, decay_fraction
        self.budget_used = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total is None:
            return 1.0
        progress = min(1.0, max((step - self.warmup) / max(1, self.total - self.warmup), self.budget_used))
        return self.floor + (1 - self.floor) * DECAYS[self.decay](progress, self.decay_fraction)


def set_budget_used(scheduler, share: float) -> None:
    """Tell a ``WarmupDecay`` schedule (``build_optimizer``'s) that ``share`` of the run's time
    budget is spent; other schedules do not follow time."""
    for fn in getattr(scheduler, "lr_lambdas", ()):
        if isinstance(fn, WarmupDecay):
            fn.budget_used = min(1.0, max(0.0, share))
