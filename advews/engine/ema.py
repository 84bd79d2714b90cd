"""An exponential moving average (EMA) of the weights, as today's robust-training recipes use it
(Gowal et al. 2020, Rebuffi et al. 2021, DM-Improves-AT: decay 0.995 per step); the averaged model
is the one they evaluate, select and release.

The update follows DM-Improves-AT's ``ema_update`` (gowal21uncovering/utils/watrain.py, with its
``dynamic_decay=True``): after optimizer step n (1 = the first) the decay is 0 while
n < ``warmup_steps`` (the EMA copies the live weights), then ``min(decay, (1 + d) / (10 + d))``
with d = n - ``warmup_steps``, and ``ema = decay * ema + (1 - decay) * live``. BatchNorm buffers are
not averaged: like that code's ``update_bn`` (which makes the EMA's running statistics those of the
live model), every buffer is copied from the live model. Checkpoints hold the EMA's state_dict
under ``ema``; ``select_weights`` picks what a checkpoint or export is evaluated or exported with.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from advews.engine.params import require_bool, require_int, require_number, require_str
from advews.errors import AdvewsError

WEIGHTS_FROM = ("ema", "live")


def check_ema_settings(decay: Any, warmup_steps: Any, dynamic_decay: Any, select_on: Any) -> None:
    """One line for a bad ``train.ema_*`` or ``train.select_on`` value."""
    bad_decay = isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1
    if decay is not None and bad_decay:
        raise AdvewsError(f"train.ema_decay must be a number in (0, 1) (e.g. 0.995) or None, got {decay!r}")
    require_int("train.ema_warmup_steps", warmup_steps, minimum=0)
    require_bool("train.ema_dynamic_decay", dynamic_decay)
    require_str("train.select_on", select_on)
    if select_on not in WEIGHTS_FROM:
        raise AdvewsError(f"train.select_on must be one of {', '.join(WEIGHTS_FROM)}, got {select_on!r}")


def ema_warmup(warmup_steps: Any, warmup_fraction: Any, total_steps: int) -> float:
    """The EMA's warm-up in optimizer steps: ``train.ema_warmup_steps``, or ``train.ema_warmup_fraction``
    of the run's ``total_steps`` (DM-Improves-AT: 0.025 x epochs x steps per epoch, not rounded).
    The references: Gowal et al.'s and DM-Improves-AT's EMA is a plain copy over that warm-up."""
    require_number("train.ema_warmup_fraction", warmup_fraction, minimum=0, allow_none=True)
    if warmup_fraction is None:
        return warmup_steps
    if warmup_fraction > 1:
        raise AdvewsError(f"train.ema_warmup_fraction must be in [0, 1], got {warmup_fraction}")
    if warmup_steps:
        raise AdvewsError(f"set train.ema_warmup_steps or train.ema_warmup_fraction, not both "
                          f"(got {warmup_steps} and {warmup_fraction})")
    return warmup_fraction * total_steps


class EMA:
    """The averaged copy of ``model`` (eval mode, no gradients) and its update rule."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: float = 0, dynamic_decay: bool = True):
        self.decay, self.warmup_steps, self.dynamic_decay = decay, warmup_steps, dynamic_decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1-based, counted over the run)."""
        if step < self.warmup_steps:
            return 0.0
        d = step - self.warmup_steps
        return min(self.decay, (1.0 + d) / (10.0 + d)) if self.dynamic_decay else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average the parameters into the EMA; copy the buffers (BN statistics) over."""
        decay = self.decay_at(step)
        for ema, live in zip(self.model.parameters(), model.parameters()):
            ema.mul_(decay).add_(live.detach() * (1.0 - decay))
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for ema, live in zip(self.model.buffers(), model.buffers()):
            ema.copy_(live)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start over from ``model``'s weights (a resume of a run trained without EMA)."""
        self.model.load_state_dict(model.state_dict())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def select_weights(state: Dict[str, Any], weights_from: Optional[str], path: str) -> Tuple[Dict[str, Any], str]:
    """(state_dict, 'ema' or 'live') of a loaded checkpoint or export: ``weights_from``, else the
    checkpoint's ``weights`` (the EMA's when it was trained with one, unless ``train.select_on =
    'live'``); an export holds the one set its config names."""
    if weights_from is not None and weights_from not in WEIGHTS_FROM:
        raise AdvewsError(f"weights_from must be one of {', '.join(WEIGHTS_FROM)} or None, got {weights_from!r}")
    if "export" in state:
        held = {state["export"].get("weights", "live"): state["model"]}
    else:
        held = {"live": state["model"], **({"ema": state["ema"]} if state.get("ema") is not None else {})}
    default = state.get("weights") if state.get("weights") in held else "ema" if "ema" in held else "live"
    name = weights_from or default
    if name not in held:
        why = " (trained without train.ema_decay)" if name == "ema" and "export" not in state else ""
        raise AdvewsError(f"{path} holds no {name} weights{why}, only {', '.join(held)}; "
                          f"use --weights-from {next(iter(held))}")
    return held[name], name
