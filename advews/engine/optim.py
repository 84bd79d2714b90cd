"""Optimizer and learning-rate schedule, both gin-configurable."""

from __future__ import annotations

import math
from typing import Iterable, Sequence, Tuple

import gin
import torch

from advews.engine.params import require_bool, require_number, require_str
from advews.errors import AdvewsError


@gin.configurable("optimizer")
def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    betas: Tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    require_str("optimizer.name", name)
    require_number("optimizer.lr", lr, positive=True)
    require_number("optimizer.momentum", momentum, minimum=0)
    require_number("optimizer.weight_decay", weight_decay, minimum=0)
    require_bool("optimizer.nesterov", nesterov)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise AdvewsError(f"unknown optimizer {name!r}; choose one of adam, sgd")


@gin.configurable("schedule")
def make_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    name: str = "step",
    milestones: Sequence[float] = (100, 150),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration multiplier: linear warm-up, then ``step`` (x gamma at each milestone epoch),
    ``cosine`` (to 0 at the end) or ``constant``.

    Milestones are epochs; values in (0, 1) are fractions of the run (e.g. 1/3, 2/3)."""
    if name not in ("step", "cosine", "constant"):
        raise AdvewsError(f"unknown schedule {name!r}; choose one of constant, cosine, step")
    require_number("schedule.gamma", gamma, minimum=0)
    require_number("schedule.warmup_epochs", warmup_epochs, minimum=0)
    if not isinstance(milestones, (list, tuple)):
        raise AdvewsError(f"schedule.milestones must be a list of epochs, got {milestones!r}")
    for m in milestones:
        require_number("schedule.milestones", m, minimum=0)
    total = max(1, steps_per_epoch * epochs)
    warm = warmup_epochs * steps_per_epoch
    bounds = [(m * epochs if 0 < m < 1 else m) * steps_per_epoch for m in milestones]

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if name == "step":
            return gamma ** sum(it >= b for b in bounds)
        if name == "cosine":
            progress = (it - warm) / max(1.0, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
