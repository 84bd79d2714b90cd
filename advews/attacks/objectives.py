"""What label-based attacks maximise, per example: the attacker's objective and its success test.

Per-example values let PGD sum them (so an example's gradient does not depend on the batch size) and
compare restarts example by example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "cw")


def objective(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-example value the attacker maximises; for a targeted attack ``y`` holds the target labels.

    ce: cross-entropy to y (negated when targeted). cw: the Carlini-Wagner logit margin,
    max_{j != y} z_j - z_y (negated when targeted), which does not saturate like softmax does.
    """
    if loss == "ce":
        value = F.cross_entropy(logits, y, reduction="none")
    else:
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
        value = z_other - z_y
    return -value if targeted else value


def succeeded(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-example bool: misclassified (untargeted) or classified as the target (targeted)."""
    hit = logits.argmax(dim=1) == y
    return hit if targeted else ~hit
