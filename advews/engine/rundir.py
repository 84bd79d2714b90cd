"""The run directory: what counts as a run, who may write it, and the text files beside the checkpoints.

A directory is a run once it holds a checkpoint or a metrics log; ``config.gin`` alone (a run killed
before its first checkpoint) is not, so a fresh start or ``--resume`` may take it over. Neither is
``.lock``: the training process holds an exclusive lock on it (``RunLock``, an ``advews.locks.Lock``)
for the whole run, taken before anything in the directory is touched, so a second process on the
same directory (a fresh start or a requeued ``--resume``) is refused in one line naming the
holder's pid instead of mixing two runs. The kernel releases the lock when the process ends, however
it ends; the file stays (removing it would race a new holder), and readers ignore it.
``metrics.jsonl`` is rewritten (atomically) from the history kept in the checkpoint, so after any
crash and resume it equals an uninterrupted run's log, times aside.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from advews.engine.checkpoint import write_text_atomic
from advews.errors import AdvewsError, disk_full, is_disk_full, remove_quietly
from advews.locks import Lock, is_tmp_of

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: advews.locks does not lock either
    fcntl = None

LAST, BEST, METRICS, CONFIG, LOCK = "last.pt", "best.pt", "metrics.jsonl", "config.gin", ".lock"
RUN_FILES = (LAST, BEST, METRICS)
IN_USE_ADVICE = "wait for it to end (or stop it), or choose another --output"


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` has a last.pt to resume (anything by that name: a damaged one is an error, not a fresh start)."""
    return os.path.lexists(os.path.join(path, LAST))


class RunLock:
    """The run directory's lock; ``release(failed=True)`` after a start that failed also removes a
    lock file this process created, so a refused start leaves the directory as it found it."""

    def __init__(self, path: str) -> None:
        self.file = os.path.join(path, LOCK)
        self.created = not os.path.lexists(self.file)
        self.lock = Lock(self.file, f"run directory {path}", IN_USE_ADVICE)
        self.held = False

    def acquire(self) -> "RunLock":
        self.lock.acquire()
        self.held = True
        return self

    def release(self, failed: bool = False) -> None:
        if failed and self.created and self.held:
            remove_quietly(self.file)  # while still held: no other advews process is inside
        self.lock.release()
        self.held = False


def _holder(path: str) -> Optional[str]:
    """Who holds ``path``'s lock (a pid, or '' when unknown), None when nobody does; looks without
    taking it, so a refusal that follows changes nothing."""
    lockfile = os.path.join(path, LOCK)
    if fcntl is None or not os.path.isfile(lockfile):
        return None
    try:
        fd = os.open(lockfile, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return os.pread(fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            return ""
    finally:
        os.close(fd)
    return None


def check_output_dir(path: str, resume: bool, continuing: bool) -> None:
    """Refuse (one line, nothing touched) a directory in use by another process, a fresh start over a
    run, and a ``--resume`` of a run whose last.pt is gone (``continuing``: there is a last.pt)."""
    holder = _holder(path)
    if holder is not None:
        who = f"pid {holder}" if holder else "another process"
        raise AdvewsError(f"run directory {path} is in use by another advews process ({who}); {IN_USE_ADVICE}")
    _check_run_files(path, resume, continuing)


def _check_run_files(path: str, resume: bool, continuing: bool) -> None:
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if existing and not resume:
        raise AdvewsError(f"output directory {path} already holds a run ({', '.join(existing)}); "
                          "pass --resume to continue it or choose another --output")
    if existing and not continuing:
        raise AdvewsError(f"{path} has {', '.join(existing)} but no last.pt to resume; put its last.pt back, "
                          "or start a new run in another --output")


def take_output_dir(path: str, resume: bool, continuing: bool) -> RunLock:
    """Check, create and lock the run directory, check again under the lock (another process may
    have started meanwhile), then remove the temporary files of writers that died mid-save. The
    caller releases the lock when the run ends (``release(failed=True)`` if it cannot start)."""
    check_output_dir(path, resume, continuing)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _unwritable(path, e) from None
    lock = RunLock(path).acquire()
    try:
        _check_run_files(path, resume, continuing)
        for name in os.listdir(path):  # only tmp files: nobody else writes here while we hold the lock
            if any(is_tmp_of(name, base) for base in RUN_FILES + (CONFIG,)):
                os.remove(os.path.join(path, name))
        probe = os.path.join(path, f".write-test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        lock.release(failed=True)
        raise _unwritable(path, e) from None
    except BaseException:
        lock.release(failed=True)
        raise
    return lock


def _unwritable(path: str, e: OSError) -> AdvewsError:
    if is_disk_full(e):
        return disk_full(path, "no checkpoint was written yet")
    return AdvewsError(f"output directory {path} is not writable: {e.strerror or e}")


def write_metrics(path: str, history: List[Dict[str, float]], kept: Optional[str] = None) -> None:
    write_text_atomic(os.path.join(path, METRICS), "".join(json.dumps(row) + "\n" for row in history), kept)


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


def write_config(path: str, text: str, kept: Optional[str] = None) -> None:
    write_text_atomic(os.path.join(path, CONFIG), text, kept)
