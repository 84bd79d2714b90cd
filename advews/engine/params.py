"""Type and range checks for gin settings: a wrong type in a binding (``train.epochs = 'ten'``) is one
clear line before anything is built or written, never a TypeError deep inside the run."""

from __future__ import annotations

import math
from typing import Any, Optional

from advews.errors import AdvewsError, require_bool  # noqa: F401  (re-exported)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(name: str, value: Any, minimum: Optional[int] = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    what = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
    if not _is_int(value):
        raise AdvewsError(f"{name} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise AdvewsError(f"{name} must be >= {minimum}, got {value}")


def require_number(name: str, value: Any, minimum: Optional[float] = None, positive: bool = False,
                   allow_none: bool = False) -> None:
    """A finite int or float; ``minimum`` inclusive, ``positive`` strictly above 0."""
    if value is None and allow_none:
        return
    bound = " > 0" if positive else f" >= {minimum}" if minimum is not None else ""
    what = f"a finite number{bound}" + (" or None" if allow_none else "")
    if not _is_number(value) or not math.isfinite(value):
        raise AdvewsError(f"{name} must be {what}, got {value!r}")
    if (positive and value <= 0) or (minimum is not None and value < minimum):
        raise AdvewsError(f"{name} must be{bound}, got {value}")


def require_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise AdvewsError(f"{name} must be a string, got {value!r}")
