"""Validation during training: clean and PGD accuracy per point (the per-point worst case, as
``evaluation.robust.correct_flags``), plus the class histogram of the clean predictions, which the
divergence guard needs to spot a collapsed model, and a progress bar on a terminal."""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from advews.attacks import Attack
from advews.errors import AdvewsError

VAL_LOSSES = ("ce", "cw", "cw_hinge")


def check_val_loss(loss) -> None:
    """``train.val_loss``: 'ce' (the validation PGD of robust_overfitting, TRADES, AWP and EWS), 'cw'
    (the unclipped CW margin) or 'cw_hinge' (DM-Improves-AT's CWLoss, margin capped at 0: its
    PGD-40 model selection on the EMA; see ``attacks.PGD``)."""
    if not isinstance(loss, str) or loss not in VAL_LOSSES:
        raise AdvewsError(f"train.val_loss must be one of {', '.join(repr(v) for v in VAL_LOSSES)}, got {loss!r}")


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def validation_counts(
    model: nn.Module,
    dataset,
    attack: Optional[Attack],
    num_classes: int,
    batch_size: int,
    device: torch.device,
    quiet: bool,
) -> torch.Tensor:
    """float64 tensor ``[clean correct, robust correct, n, *prediction histogram, *label histogram]``
    (a sum over ranks gives the totals). The model is evaluated in eval mode and left as it came."""
    was_training = model.training
    model.eval()
    clean = robust = 0
    preds = torch.zeros(num_classes, dtype=torch.float64, device=device)
    labels = torch.zeros(num_classes, dtype=torch.float64, device=device)
    bar = tqdm(dataset.batches(batch_size, device=device), total=dataset.num_batches(batch_size),
               desc="validation", disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        for x, y in bar:
            p = _predict(model, x)
            ok = p == y
            clean += int(ok.sum())
            if attack is not None:
                ok = ok & (_predict(model, attack(model, x, y)) == y)
                robust += int(ok.sum())
            preds += torch.bincount(p.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes].double()
            labels += torch.bincount(y.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes].double()
    finally:
        bar.close()
        model.train(was_training)
    head = torch.tensor([clean, robust, len(dataset)], dtype=torch.float64, device=device)
    return torch.cat([head, preds, labels])
