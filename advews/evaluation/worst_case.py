"""Per-example robustness flags and their worst case over several attacks.

An accuracy per attack hides which points each attack breaks; a point is robust to a set of attacks
only if every one of them fails on it, so the worst case is the AND of per-example flags, never the
minimum of the accuracies (which overestimates robustness when attacks break different points).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from advews.attacks import Attack
from advews.errors import AdvewsError


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def correct_flags(
    model: nn.Module,
    dataset,
    attack: Optional[Attack] = None,
    *,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Per-example bool on the CPU, in dataset order: classified correctly clean, and with ``attack``
    also after it (robust = correct both ways, as in ``robust_accuracy``).

    The model is evaluated in eval mode and left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    flags = []
    try:
        for x, y in dataset.batches(batch_size, device=device):
            ok = _predict(model, x) == y
            if attack is not None:
                ok &= _predict(model, attack(model, x, y)) == y
            flags.append(ok.cpu())
    finally:
        model.train(was_training)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


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
