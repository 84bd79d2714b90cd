"""The worst case of per-example robustness flags (``robust.correct_flags``) over several attacks.

An accuracy per attack hides which points each attack breaks; a point is robust to a set of attacks
only if every one of them fails on it, so the worst case is the AND of per-example flags, never the
minimum of the accuracies (which overestimates robustness when attacks break different points).
"""

from __future__ import annotations

from typing import Mapping

import torch
from advews.errors import AdvewsError


def worst_case(robust: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Robust under every attack: the AND of the per-attack flags (each already requires clean
    correctness)."""
    if not robust:
        raise AdvewsError("the worst case needs the flags of at least one attack")
    flags = list(robust.values())
    out = flags[0].clone()
    for name, f in robust.items():
        if f.shape != out.shape:
            raise AdvewsError(f"flags of {name!r} have shape {tuple(f.shape)}, expected {tuple(out.shape)}")
        out &= f.to(out.device)
    return out
