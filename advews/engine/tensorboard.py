"""TensorBoard event files beside metrics.jsonl (``train.tensorboard``), written by rank 0 only.

metrics.jsonl stays the source of truth (``advews-plot`` and ``advews-report`` read it); the event
files in ``RUN_DIR/tensorboard`` mirror every value of its rows (tag ``epoch/<key>``, step = epoch)
and, every ``log_every`` optimizer steps, the step's training loss, accuracy and EWS statistics
(tag ``step/<key>``, step = global step). A resumed run appends; replayed steps may repeat.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch

from advews.errors import AdvewsError


class TensorBoardLog:
    def __init__(self, run_dir: str, log_every: int, enabled: bool):
        if log_every < 1:
            raise AdvewsError(f"train.log_every must be >= 1, got {log_every}")
        self.log_every, self.enabled, self.path = log_every, enabled, os.path.join(run_dir, "tensorboard")
        self.writer = None
        if enabled:  # refuse a missing package before any work; the files come with the first value
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise AdvewsError("train.tensorboard = True needs the tensorboard package: "
                                  "pip install 'advews[tensorboard]'") from None

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.path)
        return self.writer

    def step(self, global_step: int, metrics: Optional[Mapping[str, torch.Tensor]]) -> None:
        """The step's metrics, every ``log_every`` steps (one host sync then, none otherwise)."""
        if not self.enabled or metrics is None or global_step % self.log_every:
            return
        for key, value in metrics.items():
            self._writer().add_scalar(f"step/{key}", float(value), global_step)

    def epoch(self, row: Dict[str, float]) -> None:
        """Every numeric value of a metrics.jsonl row."""
        if not self.enabled:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer().add_scalar(f"epoch/{key}", value, row["epoch"])
        self._writer().flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
