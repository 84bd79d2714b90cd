"""Projected gradient descent (Madry et al. 2018), Linf or L2, optionally targeted and restarted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from advews.attacks.ball import ascent_step, normal_start, project, random_start
from advews.attacks.base import Attack
from advews.attacks.objectives import LOSSES, objective, succeeded
from advews.errors import AdvewsError

STARTS = ("uniform", "normal")


@dataclass
class PGD(Attack):
    """PGD on the summed per-example objective; with random_start=False, Linf and L2 reproduce
    torchattacks' PGD / PGDL2 (its mean-CE gradient has the same sign and direction).

    With ``restarts`` > 1 each example keeps its best restart: a successful one first, then the one
    with the highest objective; this costs one extra forward pass per restart, none per step.
    ``start``: 'uniform' in the ball (Madry et al., robust_overfitting) or 'normal', x + 0.001 * N(0, 1)
    (the MART reference), fed unclipped unless ``clamp_start`` (see ``ball.normal_start``).
    """

    steps: int = 10
    step_size: float = 2 / 255
    random_start: bool = True
    start: str = "uniform"
    clamp_start: bool = False
    restarts: int = 1
    targeted: bool = False
    loss: str = "ce"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restarts < 1:
            raise AdvewsError(f"restarts must be >= 1, got {self.restarts}")
        if self.restarts > 1 and not self.random_start:
            raise AdvewsError(f"restarts={self.restarts} needs random_start=True (else all restarts coincide)")
        if self.start not in STARTS:
            raise AdvewsError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.loss not in LOSSES:
            raise AdvewsError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if self.restarts == 1:
            return self._run(model, x, y)
        best = best_success = best_value = None
        for _ in range(self.restarts):
            x_adv = self._run(model, x, y)
            with torch.no_grad():
                logits = self.logits(model, x_adv)
                success = succeeded(logits, y, self.targeted)
                value = objective(logits, y, self.loss, self.targeted)
            if best is None:
                best, best_success, best_value = x_adv, success, value
                continue
            better = (success & ~best_success) | ((success == best_success) & (value > best_value))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_success = best_success | success
            best_value = torch.where(better, value, best_value)
        return best

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One PGD trajectory: gradients w.r.t. the adversarial input only (parameters are frozen)."""
        if not self.random_start:
            x_adv = x.clone()
        elif self.start == "normal":
            x_adv = normal_start(x, 0.001, clamp=self.clamp_start)
        else:
            x_adv = random_start(x, self.eps, self.norm)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            value = objective(self.logits(model, x_adv), y, self.loss, self.targeted).sum()
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = ascent_step(x_adv.detach(), grad, self.step_size, self.norm)
            x_adv = project(x, x_adv, self.eps, self.norm)
        return x_adv
