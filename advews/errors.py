"""The exception types the CLIs turn into a one-line message and a documented exit code."""

from __future__ import annotations

import errno
import os

DISK_FULL_EXIT = 4  # the disk (or quota) filled up while writing; what was kept is named in the message


class AdvewsError(Exception):
    """A user-facing error: bad input, missing data, unusable output directory."""


class DiskFullError(AdvewsError):
    """A write failed for lack of space; the partial file is removed and the message names what is kept."""

    exit_code = DISK_FULL_EXIT


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception chain (torch wraps the OSError of its zip writer)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(path: str, kept: str) -> DiskFullError:
    """The one line for a failed write: the path, that the disk is full, and what survives."""
    return DiskFullError(f"cannot write {path}: the disk is full (no space left on {os.path.dirname(os.path.abspath(path))}); "
                         f"{kept}")


def remove_quietly(path: str) -> None:
    """Delete a partial file; a failure here must not hide the error that made it partial."""
    try:
        os.remove(path)
    except OSError:
        pass


def require_bool(name: str, value: object) -> None:
    """One line for a gin flag that is not True or False (every layer checks its own flags)."""
    if not isinstance(value, bool):
        raise AdvewsError(f"{name} must be True or False, got {value!r}")
