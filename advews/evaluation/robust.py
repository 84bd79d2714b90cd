"""Clean and robust accuracy of a model on a dataset."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from advews.attacks import Attack


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def robust_accuracy(
    model: nn.Module,
    dataset,
    attack: Optional[Attack] = None,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
) -> Dict[str, float]:
    """Clean accuracy and, with an attack, robust accuracy (a point counts as robust only if it is
    classified correctly both clean and attacked: the per-point worst case).

    The model is evaluated in eval mode and left in the mode it came in."""
    was_training = model.training
    model.eval()
    clean = robust = total = 0
    try:
        for x, y in dataset.batches(batch_size, device=device):
            ok = _predict(model, x) == y
            clean += int(ok.sum())
            if attack is not None:
                x_adv = attack(model, x, y)
                robust += int((ok & (_predict(model, x_adv) == y)).sum())
            total += len(y)
    finally:
        model.train(was_training)
    out = {"clean_acc": clean / max(total, 1), "n_examples": total}
    if attack is not None:
        out["robust_acc"] = robust / max(total, 1)
    return out
