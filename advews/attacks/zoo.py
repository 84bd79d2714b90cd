"""Extra evaluation attacks from torchattacks, adapted to the ``Attack`` contract and selectable by name.

Each attack builds its torchattacks counterpart on the frozen model inside ``perturb`` and projects
the result onto the eps-ball and [0, 1]: a no-op up to rounding for the budgeted attacks, and the
threat-model restriction for CW, which minimises the L2 distance without a budget (a point CW fools
only beyond eps is robust for this threat model unless the projected point still fools).

torchattacks' own AutoAttack is deliberately not offered: it runs 10-step APGD and other settings
unlike the reference, so its numbers are not AutoAttack numbers. ``advews.attacks.autoattack`` runs
the reference through pyautoattack.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import nn

from advews.attacks.ball import project
from advews.attacks.base import Attack
from advews.errors import AdvewsError


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise AdvewsError("the torchattacks attacks need torchattacks: pip install torchattacks") from None
    return torchattacks


class _Logits(nn.Module):
    """The model as torchattacks sees it: forward passes under the attack's autocast, fp32 logits."""

    def __init__(self, attack: Attack, model: nn.Module):
        super().__init__()
        self.attack = attack
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attack.logits(self.model, x)


@dataclass
class TorchAttack(Attack):
    """A torchattacks attack run on the frozen model; its output is projected onto the threat model."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        # eval() before torchattacks sees it: it restores train mode on exit if the module it got
        # was training, which would undo ``frozen`` on the wrapped model.
        x_adv = self.build(_torchattacks(), _Logits(self, model).eval())(x, y)
        return project(x, x_adv.to(x.dtype), self.eps, self.norm)

    @abstractmethod
    def build(self, ta: Any, model: nn.Module) -> Any:
        """The torchattacks attack on ``model`` (``ta`` is the torchattacks module)."""


@dataclass
class CW(TorchAttack):
    """Carlini-Wagner L2 (Adam on tanh-space inputs, margin ``kappa``, trade-off ``c``)."""

    c: float = 1.0
    kappa: float = 0.0
    steps: int = 50
    lr: float = 0.01

    def build(self, ta: Any, model: nn.Module) -> Any:
        return ta.CW(model, c=self.c, kappa=self.kappa, steps=self.steps, lr=self.lr)


@dataclass
class APGD(TorchAttack):
    """torchattacks' APGD (Croce & Hein 2020) on the cross-entropy or DLR loss; 100 steps as in
    AutoAttack by default (torchattacks' own default is 10)."""

    loss: str = "ce"
    steps: int = 100
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("ce", "dlr"):
            raise AdvewsError(f"APGD loss must be ce or dlr, got {self.loss!r}")
        _check_restarts(self.restarts)

    def build(self, ta: Any, model: nn.Module) -> Any:
        return ta.APGD(model, norm=self.norm, eps=self.eps, steps=self.steps, n_restarts=self.restarts,
                       seed=self.seed, loss=self.loss)


@dataclass
class Square(TorchAttack):
    """Square Attack (Andriushchenko et al. 2020): score-based, no gradients, one query per step;
    catches gradient masking that fools the gradient attacks."""

    steps: int = 5000
    restarts: int = 1
    p_init: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_restarts(self.restarts)

    def build(self, ta: Any, model: nn.Module) -> Any:
        return ta.Square(model, norm=self.norm, eps=self.eps, n_queries=self.steps, n_restarts=self.restarts,
                         p_init=self.p_init, seed=self.seed)


@dataclass
class FAB(TorchAttack):
    """Untargeted FAB (Croce & Hein 2020), a minimal-distance attack within eps; 100 steps as in
    AutoAttack by default (torchattacks' own default is 10)."""

    steps: int = 100
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_restarts(self.restarts)

    def build(self, ta: Any, model: nn.Module) -> Any:
        return ta.FAB(model, norm=self.norm, eps=self.eps, steps=self.steps, n_restarts=self.restarts,
                      seed=self.seed)


@dataclass
class MIFGSM(TorchAttack):
    """Momentum iterative FGSM (Dong et al. 2018), Linf only; step size eps / steps unless given."""

    steps: int = 10
    step_size: Optional[float] = None
    decay: float = 1.0

    def __post_init__(self) -> None:
        if self.step_size is None:
            self.step_size = self.eps / max(self.steps, 1)
        super().__post_init__()
        if self.norm != "Linf":
            raise AdvewsError(f"mifgsm attacks Linf only, got norm {self.norm!r}")

    def build(self, ta: Any, model: nn.Module) -> Any:
        return ta.MIFGSM(model, eps=self.eps, alpha=self.step_size, steps=self.steps, decay=self.decay)


def _check_restarts(restarts: int) -> None:
    if restarts < 1:
        raise AdvewsError(f"restarts must be >= 1, got {restarts}")


ZOO: Dict[str, Tuple[Type[TorchAttack], Dict[str, Any]]] = {
    "cw": (CW, {}),
    "apgd-ce": (APGD, {"loss": "ce"}),
    "apgd-dlr": (APGD, {"loss": "dlr"}),
    "square": (Square, {}),
    "fab": (FAB, {}),
    "mifgsm": (MIFGSM, {}),
}
"""Name -> (attack class, fixed fields)."""


def build_zoo_attack(
    name: str,
    *,
    eps: float,
    norm: str = "Linf",
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    restarts: int = 1,
    seed: int = 0,
) -> TorchAttack:
    """The torchattacks attack registered under ``name``. Options the attack has no field for are
    ignored (CW has no restarts), and None keeps its default; for square ``steps`` is the query budget."""
    if name not in ZOO:
        raise AdvewsError(f"unknown torchattacks attack {name!r}; choose one of {', '.join(ZOO)}")
    cls, fixed = ZOO[name]
    names = {f.name for f in dataclasses.fields(cls)}
    options = {"steps": steps, "step_size": step_size, "restarts": restarts, "seed": seed}
    return cls(eps=eps, norm=norm, **fixed, **{k: v for k, v in options.items() if k in names and v is not None})
