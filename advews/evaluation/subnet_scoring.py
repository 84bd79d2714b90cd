"""Scoring a model's full net and subnets on fixed inputs: the measurements that the subnet analysis
and the block-vulnerability study (Fig. 7) share, in their own module so neither imports the other.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from advews.attacks import Attack
from advews.evaluation.progress import progress
from advews.subnets import Subnet, set_bn_mode, subnet


def summarize(values: Sequence[float]) -> Dict:
    """Mean, 10th/50th/90th percentiles and count, plus the raw ``values`` (box plots need them)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(t.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "n": len(t),
            "values": [float(v) for v in t]}


def attacked(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Optional[Attack], batch_size: int,
    desc: Optional[str] = None,
) -> torch.Tensor:
    """Adversarial examples of ``x`` against the full net, batch by batch (``desc``: a progress bar)."""
    if attack is None:
        return x
    starts = range(0, len(x), batch_size)
    return torch.cat([attack(model, x[i:i + batch_size], y[i:i + batch_size]) for i in progress(starts, desc)])


@torch.no_grad()
def accuracies(
    model: nn.Module, views: Mapping[str, torch.Tensor], y: torch.Tensor, alpha: Optional[Subnet] = None,
    bn: str = "eval", batch_size: int = 256,
) -> Dict[str, float]:
    """Accuracy on each view (inputs sharing the labels ``y``) of the full net (alpha None) or of
    subnet alpha, inside one subnet context; the model's modes are restored.

    BN in eval mode classifies each example on its own, so the views' batches are concatenated into
    one forward of up to ``batch_size`` rows. In train mode the batch statistics depend on the batch,
    so each view runs alone in batches of ``batch_size``, as ``accuracy`` always has.
    """
    modes = [(m, m.training) for m in model.modules()]
    set_bn_mode(model, bn)
    names = list(views)
    correct = dict.fromkeys(names, 0)
    try:
        with subnet(model, alpha) if alpha is not None else contextlib.nullcontext():
            if bn == "eval":
                step = max(batch_size // len(names), 1)
                for i in range(0, len(y), step):
                    yb = y[i:i + step]
                    logits = model(torch.cat([views[k][i:i + step] for k in names]))
                    hits = (logits.argmax(1) == yb.repeat(len(names))).view(len(names), -1).sum(1)
                    for k, h in zip(names, hits.tolist()):
                        correct[k] += h
            else:
                for k in names:
                    for i in range(0, len(y), batch_size):
                        correct[k] += int((model(views[k][i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    finally:
        for m, training in modes:
            m.training = training
    return {k: c / max(len(y), 1) for k, c in correct.items()}


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: Optional[Subnet] = None,
    bn: str = "eval", batch_size: int = 256,
) -> float:
    """Accuracy of the full net (alpha None) or of subnet alpha; the model's modes are restored."""
    return accuracies(model, {"x": x}, y, alpha, bn, batch_size)["x"]
