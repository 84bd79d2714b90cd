"""TRADES (Zhang et al. 2019): CE on clean inputs + beta * KL(p(x) || p(x')) on KL-maximising x'."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from advews.attacks import TradesKL
from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.mixing import Mixing, mixed_cross_entropy, require_choice
from advews.defenses.params import attack_settings, require_at_least
from advews.defenses.registry import register_defense
from advews.errors import require_bool

ATTACK_MODES = ("eval", "train", "train_frozen")
MIX_TARGETS = ("mixed", "prediction")
STARTS = ("normal", "uniform")


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv), summed over classes and averaged over the batch."""
    return F.kl_div(
        F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1), reduction="sum"
    ) / logits_clean.shape[0]


@register_defense
class TRADES(Defense):
    """``attack_mode``: the model's mode while the KL attack runs: 'eval' (default, the TRADES code),
    'train' (batch statistics, running statistics updated by every attack forward) or
    'train_frozen' (batch statistics, running statistics untouched: DM-Improves-AT's
    ``model.train()`` + ``track_bn_stats(model, False)``). ``start``: 'normal' (default, the TRADES
    code: x + 0.001 N(0, 1), unclipped unless ``clamp_start``) or 'uniform' (DM-Improves-AT:
    x + U(-eps, eps) clipped to [0, 1]); see ``TradesKL``.
    ``mix`` (cutmix, mixup; Rebuffi et al. 2021): the clean batch is mixed before the attack and its
    CE term is against the mixed labels (``defenses.mixing``); the KL term stays KL(p(x) || p(x')).
    ``mix_attack_target``: 'mixed' (default) attacks away from the mixed label distribution,
    maximising KL(mixed || p(x')), as DM-Improves-AT's trades_loss with CutMix (``p_natural = y``)
    and Rebuffi et al. do; 'prediction' maximises KL(p(x) || p(x')) from the clean prediction, as
    TRADES does without mixing (advews before 2026-12). ``smooth_mixed_labels``: False (default) as
    DM-Improves-AT, whose CutMix clean term is KL(mixed || p(x)) with no label smoothing (the same
    gradient as the CE advews reports; the values differ by the constant entropy of the mixed
    label); True smooths the mixed label with ``label_smoothing``."""

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
        start: str = "normal",
        mix: str = "none",
        mix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        mix_attack_target: str = "mixed",
        smooth_mixed_labels: bool = False,
    ):
        super().__init__(label_smoothing=label_smoothing)
        attack_settings("TRADES", eps, step_size, steps)
        require_at_least("TRADES.beta", beta, 0)
        self.mixing = Mixing(mix, mix_alpha, mix_prob)
        require_choice("TRADES.attack_mode", attack_mode, ATTACK_MODES)
        require_choice("TRADES.start", start, STARTS)
        require_choice("TRADES.mix_attack_target", mix_attack_target, MIX_TARGETS)
        require_bool("TRADES.smooth_mixed_labels", smooth_mixed_labels)
        self.mix_attack_target, self.smooth_mixed_labels = mix_attack_target, smooth_mixed_labels
        self.beta = beta
        self.attack = TradesKL(eps=eps, norm=norm, steps=steps, step_size=step_size, clamp_start=clamp_start,
                               start=start, model_mode="eval" if attack_mode == "eval" else "train",
                               freeze_bn_stats=attack_mode == "train_frozen")

    def prepare(self, model: nn.Module, x, y) -> Batch:
        attack = self.attack.scaled(self.eps_scale)
        return self.mixing.attacked(attack, model, x, y, self.mix_attack_target == "mixed")

    def batch_cross_entropy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return mixed_cross_entropy(logits, batch.y, batch.mix, self.label_smoothing, self.smooth_mixed_labels)

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
