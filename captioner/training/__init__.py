"""What training needs besides the model: the objectives a step minimises (``objectives``), the
optimiser and its schedule (``optim``), and the validation scores (``validation``).
``CaptioningSystem`` (``captioner.system``) wires them into Lightning's hooks."""

from captioner.training.objectives import (
    OBJECTIVES,
    LossConfig,
    Objective,
    ScstConfig,
    batch_features,
    caption_loss,
    objective_for,
)
from captioner.training.optim import OptimConfig, build_optimizer

__all__ = [
    "OBJECTIVES",
    "LossConfig",
    "Objective",
    "OptimConfig",
    "ScstConfig",
    "batch_features",
    "build_optimizer",
    "caption_loss",
    "objective_for",
]
