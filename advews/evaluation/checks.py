"""Refuse evaluation data a model cannot score meaningfully, before any attack runs (in the spirit
of AutoAttack's checks.py): an empty set, images whose (C, H, W) is not the model's, a model that
does not return (N, classes) logits, labels outside the model's classes. One line each."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from advews.errors import AdvewsError


def _shape(shape: Sequence[Any]) -> str:
    return " x ".join("?" if d is None else str(d) for d in shape)


def check_eval_data(
    model: nn.Module,
    data: Any,
    where: str,
    *,
    image_shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
) -> int:
    """The model's number of classes, after checking ``data`` (named ``where`` in messages) against
    it: ``image_shape`` (C, H, W; None entries are free) is what the model was trained on, and one
    forward of two examples shows what it returns. The model is left in the mode it came in."""
    if len(data) == 0:
        raise AdvewsError(f"{where} holds no examples (N = 0)")
    got = tuple(data.image_shape)
    if image_shape is not None and any(e is not None and e != g for e, g in zip(image_shape, got)):
        raise AdvewsError(f"{where}: images are {_shape(got)} (C x H x W), the model takes {_shape(image_shape)}")
    x, _ = next(iter(data.subset(range(min(2, len(data)))).batches(2, device=device)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        reason = " ".join(str(error).split())
        raise AdvewsError(f"{where}: the model cannot take images of {_shape(got)} (C x H x W): {reason}") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AdvewsError(f"the model must return (N, classes) logits with at least 2 classes, got {found}")
    classes = int(logits.shape[1])
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= classes:
        raise AdvewsError(f"{where}: labels span [{low}, {high}], the model has {classes} classes "
                          f"(labels must lie in [0, {classes}))")
    return classes
