"""Optimizer and learning-rate schedule, both gin-configurable."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import gin
import torch
from torch import nn

from advews.engine.params import require_bool, require_number, require_str
from advews.errors import AdvewsError

SCHEDULES = ("constant", "cosine", "onecycle", "step")
ONECYCLE_UNITS = ("epoch", "iteration")


def param_groups(model: nn.Module, bn_weight_decay: bool) -> List[Dict[str, Any]]:
    """One group of all parameters, or (``bn_weight_decay=False``) the non-BatchNorm parameters and
    then the BatchNorm scales and shifts with weight decay 0 (DM-Improves-AT's ``group_weight``:
    every parameter whose name contains 'batchnorm', i.e. its WRN's BN layers; other biases decay)."""
    if bn_weight_decay:
        return [{"params": list(model.parameters())}]
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    groups = [{"params": decay}]
    bn = [p for p in model.parameters() if id(p) in no_decay]
    if bn:
        groups.append({"params": bn, "weight_decay": 0.0})
    return groups


@gin.configurable("optimizer")
def make_optimizer(
    params: Union[nn.Module, Iterable[torch.nn.Parameter]],
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    betas: Tuple[float, float] = (0.9, 0.999),
    bn_weight_decay: bool = True,
) -> torch.optim.Optimizer:
    """``params``: a model (or its parameters). ``bn_weight_decay``: True (default) decays every
    parameter, as robust_overfitting, TRADES, AWP and EWS do; False exempts the BatchNorm scales and
    shifts (DM-Improves-AT's ``group_weight``; needs the model, see ``param_groups``)."""
    require_str("optimizer.name", name)
    require_number("optimizer.lr", lr, positive=True)
    require_number("optimizer.momentum", momentum, minimum=0)
    require_number("optimizer.weight_decay", weight_decay, minimum=0)
    require_bool("optimizer.nesterov", nesterov)
    require_bool("optimizer.bn_weight_decay", bn_weight_decay)
    if isinstance(params, nn.Module):
        params = param_groups(params, bn_weight_decay)
    elif not bn_weight_decay:
        raise AdvewsError("optimizer.bn_weight_decay = False needs the model, not a list of parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":  # decoupled weight decay, as the transformer recipes (Singh et al. 2023) train
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise AdvewsError(f"unknown optimizer {name!r}; choose one of adam, adamw, sgd")


Curve = Callable[[int], float]


def onecycle(total: int, pct_start: float, div_factor: float, final_div_factor: float,
             momentum_range: Optional[Tuple[float, float]]) -> Tuple[Curve, Optional[Curve]]:
    """(lr factor of max_lr, momentum) at step n of ``total``, as torch's ``OneCycleLR`` (two phases,
    cosine annealing): from max_lr / div_factor up to max_lr at step pct_start * total - 1, then down
    to max_lr / (div_factor * final_div_factor) at step total - 1; momentum from high to low and
    back (``momentum_range`` = (low, high); None: not cycled)."""
    ends = [pct_start * total - 1, total - 1]
    lrs = [1.0 / div_factor, 1.0, 1.0 / (div_factor * final_div_factor)]

    def position(n: int) -> Tuple[int, float]:
        start = 0.0
        for phase, end in enumerate(ends):
            if n <= end or phase == len(ends) - 1:
                return phase, (n - start) / (end - start) if end != start else 1.0
            start = end
        raise AssertionError  # unreachable

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    def lr_factor(n: int) -> float:
        phase, pct = position(n)
        return anneal(lrs[phase], lrs[phase + 1], pct)

    if momentum_range is None:
        return lr_factor, None
    low, high = momentum_range

    def momentum(n: int) -> float:
        phase, pct = position(n)
        return anneal(high, low, pct) if phase == 0 else anneal(low, high, pct)

    return lr_factor, momentum


class CycledLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that also sets each group's momentum (Adam: beta1) from ``momentum_at(step)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float],
                 momentum_at: Optional[Callable[[int], float]]):
        self.momentum_at = momentum_at
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch: Optional[int] = None) -> None:  # noqa: D102 (LambdaLR's)
        super().step() if epoch is None else super().step(epoch)
        if self.momentum_at is not None:
            m = self.momentum_at(self.last_epoch)
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (m, group["betas"][1])
                else:
                    group["momentum"] = m

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.pop("momentum_at", None)
        return state


@gin.configurable("schedule")
def make_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    name: str = "step",
    milestones: Sequence[float] = (100, 150),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    pct_start: float = 0.025,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    cycle_momentum: bool = True,
    momentum_range: Tuple[float, float] = (0.85, 0.95),
    onecycle_unit: str = "epoch",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration multiplier: linear warm-up, then ``step`` (x gamma at each milestone epoch),
    ``cosine`` (to 0 at the end) or ``constant``; or ``onecycle``, torch's OneCycleLR with max_lr
    ``optimizer.lr``.

    Milestones are epochs; values in (0, 1) are fractions of the run (e.g. 1/3, 2/3).
    ``onecycle`` defaults are DM-Improves-AT's default scheduler ('cosinew'): OneCycleLR with
    ``pct_start`` 0.025, torch's ``div_factor`` 25 and ``final_div_factor`` 1e4 and its momentum
    cycling between ``momentum_range`` (0.85, 0.95) (``cycle_momentum``; it overrides
    ``optimizer.momentum``), over ``total_steps = epochs`` and stepped once per epoch
    (``onecycle_unit = 'epoch'``: the lr is constant within an epoch; 'iteration' steps it every
    batch over epochs x steps_per_epoch, as DM-Improves-AT's 'cyclic', which uses pct_start 0.25)."""
    if name not in SCHEDULES:
        raise AdvewsError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    require_number("schedule.gamma", gamma, minimum=0)
    require_number("schedule.warmup_epochs", warmup_epochs, minimum=0)
    if not isinstance(milestones, (list, tuple)):
        raise AdvewsError(f"schedule.milestones must be a list of epochs, got {milestones!r}")
    for m in milestones:
        require_number("schedule.milestones", m, minimum=0)
    total = max(1, steps_per_epoch * epochs)
    if name == "onecycle":
        return _onecycle_scheduler(optimizer, steps_per_epoch, epochs, warmup_epochs, pct_start, div_factor,
                                   final_div_factor, cycle_momentum, momentum_range, onecycle_unit)
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


def _onecycle_scheduler(optimizer, steps_per_epoch, epochs, warmup_epochs, pct_start, div_factor,
                        final_div_factor, cycle_momentum, momentum_range, unit) -> CycledLR:
    if warmup_epochs:
        raise AdvewsError(f"schedule.warmup_epochs must be 0 with schedule.name = 'onecycle' (it warms up "
                          f"over schedule.pct_start of the run), got {warmup_epochs}")
    require_number("schedule.pct_start", pct_start, positive=True)
    if pct_start >= 1:
        raise AdvewsError(f"schedule.pct_start must be in (0, 1), got {pct_start}")
    require_number("schedule.div_factor", div_factor, positive=True)
    require_number("schedule.final_div_factor", final_div_factor, positive=True)
    require_bool("schedule.cycle_momentum", cycle_momentum)
    if unit not in ONECYCLE_UNITS:
        raise AdvewsError(f"schedule.onecycle_unit must be one of {', '.join(ONECYCLE_UNITS)}, got {unit!r}")
    if not (isinstance(momentum_range, (list, tuple)) and len(momentum_range) == 2):
        raise AdvewsError(f"schedule.momentum_range must be (low, high), got {momentum_range!r}")
    for m in momentum_range:
        require_number("schedule.momentum_range", m, minimum=0)
    if momentum_range[0] > momentum_range[1]:
        raise AdvewsError(f"schedule.momentum_range must be (low, high) with low <= high, got {momentum_range!r}")
    per = steps_per_epoch if unit == "epoch" else 1
    total = max(1, epochs if unit == "epoch" else epochs * steps_per_epoch)
    lr_at, momentum_at = onecycle(total, pct_start, div_factor, final_div_factor,
                                  tuple(momentum_range) if cycle_momentum else None)

    def lr_factor(it: int) -> float:
        return lr_at(min(it // per, total - 1))

    def momentum(it: int) -> float:
        return momentum_at(min(it // per, total - 1))

    return CycledLR(optimizer, lr_factor, momentum if momentum_at is not None else None)
