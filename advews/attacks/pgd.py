"""Projected gradient descent (Madry et al. 2018), Linf or L2, optionally targeted and restarted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from advews.attacks.ball import ascent_step, normal_start, project, random_start
from advews.attacks.base import Attack, frozen
from advews.attacks.objectives import LOSSES, objective, succeeded
from advews.errors import AdvewsError

STARTS = ("uniform", "normal")
PGD_LOSSES = LOSSES + ("cw_hinge",)


@dataclass(frozen=True)
class MixedLabels:
    """A CutMix/MixUp label distribution, (1 - share) one-hot(y) + share one-hot(minor) per example
    (``defenses.mixing``); ``y`` holds the dominant labels."""

    y: torch.Tensor
    minor: torch.Tensor
    share: float

    def cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example CE against the mixed distribution (its KL to p(x) up to a constant)."""
        return (1 - self.share) * F.cross_entropy(logits, self.y, reduction="none") + \
            self.share * F.cross_entropy(logits, self.minor, reduction="none")


@dataclass
class PGD(Attack):
    """PGD on the summed per-example objective; with random_start=False, Linf and L2 reproduce
    torchattacks' PGD / PGDL2 (its mean-CE gradient has the same sign and direction).

    With ``restarts`` > 1 each example keeps its best restart: a successful one first, then the one
    with the highest objective; this costs one extra forward pass per restart, none per step.
    ``start``: 'uniform' in the ball (Madry et al., robust_overfitting) or 'normal', x + 0.001 * N(0, 1)
    (the MART reference), fed unclipped unless ``clamp_start`` (see ``ball.normal_start``).
    ``loss``: 'ce', 'cw' (the margin max_{j != y} z_j - z_y) or 'cw_hinge', DM-Improves-AT's
    ``CWLoss``: the margin capped at 0 from above, so an example stops moving once misclassified
    (its selection attack, PGD-40 on the EMA). ``away_from`` attacks a mixed label distribution.
    ``final_forward``: one more forward of the result after the last step (no gradient), as the AT
    references' ``attack_pgd`` computes the loss to pick among restarts even with one restart; it
    only matters in train mode, where it is one more update of BN running statistics.
    """

    steps: int = 10
    step_size: float = 2 / 255
    random_start: bool = True
    start: str = "uniform"
    clamp_start: bool = False
    restarts: int = 1
    targeted: bool = False
    loss: str = "ce"
    final_forward: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restarts < 1:
            raise AdvewsError(f"restarts must be >= 1, got {self.restarts}")
        if self.restarts > 1 and not self.random_start:
            raise AdvewsError(f"restarts={self.restarts} needs random_start=True (else all restarts coincide)")
        if self.start not in STARTS:
            raise AdvewsError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.loss not in PGD_LOSSES:
            raise AdvewsError(f"loss must be one of {', '.join(PGD_LOSSES)}, got {self.loss!r}")

    def away_from(self, model: nn.Module, x: torch.Tensor, labels: MixedLabels) -> torch.Tensor:
        """Untargeted CE PGD against a mixed label distribution (CutMix/MixUp: the soft-label CE
        that DM-Improves-AT's AT attack maximises); the model's flags are left untouched."""
        if self.loss != "ce" or self.targeted:
            raise AdvewsError(f"PGD.away_from needs loss='ce' and targeted=False, got {self.loss!r}, {self.targeted}")
        self._check_inputs(x, labels.y)
        self._check_inputs(x, labels.minor)
        x = x.detach()
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        with frozen(model, self.model_mode), torch.enable_grad():
            x_adv = self.perturb(model, x, labels)  # type: ignore[arg-type]
        return x_adv.detach()

    def _value(self, logits: torch.Tensor, y) -> torch.Tensor:
        """Per-example objective for labels or a ``MixedLabels`` distribution."""
        if isinstance(y, MixedLabels):
            return y.cross_entropy(logits)
        if self.loss == "cw_hinge":
            return objective(logits, y, "cw", self.targeted).clamp(max=0)
        return objective(logits, y, self.loss, self.targeted)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if self.restarts == 1:
            x_adv = self._run(model, x, y)
            if self.final_forward:
                with torch.no_grad():
                    self.logits(model, x_adv)
            return x_adv
        best = best_success = best_value = None
        for _ in range(self.restarts):
            x_adv = self._run(model, x, y)
            with torch.no_grad():
                logits = self.logits(model, x_adv)
                success = succeeded(logits, y.y if isinstance(y, MixedLabels) else y, self.targeted)
                value = self._value(logits, y)
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
            value = self._value(self.logits(model, x_adv), y).sum()
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = ascent_step(x_adv.detach(), grad, self.step_size, self.norm)
            x_adv = project(x, x_adv, self.eps, self.norm)
        return x_adv
