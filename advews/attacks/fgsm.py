"""Fast gradient sign method (Goodfellow et al. 2015): one full-eps step from the clean point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from advews.attacks.ball import ascent_step, project
from advews.attacks.base import Attack
from advews.attacks.objectives import objective


@dataclass
class FGSM(Attack):
    """One steepest-ascent step of size eps on the cross-entropy: sign step (Linf) or normalised
    gradient step (L2, the "fast gradient method"); the cheap attack for fast AT and sanity checks.
    """

    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        x_adv = x.clone().requires_grad_(True)
        value = objective(self.logits(model, x_adv), y, "ce", targeted=False).sum()
        (grad,) = torch.autograd.grad(value, x_adv)
        return project(x, ascent_step(x, grad, self.eps, self.norm), self.eps, self.norm)
