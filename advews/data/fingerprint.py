"""Fingerprints of data by content, not by path: what a training checkpoint and an evaluation's
identity record, so a resume or a merge on other data is refused instead of silently mixing sets."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over each tensor's dtype, shape and bytes (so a reshaped or retyped copy differs)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
