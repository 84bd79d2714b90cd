"""Divergence guard: a NaN or inf loss, gradient or weight stops the run (or skips the step) before
anything non-finite reaches a checkpoint, and a collapsed model is never selected as best.pt."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from advews.engine import distributed
from advews.errors import AdvewsError

POLICIES = ("stop", "skip")
DIVERGED_EXIT = 3


class DivergenceError(AdvewsError):
    """Training produced non-finite numbers; the CLI exits with ``DIVERGED_EXIT``, not 2 (bad input)."""

    exit_code = DIVERGED_EXIT


class NonFiniteGuard:
    """Checks each step's loss and gradient norm: ``stop`` raises at the first non-finite one;
    ``skip`` drops the optimizer step and raises once more than ``max_skipped`` steps were dropped."""

    def __init__(self, policy: str, max_skipped: int):
        if policy not in POLICIES:
            raise AdvewsError(f"train.nonfinite must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.max_skipped = policy, max_skipped
        self.skipped = 0
        self.last_good = "no checkpoint was written yet"

    def step_ok(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], where: str) -> bool:
        """True when the step may be applied; False to skip it (one host sync per step)."""
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float())
        bad = distributed.all_reduce_sum(bad.float().reshape(1))  # every rank decides the same
        if not bool(bad.item()):
            return True
        if not bool(torch.isfinite(loss.detach()).all()):
            what = f"loss ({float(loss.detach()):g})"
        elif grad_norm is not None and not bool(torch.isfinite(grad_norm).all()):
            what = f"gradient norm ({float(grad_norm):g})"
        else:
            what = "loss or gradient norm on another rank"
        if self.policy == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            return False
        reason = f"non-finite {what}"
        if self.policy == "skip":
            reason += f" after {self.skipped} skipped steps (train.max_skipped_steps = {self.max_skipped})"
        raise self.error(reason, where)

    def check_model(self, model: nn.Module, where: str) -> None:
        """Refuse to go on (and so to save) with a non-finite weight or buffer."""
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise self.error(f"non-finite values in {name}", where)

    def check_row(self, row: dict, where: str) -> None:
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise self.error(f"non-finite {k} ({v})", where)

    def error(self, reason: str, where: str) -> DivergenceError:
        return DivergenceError(
            f"training diverged at {where}: {reason}; stopped without saving it ({self.last_good}); "
            "lower optimizer.lr, set train.grad_clip, or set train.nonfinite = 'skip'"
        )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))


def collapsed(prediction_counts: torch.Tensor, label_counts: torch.Tensor) -> bool:
    """Whether every validation prediction is one class although the labels hold several (what a NaN
    or dead model does; its 'accuracy' is the share of that class, which can beat a real model's)."""
    return int((label_counts > 0).sum()) > 1 and int((prediction_counts > 0).sum()) <= 1
