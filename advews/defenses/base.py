"""The Defense contract: the seam every training objective, and the EWS mixin, plugs into.

One training step of the single training loop is

    batch = defense.prepare(model, x, y)        # e.g. craft adversarial examples (weights untouched)
    defense.begin_step(model, batch)            # e.g. AWP perturbs the weights
    optimizer.zero_grad()
    out = defense.training_loss(model, batch, backward)  # the objective (+ the EWS term when mixed in)
    if not out.backpropagated:
        backward(out.loss)
    optimizer.step()
    defense.end_step(model)                     # e.g. AWP restores the weights

A defense implements ``loss``: it returns the loss and says which views (input, full-net logits,
weight) a subnet should be distilled on and which view a weak-subnet search should score subnets
on. Mixins (EWS, AWP) wrap ``training_loss``/``begin_step``/``end_step`` and never need to know
which defense they wrap.

``backward`` (a ``Backward``, or None when called outside the loop) lets ``training_loss``
backpropagate its loss in parts, so that each part's graph is freed before the next part's forward
(EWS backpropagates the defense's loss before the subnet forward: the peak memory is the larger
graph, not the sum). Gradients add up over its calls; forwards and backwards inside
``backward.local()`` skip DDP's gradient all-reduce, so a step still all-reduces once, in its last
backward. A ``training_loss`` that calls ``backward`` passes all of its loss through it and returns
``backpropagated=True``, with ``loss`` the (detached) total for the metrics and the divergence guard.
A defense implementing only ``loss`` never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ContextManager, Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class View:
    """An input the full net was run on, its logits and the weight of distilling a subnet on it."""

    x: torch.Tensor
    logits: torch.Tensor
    weight: float = 1.0


@dataclass
class Batch:
    """What ``prepare`` produced: the clean batch plus anything crafted from it. ``mix``: for a
    CutMix/MixUp batch, the labels of the smaller share and that share (``y`` holds the dominant
    labels; see ``defenses.mixing``)."""

    x: torch.Tensor
    y: torch.Tensor
    x_adv: Optional[torch.Tensor] = None
    mix: Optional[Tuple[torch.Tensor, float]] = None


@dataclass
class DefenseOutput:
    loss: torch.Tensor
    views: List[View]
    search_x: torch.Tensor
    search_y: torch.Tensor
    logits: torch.Tensor  # the logits training accuracy is reported on (search view's logits)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    backpropagated: bool = False  # training_loss already passed all of ``loss`` through ``backward``


class Backward(Protocol):
    """The loop's backward pass, handed to ``training_loss`` (see the module docstring)."""

    def __call__(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` now; gradients add up over a step's calls."""

    def local(self) -> ContextManager[None]:
        """Forwards and backwards inside it do not all-reduce gradients (DDP ``no_sync``)."""


class Defense:
    """Base class: subclasses set ``adversarial`` and implement ``loss`` (and ``prepare`` if needed)."""

    adversarial: bool = False

    def __init__(self, label_smoothing: float = 0.0):
        from advews.defenses.params import require_number

        require_number("label_smoothing", label_smoothing, "in [0, 1)")
        if not 0.0 <= label_smoothing < 1.0:
            from advews.errors import AdvewsError

            raise AdvewsError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.eps_scale = 1.0
        self.epoch = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def setup(self, model: nn.Module) -> None:
        """Called once with the model before training (mixins build their state here)."""

    def set_progress(self, epoch: int, eps_scale: float) -> None:
        """The loop reports the epoch and the attack-strength ramp factor before each step."""
        self.epoch, self.eps_scale = epoch, eps_scale

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def batch_cross_entropy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy against the batch's labels, mixed ones included (CutMix/MixUp)."""
        if batch.mix is None:
            return self.cross_entropy(logits, batch.y)
        minor, share = batch.mix
        return (1 - share) * self.cross_entropy(logits, batch.y) + share * self.cross_entropy(logits, minor)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
        return Batch(x, y)

    def loss(self, model: nn.Module, batch: Batch) -> DefenseOutput:
        raise NotImplementedError  # abstract

    def search_view(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The inputs and labels a weak-subnet search scores subnets on: the adversarial batch for
        adversarial defenses (robust accuracy), the clean batch otherwise. Known before ``loss`` runs,
        so a search can be updated before AWP perturbs the weights. A label of -1 marks a row the
        subnet is run on (it shares the BN batch) but not scored on."""
        if self.adversarial and batch.x_adv is not None:
            return batch.x_adv, batch.y
        return batch.x, batch.y

    def training_loss(self, model: nn.Module, batch: Batch, backward: Optional[Backward] = None) -> DefenseOutput:
        """The step's objective; ``backward``: see the module docstring (a plain defense leaves it to the loop)."""
        return self.loss(model, batch)

    def begin_step(self, model: nn.Module, batch: Batch) -> None:
        """Before the training forward (weights may be changed here and put back in ``end_step``)."""

    def end_step(self, model: nn.Module) -> None:
        """After the optimizer step."""

    def state_dict(self) -> dict:
        """Learned state that must survive a resume (e.g. the EWS controller)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name} has no state to load, got keys {sorted(state)}")
