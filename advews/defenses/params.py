"""Type checks for the defenses' numeric gin settings: ``EWS.rho = 'a'`` or ``AT.eps = 'x'`` is one
line naming the setting, the value and the allowed range, not a TypeError from a comparison."""

from __future__ import annotations

import math
from typing import Any

from advews.errors import AdvewsError


def require_number(name: str, value: Any, allowed: str = "", integer: bool = False) -> None:
    """A finite int or float (an int with ``integer``); ``allowed`` describes the range the caller
    checks next, e.g. "in (0, 1]", so that the one message says everything that is allowed."""
    kind = "an integer" if integer else "a number"
    ok = (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
          and (integer or math.isfinite(value)))
    if not ok:
        raise AdvewsError(f"{name} must be {kind}{' ' + allowed if allowed else ''}, got {value!r}")


def require_at_least(name: str, value: Any, minimum: float, integer: bool = False) -> None:
    """A number (an int with ``integer``) >= ``minimum``."""
    require_number(name, value, f">= {minimum}", integer)
    if value < minimum:
        raise AdvewsError(f"{name} must be >= {minimum}, got {value}")


def attack_settings(defense: str, eps: Any, step_size: Any, steps: Any) -> None:
    """The training attack's numbers, checked by type before the attack compares them."""
    require_number(f"{defense}.eps", eps, ">= 0")
    require_number(f"{defense}.step_size", step_size, ">= 0")
    require_number(f"{defense}.steps", steps, ">= 1", integer=True)
