"""Per-example correctness and clean / robust accuracy of a model on a dataset."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from advews.attacks import Attack
from advews.evaluation.progress import progress


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
    with_clean: bool = False,
    desc: Optional[str] = None,
):
    """Per-example bool on the CPU, in dataset order: classified correctly clean, and with ``attack``
    also after it (a point is robust only if it is correct both ways: the per-point worst case).
    ``with_clean`` also returns the clean flags of the same pass, as ``(clean, robust)``. ``desc``
    names a progress bar, shown on a terminal only.

    The model is evaluated in eval mode and left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    clean, robust = [], []
    try:
        batches = dataset.batches(batch_size, device=device)
        for x, y in progress(batches, desc, total=dataset.num_batches(batch_size)):
            ok = _predict(model, x) == y
            clean.append(ok.cpu())
            if attack is not None:
                ok = ok & (_predict(model, attack(model, x, y)) == y)
            robust.append(ok.cpu())
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.bool)
    robust_flags = torch.cat(robust) if robust else empty
    return ((torch.cat(clean) if clean else empty), robust_flags) if with_clean else robust_flags


def robust_accuracy(
    model: nn.Module,
    dataset,
    attack: Optional[Attack] = None,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    desc: Optional[str] = None,
) -> Dict[str, float]:
    """Clean accuracy and, with an attack, robust accuracy (the per-point worst case); ``desc``
    names a progress bar, shown on a terminal only."""
    clean, robust = correct_flags(model, dataset, attack, batch_size=batch_size, device=device, with_clean=True,
                                  desc=desc)
    n = len(clean)
    out = {"clean_acc": float(clean.sum()) / max(n, 1), "n_examples": n}
    if attack is not None:
        out["robust_acc"] = float(robust.sum()) / max(n, 1)
    return out
