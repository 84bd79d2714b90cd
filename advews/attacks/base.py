"""The attack contract: a dataclass of hyper-parameters plus ``perturb``; the base handles the rest."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Optional

import torch
from torch import nn

from advews.errors import AdvewsError

NORMS = ("Linf", "L2")


MODEL_MODES = ("eval", "train")


@contextlib.contextmanager
def frozen(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """``mode`` (eval or train) and no parameter gradients while attacking, then restore every flag.

    Flags are recorded per submodule and per parameter, because callers (EWS subnets, partly frozen
    fine-tuning) rely on mixed states surviving an attack; restoring only the top-level mode would not.
    In train mode BatchNorm uses batch statistics and every attack forward updates its running
    statistics (and dropout is active), as in the AT reference scripts.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.train(mode == "train")
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


@dataclass
class Attack(ABC):
    """Base of all attacks: validated hyper-parameters, input checks, ``frozen`` model, detached output.

    Subclasses add fields and implement ``perturb``. Inputs and outputs are in [0, 1] pixel space.
    ``autocast``, when set, is a zero-argument factory of a context manager (e.g.
    ``lambda: torch.autocast("cuda", torch.bfloat16)``) that wraps the model's forward passes; losses
    and gradients stay fp32 w.r.t. the fp32 adversarial input. Pass fields by keyword.
    ``model_mode``: the mode the model runs in while attacked. 'eval' (evaluation, and the TRADES and
    MART training attacks) or 'train' (the training attacks of the AT reference scripts:
    robust_overfitting, AWP's AT_AWP, EWS's train_adv_at), see ``frozen``.
    """

    eps: float
    norm: str = "Linf"
    model_mode: str = "eval"
    autocast: Optional[Callable[[], ContextManager[Any]]] = field(default=None, repr=False, compare=False)

    needs_labels: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.eps) or self.eps < 0:
            raise AdvewsError(f"eps must be >= 0 and finite, got {self.eps}")
        if self.norm not in NORMS:
            raise AdvewsError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.model_mode not in MODEL_MODES:
            raise AdvewsError(f"model_mode must be one of {', '.join(MODEL_MODES)}, got {self.model_mode!r}")
        steps = getattr(self, "steps", 1)
        if steps < 1:
            raise AdvewsError(f"steps must be >= 1, got {steps}")
        step_size = getattr(self, "step_size", 0.0)
        if not math.isfinite(step_size) or step_size < 0:
            raise AdvewsError(f"step_size must be >= 0 and finite, got {step_size}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adversarial examples for ``x`` (labels or targets ``y``); the model's flags are left untouched."""
        self._check_inputs(x, y)
        x = x.detach()
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        with frozen(model, self.model_mode), torch.enable_grad():  # also when called from user code under no_grad
            x_adv = self.perturb(model, x, None if y is None else y.detach())
        return x_adv.detach()

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """Craft x_adv; called with the model frozen, ``x`` detached and ``y`` checked."""

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward pass under the optional autocast, returned in fp32 so losses are computed in fp32."""
        if self.autocast is None:
            return model(x).float()  # a no-op in fp32; under an outer autocast, fp32 losses
        with self.autocast():
            return model(x).float()

    def scaled(self, factor: float) -> "Attack":
        """A copy with eps (and step_size, if any) times ``factor``: eps ramp-up keeps the step/eps ratio."""
        changes = {"eps": self.eps * factor}
        if any(f.name == "step_size" for f in dataclasses.fields(self)):
            changes["step_size"] = getattr(self, "step_size") * factor
        return dataclasses.replace(self, **changes)

    def _check_inputs(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise AdvewsError(f"{name}: x must be a floating-point batch of shape (N, ...), got {_describe(x)}")
        if y is None:
            if self.needs_labels:
                raise AdvewsError(f"{name} needs labels (or target labels): pass y of shape ({x.shape[0]},)")
        elif not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
            raise AdvewsError(f"{name}: y must be an int64 tensor of shape ({x.shape[0]},), got {_describe(y)}")
        if x.shape[0] == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        if bool((lo < 0) | (hi > 1)):
            raise AdvewsError(
                f"{name}: x must lie in [0, 1] (normalise inside the model), "
                f"got range [{lo.item():.4g}, {hi.item():.4g}]"
            )


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
