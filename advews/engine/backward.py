"""The loop's ``Backward`` (``defenses.base``): how a defense backpropagates its loss in parts.

Each call backpropagates one part (AMP-scaled, outside autocast, as PyTorch recommends for backward
passes); gradients add up. ``local()`` is DDP's ``no_sync``: the forwards and backwards inside it
only accumulate, and the step's last backward, outside it, all-reduces the sum once, as a
single backward of the whole loss would.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from advews.engine.precision import Precision


class StepBackward:
    """``backward(loss)`` and ``local()`` for ``Defense.training_loss``; ``ddp``: the DDP wrapper, if any."""

    def __init__(self, precision: Precision, ddp: Optional[DistributedDataParallel] = None):
        self.precision, self.ddp = precision, ddp

    def __call__(self, loss: torch.Tensor) -> None:
        with torch.autocast(self.precision.device.type, enabled=False):
            self.precision.backward(loss)

    def local(self) -> ContextManager[None]:
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()
