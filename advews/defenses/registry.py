"""Defense registry: names -> classes, gin-configurable, with derived variants (``X_EWS``) made automatically.

``@register_defense`` makes a class gin-configurable under its own name and registers every variant
that a registered deriver makes of it. The EWS module registers a deriver that builds
``X_EWS = type("X_EWS", (EWSMixin, X), {})``, so a user's own ``@register_defense class MyDefense(AT)``
yields ``MyDefense`` and ``MyDefense_EWS`` with no extra code.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type

import gin

from advews.defenses.base import Defense
from advews.errors import AdvewsError

DEFENSES: Dict[str, Type[Defense]] = {}
_DERIVERS: List[Callable[[Type[Defense]], Optional[Type[Defense]]]] = []


def _add(cls: Type[Defense]) -> Type[Defense]:
    name = cls.__name__
    if name in DEFENSES and DEFENSES[name] is not cls:
        raise AdvewsError(f"a defense named {name!r} is already registered")
    if name not in DEFENSES:
        # gin replaces __init__ in place, so super() chains and isinstance keep working.
        cls = gin.configurable(name, module="advews")(cls)
        DEFENSES[name] = cls
    for derive in _DERIVERS:
        derived = derive(cls)
        if derived is not None and derived.__name__ not in DEFENSES:
            _add(derived)
    return cls


def register_defense(cls: Type[Defense]) -> Type[Defense]:
    """Class decorator: register ``cls`` (and its derived variants) by class name."""
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise TypeError(f"register_defense expects a Defense subclass, got {cls!r}")
    return _add(cls)


def register_deriver(derive: Callable[[Type[Defense]], Optional[Type[Defense]]]) -> None:
    """Register a function that makes a variant of a defense class (or returns None), and apply it now."""
    _DERIVERS.append(derive)
    for cls in list(DEFENSES.values()):
        derived = derive(cls)
        if derived is not None and derived.__name__ not in DEFENSES:
            _add(derived)


def get_defense(name: str) -> Type[Defense]:
    if name not in DEFENSES:
        raise AdvewsError(f"unknown defense {name!r}; choose one of {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def build_defense(name: str) -> Defense:
    """Instantiate a registered defense; its arguments come from gin bindings on its class names."""
    return get_defense(name)()
