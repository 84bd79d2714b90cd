"""advews: robust training with Enhancing Weak Subnets (EWS) as a mixin on every defense.

The Python API mirrors the CLIs: ``advews.train`` (advews-train), ``advews.load_model``,
``advews.evaluate``, ``advews.analyze_subnets`` and ``advews.audit`` (advews-eval). They are imported on first use, so
``import advews`` stays fast and does not import torch. Each checks its arguments and raises
``AdvewsError`` with a one-line message (``advews.api.arguments``)."""

from __future__ import annotations

import importlib
from typing import Any, List

from advews.errors import AdvewsError

__version__ = "0.1.0"

# name -> the module defining it, imported when the name is first used
_LAZY = {
    "train": "advews.api.train",
    "load_model": "advews.api.models",
    "evaluate": "advews.api.evaluate",
    "analyze_subnets": "advews.api.subnets",
    "audit": "advews.api.audit",
}

__all__ = ["AdvewsError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'advews' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
