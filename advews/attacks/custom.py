"""A user's own attack named ``MODULE:CLASS`` (``attacks.multi_targeted:MultiTargetedPGD``), as
``advews-eval --attack`` and ``AT.attack`` take it: the class is imported by module name and must
subclass ``Attack``; every refusal is one line naming the value and what is allowed.

The module must be importable: the CLIs put the working directory on ``sys.path`` first, so a user
folder such as ``attacks/`` next to where advews-train/advews-eval run is found. It may be imported
after gin's config is finalized (AT builds its attack then), so the import may register configurables
(``@gin.configurable``); their bindings need the module imported by the recipe (gin's ``import``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, Type

import gin

from advews.attacks.base import Attack
from advews.errors import AdvewsError

SPEC_FORM = "MODULE:CLASS, a subclass of advews.attacks.Attack importable from the working directory"


def is_spec(name: str) -> bool:
    """Whether ``name`` names a user attack (``MODULE:CLASS``) rather than a built-in attack."""
    return ":" in name


def attack_class(spec: str, what: str = "--attack") -> Type[Attack]:
    """The Attack subclass ``spec`` (``MODULE:CLASS``) names; ``what`` is the flag or gin setting
    the refusal names (an ImportError raised inside the module is reported with its own message)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name or ":" in name:
        raise AdvewsError(f"{what} {spec!r} is not of the form {SPEC_FORM}")
    try:
        with gin.unlock_config():  # a @gin.configurable attack imported after the config was finalized (AT.attack)
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise AdvewsError(f"{what} {spec!r}: cannot import {module_name!r} ({e}); give {SPEC_FORM}") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise AdvewsError(f"{what} {spec!r}: module {module_name!r} has no {name!r}; give {SPEC_FORM}")
    return check_attack_class(cls, f"{what} {spec!r}")


def check_attack_class(cls: Any, where: str) -> Type[Attack]:
    """``cls`` itself when it is a concrete Attack subclass, else a one-line refusal naming ``where``."""
    if not isinstance(cls, type):
        raise AdvewsError(f"{where} is a {type(cls).__name__}, not a class; give {SPEC_FORM}")
    if not issubclass(cls, Attack):
        raise AdvewsError(f"{where} is the class {cls.__module__}.{cls.__qualname__}, not an attack; "
                          f"give {SPEC_FORM}")
    if getattr(cls, "__abstractmethods__", None):
        raise AdvewsError(f"{where} is abstract (it does not implement {', '.join(sorted(cls.__abstractmethods__))}); "
                          f"give {SPEC_FORM}")
    return cls


def build_custom(cls: Type[Attack], what: str, **options: Any) -> Attack:
    """``cls`` with ``options`` (eps, norm and the caller's settings); options ``cls`` has no field for
    (``steps`` for a one-step attack) and None values keep its default. A bad value is the class's
    own one-line AdvewsError; a TypeError of its constructor is one line naming ``what``."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {k: v for k, v in options.items() if k in names and v is not None}
    try:
        return cls(**kwargs)
    except TypeError as e:
        message = " ".join(str(e).split())
        raise AdvewsError(f"{what}: {cls.__qualname__}({', '.join(kwargs)}) failed: {message}") from None
