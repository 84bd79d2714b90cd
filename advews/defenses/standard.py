"""Standard (clean) training: cross-entropy on the clean batch."""

from __future__ import annotations

from torch import nn

from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.registry import register_defense


@register_defense
class Standard(Defense):
    adversarial = False

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        logits = model(batch.x)
        return DefenseOutput(
            loss=self.cross_entropy(logits, batch.y),
            views=[View(batch.x, logits)],
            search_x=batch.x,
            search_y=batch.y,
            logits=logits,
        )
