"""Madry et al. adversarial training: cross-entropy on PGD examples crafted against the current net."""

from __future__ import annotations

from torch import nn

from advews.attacks import PGD
from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.mixing import Mixing
from advews.defenses.registry import register_defense


@register_defense
class AT(Defense):
    """``attack_mode``: the model's mode while the training PGD runs. 'train' (default) as the AT
    reference scripts (robust_overfitting, AWP's AT_AWP, EWS's train_adv_at) do: BN normalises with
    the adversarial batch's statistics and every attack forward updates the running statistics;
    'eval' attacks the running-statistics net, as TRADES/MART do and as evaluation does.
    ``mix`` (cutmix, mixup): the clean batch is mixed before the attack, which targets the dominant
    labels; the loss is CE against the mixed labels (``defenses.mixing``)."""

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
    ):
        super().__init__(label_smoothing=label_smoothing)
        self.mixing = Mixing(mix, mix_alpha, mix_prob)
        self.attack = PGD(eps=eps, norm=norm, steps=steps, step_size=step_size, random_start=random_start,
                          model_mode=attack_mode)

    def prepare(self, model: nn.Module, x, y) -> Batch:
        x, y, minor = self.mixing(x, y)
        return Batch(x, y, x_adv=self.attack.scaled(self.eps_scale)(model, x, y), mix=minor)

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        logits = model(batch.x_adv)
        return DefenseOutput(
            loss=self.batch_cross_entropy(logits, batch),
            views=[View(batch.x_adv, logits)],
            search_x=batch.x_adv,
            search_y=batch.y,
            logits=logits,
        )
