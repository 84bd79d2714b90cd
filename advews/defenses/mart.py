"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

MART treats misclassified clean examples differently: its consistency term KL(p(x) || p(x')) is
weighted per example by ``1 - p(y|x)``, so examples the net already gets wrong weigh most, and its
adversarial term is a boosted CE that also pushes down the most likely wrong class on x':

    loss = CE(f(x'), y) - log(1.0001 - p(y'|x')) + beta * mean_i[ KL_i(p(x_i) || p(x'_i)) * (1 - p(y_i|x_i)) ]

with ``y'`` the most likely class other than ``y`` under p(x'), and x' from PGD on the CE loss.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from advews.attacks import PGD
from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.params import attack_settings, require_at_least
from advews.defenses.registry import register_defense


def wrong_class_margin(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i -log(1.0001 - p(y'_i|x'_i)), y' the most likely wrong class: the boost in MART's boosted CE."""
    probs = F.softmax(logits_adv.float(), dim=1)  # fp32 even under autocast
    wrong = probs.detach().scatter(1, y.unsqueeze(1), float("-inf")).argmax(1)
    return F.nll_loss(torch.log(1.0001 - probs), wrong)


def misclassification_aware_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i KL_i(p(x_i) || p(x'_i)) * (1 - p(y_i|x_i)), KL summed over classes; nothing detached."""
    logits_clean, logits_adv = logits_clean.float(), logits_adv.float()  # fp32 even under autocast
    p_clean = F.softmax(logits_clean, dim=1)
    kl = (p_clean * (F.log_softmax(logits_clean, dim=1) - F.log_softmax(logits_adv, dim=1))).sum(1)
    return (kl * (1 - p_clean.gather(1, y.unsqueeze(1)).squeeze(1))).mean()


@register_defense
class MART(Defense):
    """Attack defaults are the MART code's: eps 0.031, step 0.007, 10 steps, start x + 0.001 * N(0, 1)
    fed unclipped (``start='uniform'`` for the Madry start), model in eval mode (``attack_mode``)."""

    adversarial = True

    def __init__(
        self,
        beta: float = 6.0,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        norm: str = "Linf",
        start: str = "normal",
        clamp_start: bool = False,
        label_smoothing: float = 0.0,
        attack_mode: str = "eval",
    ):
        super().__init__(label_smoothing=label_smoothing)
        attack_settings("MART", eps, step_size, steps)
        require_at_least("MART.beta", beta, 0)
        self.beta = beta
        self.attack = PGD(eps=eps, norm=norm, steps=steps, step_size=step_size, start=start,
                          clamp_start=clamp_start, model_mode=attack_mode)

    def prepare(self, model: nn.Module, x, y) -> Batch:
        return Batch(x, y, x_adv=self.attack.scaled(self.eps_scale)(model, x, y))

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        logits_clean = model(batch.x)
        logits_adv = model(batch.x_adv)
        adv = self.cross_entropy(logits_adv, batch.y) + wrong_class_margin(logits_adv, batch.y)
        robust = misclassification_aware_kl(logits_clean, logits_adv, batch.y)
        return DefenseOutput(
            loss=adv + self.beta * robust,
            views=[View(batch.x, logits_clean), View(batch.x_adv, logits_adv, self.beta)],
            search_x=batch.x_adv,
            search_y=batch.y,
            logits=logits_adv,
            metrics={"boosted_ce": adv.detach(), "robust_kl": robust.detach()},
        )
