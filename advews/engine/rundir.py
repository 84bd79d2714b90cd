"""The run directory: what counts as a run, and the text files beside the checkpoints.

A directory is a run once it holds a checkpoint or a metrics log; ``config.gin`` alone (a run killed
before its first checkpoint) is not, so a fresh start or ``--resume`` may take it over.
``metrics.jsonl`` is rewritten (atomically) from the history kept in the checkpoint, so after any
crash and resume it equals an uninterrupted run's log, times aside.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from advews.engine.checkpoint import write_text_atomic
from advews.errors import AdvewsError

LAST, BEST, METRICS, CONFIG = "last.pt", "best.pt", "metrics.jsonl", "config.gin"
RUN_FILES = (LAST, BEST, METRICS)


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` has a last.pt to resume (anything by that name: a damaged one is an error, not a fresh start)."""
    return os.path.lexists(os.path.join(path, LAST))


def prepare_output_dir(path: str, resume: bool) -> None:
    """Refuse to start over an existing run unless resuming; make sure the directory is writable."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if existing and not resume:
        raise AdvewsError(
            f"output directory {path} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or choose another --output"
        )
    try:
        os.makedirs(path, exist_ok=True)
        for name in RUN_FILES + (CONFIG,):  # half-written files of a process killed mid-save
            if os.path.exists(os.path.join(path, name + ".tmp")):
                os.remove(os.path.join(path, name + ".tmp"))
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise AdvewsError(f"output directory {path} is not writable: {e.strerror or e}") from None


def write_metrics(path: str, history: List[Dict[str, float]]) -> None:
    write_text_atomic(os.path.join(path, METRICS), "".join(json.dumps(row) + "\n" for row in history))


def read_metrics(path: str, epochs_done: int) -> List[Dict[str, float]]:
    """Rows of completed epochs from an existing log: the history of a checkpoint written before
    checkpoints kept it (rows a crash wrote after the checkpoint are dropped)."""
    file = os.path.join(path, METRICS)
    if not os.path.exists(file):
        return []
    rows = []
    with open(file) as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # a torn last line
                if row.get("epoch", 0) <= epochs_done:
                    rows.append(row)
    return rows


def write_config(path: str, text: str) -> None:
    write_text_atomic(os.path.join(path, CONFIG), text)
