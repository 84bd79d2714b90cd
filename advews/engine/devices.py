"""Where a model runs: a device name (auto, cpu, cuda, cuda:N) checked in one line. Its own module so
that loading a model for evaluation (``advews.load_model``) does not import the trainer."""

from __future__ import annotations

import torch

from advews.engine.params import require_str
from advews.errors import AdvewsError


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch.device: auto is cuda when available, else cpu; one line for a bad name."""
    require_str("train.device", device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AdvewsError(f"bad device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdvewsError(f"device {device!r} requested but CUDA is not available; use auto or cpu")
    return dev
