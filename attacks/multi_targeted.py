"""Your own attack in your own file: multi-targeted PGD (Gowal et al. 2019, "An Alternative Surrogate
Loss for PGD-based Adversarial Testing"), the attack AutoAttack's APGD-T and FAB-T follow.

Untargeted cross-entropy PGD follows the gradient toward whichever wrong class is easiest at the start
and can stall there; this attack runs one targeted PGD on the logit margin ``z_t - z_y`` per target
``t``, for the ``targets`` wrong classes the model ranks highest on the clean input, and keeps per
example the run with the largest margin ``max_{j != y} z_j - z_y`` (> 0: misclassified).

The contract of an advews attack: a dataclass subclass of ``Attack`` (which holds eps, norm,
model_mode) that implements ``perturb``; the base checks the inputs, freezes the model (no parameter
gradients, its modes restored) and detaches the result. ``self.logits`` runs the model under
advews-eval --amp's autocast. ``@gin.configurable`` lets a recipe bind the fields AT does not pass
(``MultiTargetedPGD.targets = 2``).

    advews-eval --checkpoint runs/qs/best.pt --attack pgd,attacks.multi_targeted:MultiTargetedPGD
    advews-train --gin defenses/at_multi_targeted.gin    # AT whose training attack is this one
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gin
import torch
from torch import nn

from advews.attacks import Attack
from advews.attacks.ball import ascent_step, project, random_start
from advews.errors import AdvewsError


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - logits.gather(1, y[:, None]).squeeze(1)


@gin.configurable
@dataclass
class MultiTargetedPGD(Attack):
    """``targets`` targeted PGD runs of ``steps`` steps each (``targets * (steps + 1)`` forward passes
    and ``targets * steps`` backward passes per batch, plus one clean forward); ``step_size``
    defaults to 2.5 * eps / steps, as advews-eval's PGD."""

    steps: int = 20
    step_size: Optional[float] = None
    targets: int = 3
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.step_size is None and isinstance(self.steps, int) and self.steps >= 1:
            self.step_size = 2.5 * self.eps / self.steps
        super().__post_init__()
        if not isinstance(self.targets, int) or isinstance(self.targets, bool) or self.targets < 1:
            raise AdvewsError(f"MultiTargetedPGD.targets must be an integer >= 1, got {self.targets!r}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            clean = self.logits(model, x)
        ranked = clean.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        best, best_margin = x, margin(clean, y)
        for k in range(min(self.targets, clean.shape[1] - 1)):
            x_adv = self._targeted(model, x, y, ranked[:, k])
            with torch.no_grad():
                value = margin(self.logits(model, x_adv), y)
            better = value > best_margin
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_margin = torch.where(better, value, best_margin)
        return best

    def _targeted(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """PGD ascent on z_target - z_y, projected onto the eps-ball and [0, 1] after every step."""
        x_adv = random_start(x, self.eps, self.norm) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits = self.logits(model, x_adv)
            value = (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).sum()
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = project(x, ascent_step(x_adv.detach(), grad, self.step_size, self.norm), self.eps, self.norm)
        return x_adv
