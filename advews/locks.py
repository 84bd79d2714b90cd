"""Exclusive locks on a run directory or an evaluation state: one writer at a time.

An ``fcntl.flock`` on a small lock file, taken without waiting and held for the life of the process;
the kernel releases it when the process ends in any way (kill -9 included), so a stale lock never
blocks a rerun. The lock file holds the holder's pid, which the refusal names. Temporary files are
named per process (``tmp_name``) so two writers never delete or rename each other's halves.
"""

from __future__ import annotations

import os
from typing import Optional

from advews.errors import AdvewsError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one process per directory is on the user
    fcntl = None


class Lock:
    """Hold ``path`` (a lock file) exclusively; ``what`` names the protected thing in the refusal."""

    def __init__(self, path: str, what: str, advice: str) -> None:
        self.path, self.what, self.advice = path, what, advice
        self._fd: Optional[int] = None

    def acquire(self) -> "Lock":
        if fcntl is None or self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AdvewsError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise AdvewsError(f"{self.what} is in use by another advews process ({who}); {self.advice}") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the lock holds all the same, a refusal just names no pid
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self._fd = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def tmp_name(path: str) -> str:
    """A temporary name beside ``path`` that no other process uses."""
    return f"{path}.{os.getpid()}.tmp"


def is_tmp_of(name: str, base: str) -> bool:
    """Whether directory entry ``name`` is a temporary file of ``base`` (any process's, old style included)."""
    if name == base + ".tmp":
        return True
    if not (name.startswith(base + ".") and name.endswith(".tmp")):
        return False
    return name[len(base) + 1:-4].isdigit()
