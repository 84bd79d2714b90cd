"""Attacks in [0, 1] pixel space (normalisation lives inside the model), selectable by name."""

from __future__ import annotations

from typing import Any, Dict, Type

from advews.attacks.base import Attack, frozen
from advews.attacks.fgsm import FGSM
from advews.attacks.pgd import PGD
from advews.attacks.trades import TradesKL
from advews.errors import AdvewsError

ATTACKS: Dict[str, Type[Attack]] = {"pgd": PGD, "fgsm": FGSM, "trades": TradesKL}


def build_attack(name: str, **kwargs: Any) -> Attack:
    """The attack registered under ``name`` with the given fields, e.g. ``build_attack("pgd", eps=0.3)``."""
    if name not in ATTACKS:
        raise AdvewsError(f"unknown attack {name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    try:
        return ATTACKS[name](**kwargs)
    except TypeError as e:
        raise AdvewsError(f"bad options {kwargs} for attack {name!r}: {e}") from None


__all__ = ["ATTACKS", "Attack", "FGSM", "PGD", "TradesKL", "build_attack", "frozen"]
