"""Madry et al. adversarial training: cross-entropy on PGD examples crafted against the current net."""

from __future__ import annotations

from typing import Any, Type, Union

import torch
from torch import nn

from advews.attacks import FGSM, PGD, Attack
from advews.attacks.custom import SPEC_FORM, attack_class, build_custom, check_attack_class, is_spec
from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.mixing import Mixing, mixed_cross_entropy, require_choice
from advews.defenses.params import attack_settings
from advews.defenses.registry import register_defense
from advews.errors import AdvewsError, require_bool


MIX_TARGETS = ("mixed", "dominant")
BUILT_IN = {"pgd": PGD, "fgsm": FGSM}


@register_defense
class AT(Defense):
    """``attack_mode``: the model's mode while the training PGD runs. 'train' (default) as the AT
    reference scripts (robust_overfitting, AWP's AT_AWP, EWS's train_adv_at) do: BN normalises with
    the adversarial batch's statistics and every attack forward updates the running statistics;
    'eval' attacks the running-statistics net, as TRADES/MART do and as evaluation does.
    ``mix`` (cutmix, mixup): the clean batch is mixed before the attack; the loss is CE against the
    mixed labels (``defenses.mixing``). ``mix_attack_target``: 'mixed' (default) maximises the
    soft-label CE against the mixed label distribution, as DM-Improves-AT (its PGD's CE takes the
    CutMix soft label) and Rebuffi et al. do; 'dominant' maximises the CE of the larger share's label
    (advews before 2026-12). ``smooth_mixed_labels``: False (default) trains a mixed batch on the
    unsmoothed mixed label, as DM-Improves-AT (its CutMix losses take no smoothing); True applies
    ``label_smoothing`` to it too. Unmixed batches always get ``label_smoothing``.
    ``final_forward``: True (default) runs the train-mode attack's result through the net once more,
    as the references' ``attack_pgd`` does to score its restart (robust_overfitting, AWP AT_AWP, EWS
    train_adv_at): 11 BN running-statistic updates per step instead of 10 (no effect in eval mode).
    ``attack``: the training attack's class: 'pgd' (default), 'fgsm', a user's 'MODULE:CLASS'
    (``'attacks.multi_targeted:MultiTargetedPGD'``, imported from the working directory) or a gin
    reference to a configurable Attack subclass (``@MultiTargetedPGD`` after gin's ``import``). It gets
    AT's eps, norm, steps, step_size, random_start, attack_mode and final_forward where it has such a
    field; its other fields keep their defaults or its own gin bindings."""

    adversarial = True

    def __init__(
        self,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        norm: str = "Linf",
        random_start: bool = True,
        label_smoothing: float = 0.0,
        attack_mode: str = "train",
        mix: str = "none",
        mix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        mix_attack_target: str = "mixed",
        smooth_mixed_labels: bool = False,
        final_forward: bool = True,
        attack: Union[str, Type[Attack]] = "pgd",
    ):
        super().__init__(label_smoothing=label_smoothing)
        attack_settings("AT", eps, step_size, steps)
        self.mixing = Mixing(mix, mix_alpha, mix_prob)
        require_bool("AT.final_forward", final_forward)
        require_choice("AT.mix_attack_target", mix_attack_target, MIX_TARGETS)
        require_bool("AT.smooth_mixed_labels", smooth_mixed_labels)
        self.mix_attack_target, self.smooth_mixed_labels = mix_attack_target, smooth_mixed_labels
        cls = training_attack_class(attack)
        self.attack = build_custom(cls, f"AT.attack {cls.__qualname__}", eps=eps, norm=norm, steps=steps,
                                   step_size=step_size, random_start=random_start, model_mode=attack_mode,
                                   final_forward=final_forward and attack_mode == "train")
        if self.mixing.mode != "none" and mix_attack_target == "mixed" and not hasattr(self.attack, "away_from"):
            raise AdvewsError(f"AT.attack {cls.__qualname__} cannot attack a mixed label distribution (it has no "
                              "away_from); use AT.mix_attack_target = 'dominant' or AT.attack = 'pgd'")

    def prepare(self, model: nn.Module, x, y) -> Batch:
        attack = self.attack.scaled(self.eps_scale)
        return self.mixing.attacked(attack, model, x, y, self.mix_attack_target == "mixed")

    def batch_cross_entropy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return mixed_cross_entropy(logits, batch.y, batch.mix, self.label_smoothing, self.smooth_mixed_labels)

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        logits = model(batch.x_adv)
        return DefenseOutput(
            loss=self.batch_cross_entropy(logits, batch),
            views=[View(batch.x_adv, logits)],
            search_x=batch.x_adv,
            search_y=batch.y,
            logits=logits,
        )


def training_attack_class(attack: Any) -> Type[Attack]:
    """The class ``AT.attack`` names: a built-in name, a user's MODULE:CLASS, or an Attack subclass."""
    if isinstance(attack, str) and attack in BUILT_IN:
        return BUILT_IN[attack]
    if isinstance(attack, str) and is_spec(attack):
        return attack_class(attack, "AT.attack")
    if isinstance(attack, type):
        return check_attack_class(attack, f"AT.attack {attack.__qualname__}")
    raise AdvewsError(f"AT.attack must be one of {', '.join(BUILT_IN)}, {SPEC_FORM}, or a gin reference "
                      f"@CLASS to one, got {attack!r}")
