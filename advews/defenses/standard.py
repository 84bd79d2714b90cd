"""Standard (clean) training: cross-entropy on the clean batch, optionally CutMix/MixUp-ed."""

from __future__ import annotations

from torch import nn

from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.mixing import Mixing
from advews.defenses.registry import register_defense


@register_defense
class Standard(Defense):
    """``mix`` none | cutmix | mixup with Beta(``mix_alpha``) weights on a ``mix_prob`` share of the
    batches (``defenses.mixing``)."""

    adversarial = False

    def __init__(self, label_smoothing: float = 0.0, mix: str = "none", mix_alpha: float = 1.0,
                 mix_prob: float = 1.0):
        super().__init__(label_smoothing=label_smoothing)
        self.mixing = Mixing(mix, mix_alpha, mix_prob)

    def prepare(self, model: nn.Module, x, y) -> Batch:
        x, y, minor = self.mixing(x, y)
        return Batch(x, y, mix=minor)

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        logits = model(batch.x)
        return DefenseOutput(
            loss=self.batch_cross_entropy(logits, batch),
            views=[View(batch.x, logits)],
            search_x=batch.x,
            search_y=batch.y,
            logits=logits,
        )
