"""The TRADES inner maximisation (Zhang et al. 2019): push p(x') away from p(x) in KL, no labels."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from advews.attacks.ball import ascent_step, normal_start, project, random_start
from advews.attacks.base import Attack, frozen
from advews.attacks.pgd import STARTS, MixedLabels
from advews.errors import AdvewsError


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module, freeze: bool = True) -> Iterator[None]:
    """While inside, BatchNorm layers in train mode normalise with batch statistics without
    updating their running statistics (``track_running_stats = False``, as DM-Improves-AT's
    ``track_bn_stats(model, False)``); every layer's flag is restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if freeze else []
    saved = [m.track_running_stats for m in norms]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(norms, saved):
            m.track_running_stats = flag


@dataclass
class TradesKL(Attack):
    """Maximise KL(p(x) || p(x')) summed over classes and batch.

    Defaults are the TRADES CIFAR settings, in eval mode as the TRADES code attacks. The start is
    fed unclipped, as the reference does (``clamp_start=False``); ``clamp_start=True`` first clips it
    to [0, 1]. That is not a 0.001-scale difference: on saturated images the first gradient differs
    at every pixel the noise pushed out of the box and the sign steps then part: on the quickstart's
    AT model (500 MNIST test digits, eps 0.3, 10 steps of 0.05, same noise) the two final x' differed
    at 35% of the pixels, by up to 2 eps (0.6). L2 uses the normalised-gradient step of PGD rather than the reference's SGD-on-delta variant.

    ``start``: 'normal', x + 0.001 N(0, 1) (the TRADES code), or 'uniform', x + U(-eps, eps) clipped to
    [0, 1] (DM-Improves-AT's trades_loss; L2: ``ball.random_start``). ``freeze_bn_stats``: with
    ``model_mode='train'``, BatchNorm uses the batch's statistics but its running statistics are not
    updated by the attack's forwards (DM-Improves-AT: ``model.train()`` + ``track_bn_stats(False)``).
    ``away_from`` maximises KL(mixed label distribution || p(x')) instead (CutMix/MixUp, as
    DM-Improves-AT's trades_loss with ``use_cutmix``: ``p_natural = y``).
    """

    eps: float = 0.031
    steps: int = 10
    step_size: float = 0.007
    clamp_start: bool = False
    start: str = "normal"
    freeze_bn_stats: bool = False

    needs_labels = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start not in STARTS:
            raise AdvewsError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if not isinstance(self.freeze_bn_stats, bool):
            raise AdvewsError(f"freeze_bn_stats must be True or False, got {self.freeze_bn_stats!r}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        with running_stats_frozen(model, self.freeze_bn_stats):
            return super().__call__(model, x, y)

    def away_from(self, model: nn.Module, x: torch.Tensor, labels: MixedLabels) -> torch.Tensor:
        """x' maximising KL(mixed label distribution || p(x')); the model's flags are left untouched."""
        self._check_inputs(x, labels.y)
        self._check_inputs(x, labels.minor)
        x = x.detach()
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        with running_stats_frozen(model, self.freeze_bn_stats), frozen(model, self.model_mode), torch.enable_grad():
            x_adv = self._ascend(model, x, labels.cross_entropy)
        return x_adv.detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            p_clean = F.softmax(self.logits(model, x), dim=1)

        def kl(logits: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(1)

        return self._ascend(model, x, kl)

    def _ascend(self, model: nn.Module, x: torch.Tensor, value) -> torch.Tensor:
        """Sign (L2: normalised) ascent on the summed per-example ``value(logits)``, projected each step."""
        if self.start == "uniform":
            x_adv = random_start(x, self.eps, self.norm)
        else:
            x_adv = normal_start(x, 0.001, clamp=self.clamp_start)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(value(self.logits(model, x_adv)).sum(), x_adv)
            x_adv = ascent_step(x_adv.detach(), grad, self.step_size, self.norm)
            x_adv = project(x, x_adv, self.eps, self.norm)
        return x_adv
