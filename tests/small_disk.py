"""A real full disk for the disk-full tests: a size-limited tmpfs in a private mount namespace.

``run_on_small_disk`` runs a command in a fresh mount namespace (``unshare -m`` as root, ``unshare -rm``
otherwise) where a tmpfs of ``size`` is mounted over a directory, seeded with the files of ``seed``
and filled until only ``free`` bytes remain; after the command the tmpfs's contents are copied out so
the test can look at what was left. The mount vanishes with the namespace, so a failing test leaves
no mount behind. ``available()`` says whether this machine can do it (tests without it fall back to a
fault-injected write, which every disk-full test also has).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from typing import Optional, Sequence

SCRIPT = r'''
set -e
mount -t tmpfs -o size="$SIZE" tmpfs "$DISK"
if [ -n "$SEED" ]; then cp -a "$SEED"/. "$DISK"/; fi
avail=$(df -B1 --output=avail "$DISK" | tail -1)
if [ "$avail" -gt "$FREE" ]; then head -c $((avail - FREE)) /dev/zero > "$DISK/.filler" || true; fi
cd "$DISK"
set +e
"$@"
rc=$?
rm -f "$DISK/.filler"
cp -a "$DISK"/. "$AFTER"/
exit $rc
'''


def _unshare() -> Optional[list]:
    if shutil.which("unshare") is None:
        return None
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


@functools.lru_cache(maxsize=1)
def available() -> bool:
    cmd = _unshare()
    if cmd is None:
        return False
    probe = subprocess.run(cmd + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                                  "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def run_on_small_disk(workdir: str, argv: Sequence[str], size: str = "8M", free: int = 0,
                      seed: Optional[str] = None, env: Optional[dict] = None,
                      timeout: float = 300) -> "tuple[subprocess.CompletedProcess, str]":
    """Run ``argv`` (cwd = the small disk) and return (the finished process, a directory holding what
    the disk held afterwards). ``free`` bytes are left available when the command starts."""
    disk, after = os.path.join(workdir, "disk"), os.path.join(workdir, "after")
    os.makedirs(disk, exist_ok=True)
    os.makedirs(after, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), "SIZE": size, "DISK": disk,
                   "AFTER": after, "FREE": str(free), "SEED": seed or ""}
    proc = subprocess.run(_unshare() + ["sh", "-c", SCRIPT, "sh", *argv], env=environment,
                          capture_output=True, text=True, timeout=timeout)
    return proc, after


PY = sys.executable


def failing_open(real_open, error: Optional[BaseException] = None):
    """``open`` whose files opened for writing raise ``error`` (default ENOSPC, as a full disk) on the
    first write: the fault-injected twin of ``run_on_small_disk``."""
    import errno

    error = error or OSError(errno.ENOSPC, "No space left on device")

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise error

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Failing(f) if "w" in mode else f

    return opener
