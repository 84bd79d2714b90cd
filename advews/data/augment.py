"""Batch augmentation as one gather, so it costs nothing next to the training step."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from advews.errors import AdvewsError


class RandomCropFlip:
    """The standard CIFAR augmentation: zero-pad, random crop back to size, random horizontal flip.

    Every example gets its own offsets and flip, drawn from ``generator`` (on its device, so
    CPU and GPU runs draw the same numbers) in a fixed order: row offsets, column offsets, flips.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise AdvewsError(f"padding must be non-negative, got {padding}")
        self.padding = padding
        self.flip = flip

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.padding == 0 and not self.flip:
            return x
        n, c, h, w = x.shape
        p = self.padding
        draw_on = generator.device if generator is not None else torch.device("cpu")
        rows = torch.arange(h, device=draw_on).expand(n, h)
        cols = torch.arange(w, device=draw_on).expand(n, w)
        if p:
            rows = rows + torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=draw_on)
            cols = cols + torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=draw_on)
        if self.flip:
            flipped = torch.rand(n, 1, generator=generator, device=draw_on) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        padded = F.pad(x, (p, p, p, p)) if p else x
        source = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).to(x.device)  # flat pixel index
        source = source.view(n, 1, h * w).expand(n, c, h * w)
        return padded.reshape(n, c, -1).gather(2, source).view(n, c, h, w)
