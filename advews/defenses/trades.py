"""TRADES (Zhang et al. 2019): CE on clean inputs + beta * KL(p(x) || p(x')) on KL-maximising x'."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from advews.attacks import TradesKL
from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.mixing import Mixing
from advews.defenses.registry import register_defense


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv), summed over classes and averaged over the batch."""
    return F.kl_div(
        F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1), reduction="sum"
    ) / logits_clean.shape[0]


@register_defense
class TRADES(Defense):
    """The KL attack runs with the model in eval mode (``attack_mode``) from an unclipped
    x + 0.001 * N(0, 1) start (``clamp_start``), as the TRADES code does (see ``TradesKL``).
    ``mix`` (cutmix, mixup; Rebuffi et al. 2021): the clean batch is mixed before the label-free
    attack and its CE term is against the mixed labels (``defenses.mixing``)."""

    adversarial = True

    def __init__(
        self,
        beta: float = 6.0,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        norm: str = "Linf",
        label_smoothing: float = 0.0,
        attack_mode: str = "eval",
        clamp_start: bool = False,
        mix: str = "none",
        mix_alpha: float = 1.0,
        mix_prob: float = 1.0,
    ):
        super().__init__(label_smoothing=label_smoothing)
        self.mixing = Mixing(mix, mix_alpha, mix_prob)
        self.beta = beta
        self.attack = TradesKL(eps=eps, norm=norm, steps=steps, step_size=step_size, clamp_start=clamp_start,
                               model_mode=attack_mode)

    def prepare(self, model: nn.Module, x, y) -> Batch:
        x, y, minor = self.mixing(x, y)
        return Batch(x, y, x_adv=self.attack.scaled(self.eps_scale)(model, x, y), mix=minor)

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        logits_clean = model(batch.x)
        logits_adv = model(batch.x_adv)
        natural = self.batch_cross_entropy(logits_clean, batch)
        robust = trades_kl(logits_clean, logits_adv)
        return DefenseOutput(
            loss=natural + self.beta * robust,
            views=[View(batch.x, logits_clean), View(batch.x_adv, logits_adv, self.beta)],
            search_x=batch.x_adv,
            search_y=batch.y,
            logits=logits_adv,
            metrics={"natural_loss": natural.detach(), "robust_kl": robust.detach()},
        )
