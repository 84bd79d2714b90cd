"""Preemption: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before a kill) asks the loop to
save a resumable checkpoint at the next step boundary and exit with ``PREEMPTED_EXIT``.

The handler only sets a flag, so a signal never interrupts a checkpoint write; a second signal of
the same kind gets the default action (the process ends at once).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

import torch

from advews.engine import distributed

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what schedulers expect from a job that ended on SIGTERM
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is on disk."""

    def __init__(self, message: str):
        super().__init__(message)
        self.main_rank = True  # set by the caller that knows the rank: only rank 0 reports


class PreemptionSignals:
    """Context manager: installs the handlers (main thread only) and restores the old ones on exit."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a signal; under DDP all ranks agree, so they stop at the same step."""
        if not distributed.active():
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        return bool(distributed.all_reduce_sum(flag).item() > 0)
