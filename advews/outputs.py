"""Output directories a tool creates: checked before any work, created so a failure can remove them.

A tool that fails must leave no empty directory behind, and one given an unusable path (a regular
file, a path under one, a read-only or virtual file system) must say so in one line before it reads
its input, creating nothing.
"""

from __future__ import annotations

import os
import tempfile
from typing import List

from advews.errors import AdvewsError


def check_output_dir(directory: str, advice: str = "") -> None:
    """Refuse, creating nothing, a directory that is a file, lies under one, or cannot be written
    (the nearest existing folder is probed with a temporary file, removed at once)."""
    folder = os.path.normpath(directory)
    while folder not in ("", os.sep) and not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    folder = folder or "."
    if not os.path.isdir(folder):
        what = "it is not a directory" if folder == os.path.normpath(directory) else f"{folder} is not a directory"
        raise AdvewsError(f"cannot write to {directory}: {what}{advice}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise AdvewsError(f"cannot write to {directory}: {e.strerror or e}{advice}") from None


def make_dirs(path: str) -> List[str]:
    """``os.makedirs``, returning the directories it created (outermost first); see ``remove_dirs``."""
    created = []
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    done: List[str] = []
    try:
        for folder in reversed(created):
            os.mkdir(folder)
            done.append(folder)
    except OSError:
        remove_dirs(done)
        raise
    return done


def remove_dirs(created: List[str]) -> None:
    """Remove the directories ``make_dirs`` created, innermost first, if they are empty again."""
    for folder in reversed(created):
        try:
            os.rmdir(folder)
        except OSError:
            pass
