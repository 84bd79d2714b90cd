"""CutMix (Yun et al. 2019) and MixUp (Zhang et al. 2018) for the defenses that can train on mixed
labels: Standard, AT and TRADES (its clean cross-entropy), following Rebuffi et al. 2021 ("Data
augmentation can improve robustness"), where CutMix on TRADES improved robust accuracy.

Each batch is mixed with a random permutation of itself with a Beta(alpha, alpha) weight (CutMix:
the weight of a pasted box's area, recomputed after clipping the box to the image). The mixed batch
carries two label sets: ``y``, the labels of the larger share (the "dominant" ones), and
``(y_minor, w)`` with w <= 0.5 the share of the other images; a defense's cross-entropy becomes
(1 - w) * CE(y) + w * CE(y_minor), i.e. CE against the mixed label distribution
(``attacks.pgd.MixedLabels``), without label smoothing unless the defense's ``smooth_mixed_labels`` is
set (DM-Improves-AT and Rebuffi et al. train on the unsmoothed mixed label; ``Standard`` has no such
switch and still smooths it). The training attacks
move away from the mixed label distribution by default, as Rebuffi et al. and DM-Improves-AT do
(``mix_attack_target='mixed'``: AT's PGD maximises the soft-label CE, TRADES's attack
KL(mixed || p(x'))); ``'dominant'`` (AT) and ``'prediction'`` (TRADES) keep the older behaviour.
Where a defense needs ONE label per example it uses the dominant one: training accuracy and the EWS
search's accuracy reward. Not defined for MART (its loss weighs examples by p(y|x) of one label) and
for AutoAugment/AugMix (they augment in their own prepare). Draws come from torch's global RNG,
which checkpoints save, so a resumed run mixes the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from advews.attacks.pgd import MixedLabels
from advews.defenses.base import Batch
from advews.errors import AdvewsError

MIXES = ("none", "cutmix", "mixup")
Minor = Optional[Tuple[torch.Tensor, float]]


def require_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """One line for a gin string setting outside ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise AdvewsError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, mix: Minor, label_smoothing: float,
                        smooth_mixed: bool) -> torch.Tensor:
    """Mean CE against the batch's labels; a mixed batch's label is smoothed only if ``smooth_mixed``."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if mix is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    smoothing = label_smoothing if smooth_mixed else 0.0
    minor, share = mix
    return (1 - share) * F.cross_entropy(logits, y, label_smoothing=smoothing) + \
        share * F.cross_entropy(logits, minor, label_smoothing=smoothing)


@dataclass(frozen=True)
class Mixing:
    """``mode`` none | cutmix | mixup, Beta(``alpha``, ``alpha``) weights, applied to a batch with
    probability ``prob`` (1.0: every batch, as Rebuffi et al.)."""

    mode: str = "none"
    alpha: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        from advews.defenses.params import require_number

        require_number("mix_alpha", self.alpha, "> 0")
        require_number("mix_prob", self.prob, "in [0, 1]")
        if self.mode not in MIXES:
            raise AdvewsError(f"mix must be one of {', '.join(MIXES)}, got {self.mode!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise AdvewsError(f"mix_alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.prob <= 1.0:
            raise AdvewsError(f"mix_prob must be in [0, 1], got {self.prob}")

    def attacked(self, attack: Any, model: Any, x: torch.Tensor, y: torch.Tensor, away_from_mix: bool) -> Batch:
        """Mix the batch, then craft x_adv: away from the mixed label distribution when the batch
        was mixed and ``away_from_mix`` (the references' target), else with the attack's own target."""
        x, y, minor = self(x, y)
        if minor is not None and away_from_mix:
            x_adv = attack.away_from(model, x, MixedLabels(y, *minor))
        else:
            x_adv = attack(model, x, y)
        return Batch(x, y, x_adv=x_adv, mix=minor)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Minor]:
        """(mixed x, dominant labels, (minor labels, minor share) or None when not mixed)."""
        if self.mode == "none" or x.shape[0] < 2 or (self.prob < 1 and float(torch.rand(())) >= self.prob):
            return x, y, None
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        perm = torch.randperm(x.shape[0]).to(x.device)
        if self.mode == "mixup":
            mixed = lam * x + (1 - lam) * x[perm]
        else:
            mixed, lam = cutmix(x, x[perm], lam)
        if lam >= 0.5:
            return mixed, y, (y[perm], 1 - lam)
        return mixed, y[perm], (y, lam)


def cutmix(x: torch.Tensor, other: torch.Tensor, lam: float) -> Tuple[torch.Tensor, float]:
    """Paste a box of ``other`` covering about 1 - lam of the area into ``x``; returns the mixed
    batch and the exact share of ``x`` left after clipping the box to the image."""
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
