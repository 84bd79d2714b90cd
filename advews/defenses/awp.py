"""Adversarial Weight Perturbation (AWP, Wu et al., NeurIPS 2020) as a mixin on any defense.

Each step the weights are moved, layer by layer, towards a nearby point where the defense's own loss
on the already-crafted adversarial batch is higher, the training gradient is taken there, and the
perturbation is removed after the optimizer step, so the update flattens the robust loss landscape.
This is the paper's algorithm, not the SAM-style shortcut: a proxy copy of the model takes one SGD
ascent step on the defense loss; for every weight with ``dim() > 1`` (conv/linear; BN parameters
and biases are left alone) the direction ``d = w_proxy - w`` is rescaled to the layer's own norm,
``v = gamma * ||w|| / ||d|| * d``. The attack in ``prepare`` runs at the unperturbed weights; the
training loss (and the EWS subnet forward, when mixed in) runs at ``w + v``.
"""

from __future__ import annotations

import copy
from typing import ClassVar, List, Optional, Tuple

import gin
import torch
from torch import nn

from advews import collectives
from advews.defenses.at import AT
from advews.defenses.base import Batch
from advews.defenses.params import require_number
from advews.defenses.registry import register_defense
from advews.defenses.trades import TRADES
from advews.errors import AdvewsError, require_bool


@gin.configurable("AWP", module="advews")
class AWPMixin:
    """Mix in before an (adversarial) defense: ``class AT_AWP(AWPMixin, AT)``.

    ``gamma`` (relative perturbation size) and ``warmup_epochs`` (epochs trained without AWP) default
    to the composed class's ``awp_default_*``: the paper's AT setting (0.01, none) unless overridden.
    ``lr`` is the proxy's SGD step size (the paper's 0.01). With one plain SGD step ``d = lr * grad``,
    so lr cancels in ``v``; it only has to be large enough that ``w_proxy - w`` is not lost to float
    rounding of ``w``. ``smooth_proxy_labels``: whether the proxy's ascent loss uses the defense's
    label smoothing; off by default, as AWP's code takes plain CE for the proxy.
    """

    awp_default_gamma: ClassVar[float] = 0.01
    awp_default_warmup_epochs: ClassVar[int] = 0

    def __init__(
        self,
        *args,
        gamma: Optional[float] = None,
        lr: float = 0.01,
        warmup_epochs: Optional[int] = None,
        smooth_proxy_labels: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.gamma = self.awp_default_gamma if gamma is None else gamma
        self.warmup_epochs = self.awp_default_warmup_epochs if warmup_epochs is None else warmup_epochs
        require_number("AWP.gamma", self.gamma, ">= 0")
        require_number("AWP.lr", lr, "> 0")
        require_number("AWP.warmup_epochs", self.warmup_epochs, ">= 0", integer=True)
        require_bool("AWP.smooth_proxy_labels", smooth_proxy_labels)
        if self.gamma < 0:
            raise AdvewsError(f"AWP.gamma must be >= 0, got {self.gamma}")
        if lr <= 0:
            raise AdvewsError(f"AWP.lr must be > 0, got {lr}")
        if self.warmup_epochs < 0:
            raise AdvewsError(f"AWP.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        self.lr, self.smooth_proxy_labels = lr, smooth_proxy_labels
        self.proxy: Optional[nn.Module] = None
        self.proxy_optimizer: Optional[torch.optim.Optimizer] = None
        self.perturbation: List[Tuple[nn.Parameter, torch.Tensor]] = []

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        # One copy for the whole run, refreshed with load_state_dict each step (no per-step allocation).
        self.proxy = copy.deepcopy(model)
        self.proxy_optimizer = torch.optim.SGD(self.proxy.parameters(), lr=self.lr)

    def active(self) -> bool:
        """Whether AWP perturbs this step (off during the warm-up epochs)."""
        return self.gamma > 0 and self.epoch >= self.warmup_epochs

    def begin_step(self, model: nn.Module, batch: Batch) -> None:
        super().begin_step(model, batch)
        if self.proxy is None:
            raise RuntimeError(f"{self.name}.setup(model) must be called before training")
        if self.perturbation:
            raise RuntimeError(f"{self.name}.begin_step called again before end_step restored the weights")
        if not self.active():
            return
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        # The defense's own objective, not training_loss: the EWS term is no part of the ascent.
        smoothing = self.label_smoothing
        if not self.smooth_proxy_labels:
            self.label_smoothing = 0.0
        try:
            ascent = -self.loss(self.proxy, batch).loss
        finally:
            self.label_smoothing = smoothing
        self.proxy_optimizer.zero_grad(set_to_none=True)
        ascent.backward()
        collectives.average_gradients(self.proxy)  # one proxy step, identical on every rank
        self.proxy_optimizer.step()
        self.proxy_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for w, w_proxy in zip(model.parameters(), self.proxy.parameters()):
                if w.dim() <= 1:
                    continue
                d = w_proxy - w
                v = d * (self.gamma * w.norm() / (d.norm() + 1e-20))
                w.add_(v)
                self.perturbation.append((w, v))

    def end_step(self, model: nn.Module) -> None:
        """Subtract the ``v`` that ``begin_step`` added, keeping the optimizer's update (nothing in warm-up)."""
        with torch.no_grad():
            for w, v in self.perturbation:
                w.sub_(v)
        self.perturbation = []
        super().end_step(model)


@register_defense
class AT_AWP(AWPMixin, AT):
    """Madry AT with AWP: gamma 0.01, no warm-up (the paper's AT-AWP setting)."""

    awp_default_gamma = 0.01
    awp_default_warmup_epochs = 0


@register_defense
class TRADES_AWP(AWPMixin, TRADES):
    """TRADES with AWP: gamma 0.005 after 10 warm-up epochs (the paper's TRADES-AWP setting)."""

    awp_default_gamma = 0.005
    awp_default_warmup_epochs = 10
