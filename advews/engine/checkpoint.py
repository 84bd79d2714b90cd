"""Checkpoints hold everything a resume needs, load with ``weights_only=True``, survive a crash
mid-write (fsynced temporary file under a per-process name, atomic rename; a full disk is one
line, ``DiskFullError``, with the partial file removed) and carry a content hash that a load verifies,
so bytes changed on disk are an error instead of a silently wrong model."""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
import warnings
from typing import Any, BinaryIO, Callable, Dict, Optional

import numpy as np
import torch

from advews.errors import AdvewsError, disk_full, is_disk_full, remove_quietly
from advews.locks import tmp_name

HASH_KEY = "content_hash"


def rng_state() -> Dict[str, Any]:
    """Every RNG the loop touches, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].cpu().numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Hash a checkpoint value: tensors by dtype, shape and bytes, containers in order, the rest by repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k, v in value.items():
            h.update(repr(k).encode())
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"V{type(value).__name__}:{value!r}".encode())


def content_hash(state: Dict[str, Any]) -> str:
    """BLAKE2b of the state without its own hash; equal after a save/load round trip."""
    h = hashlib.blake2b(digest_size=32)
    _feed(h, {k: v for k, v in state.items() if k != HASH_KEY})
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: str, path: str) -> None:
    _crash_hook("before-rename", path)
    os.replace(tmp, path)
    _fsync_dir(path)


_crash_counts: Dict[str, int] = {}


def _crash_hook(point: str, path: str) -> None:
    """Test-only: ``ADVEWS_TEST_KILL_AT=point:basename[:n]`` SIGKILLs this process at the n-th (default
    first) ``point`` of writing ``basename``, so the reliability tests can crash exactly mid-save."""
    target = os.environ.get("ADVEWS_TEST_KILL_AT")
    if not target:
        return
    at, name, *nth = target.split(":")
    if at != point or name != os.path.basename(path):
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth[0] if nth else 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class _RecordingFile:
    """The file ``torch.save`` writes through: it keeps the OSError a write raised, because torch's
    zip writer replaces it with "[enforce fail at inline_container.cc] unexpected pos", which never
    says that the disk is full."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        self.file, self.path, self.error = file, path, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


def _kept_by_default(path: str) -> str:
    name = os.path.basename(path)
    return f"the previous {name} is kept" if os.path.exists(path) else f"no {name} was written"


def _write_durably(path: str, write: Callable[[_RecordingFile], None], kept: Optional[str]) -> None:
    """Write to this process's temporary name, fsync, rename, fsync the directory. Any failure removes
    the partial file; a full disk (or quota) is the one-line ``DiskFullError`` naming ``path`` and
    ``kept``, what survives (default: the previous file, if any)."""
    tmp, recorder = tmp_name(path), None
    try:
        with open(tmp, "wb") as f:
            recorder = _RecordingFile(f, tmp)
            write(recorder)
            recorder.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        remove_quietly(tmp)
        if is_disk_full(e) or (recorder is not None and recorder.error is not None and is_disk_full(recorder.error)):
            raise disk_full(path, kept or _kept_by_default(path)) from None
        raise
    _replace_durably(tmp, path)


def save_checkpoint(state: Dict[str, Any], path: str, kept: Optional[str] = None) -> None:
    """Write atomically and durably (temporary file, fsync, rename, fsync of the directory), with
    the state's content hash inside, so a crash or power loss never leaves a truncated checkpoint."""
    state = {**state, HASH_KEY: content_hash(state)}
    _write_durably(path, lambda f: torch.save(state, f), kept)


def write_text_atomic(path: str, text: str, kept: Optional[str] = None) -> None:
    """Replace a small text file (config.gin, metrics.jsonl) so readers see the old or the new, never half."""
    data = text.encode("utf-8")
    _write_durably(path, lambda f: f.write(data), kept)


def _load_error(path: str, err: Exception) -> str:
    text = str(err)
    blocked = re.search(r"unsupported GLOBAL (\S+)", text)
    if blocked:
        return (f"cannot load checkpoint {path}: it asks to run {blocked.group(1)}, which a checkpoint never "
                "needs (weights_only loading refused it; the file may be malicious)")
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand or "Weights only load failed" in text:
        return f"cannot load checkpoint {path}: it is a pickle that is not a PyTorch checkpoint"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"cannot load checkpoint {path}: the file is damaged or not a PyTorch checkpoint ({first})"


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load with ``weights_only=True``; every way a file can be unusable is one clear AdvewsError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = [f for f in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, f))]
        hint = f"; give a file in it, e.g. {os.path.join(path, inside[0])}" if inside else ""
        raise AdvewsError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise AdvewsError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise AdvewsError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not magic:
        raise AdvewsError(f"cannot load checkpoint {path}: the file is empty (0 bytes)")
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):
        raise AdvewsError(f"cannot load checkpoint {path}: not a PyTorch checkpoint (neither a zip archive "
                          "nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise AdvewsError(_load_error(path, e)) from None
    if not isinstance(state, dict):
        raise AdvewsError(f"cannot load checkpoint {path}: it holds a {type(state).__name__}, not an advews "
                          "checkpoint (a dict with model_spec and model)")
    if HASH_KEY not in state:
        if "model_spec" in state:  # an advews checkpoint; a bare state_dict is refused by the caller
            _warn_unverified(path, state)
    elif content_hash(state) != state[HASH_KEY]:
        raise AdvewsError(f"checkpoint {path} is corrupt: its contents do not match the hash stored when it "
                          "was written (bytes changed on disk)")
    return state


_unverified: set = set()


def _warn_unverified(path: str, state: Dict[str, Any]) -> None:
    """Say once per file that a checkpoint without a content hash is loaded unchecked. Checkpoints of
    advews before format 2 predate the hash and must still load; damage on disk cannot remove the
    key, so a format-2 file without it was edited on purpose, which the hash never guarded against."""
    key = os.path.abspath(path)
    if key in _unverified:
        return
    _unverified.add(key)
    why = ("it was written before checkpoints carried one" if not isinstance(state.get("format"), int)
           or state["format"] < 2 else "its content_hash entry was removed")
    print(f"warning: checkpoint {path} has no content hash ({why}): it is loaded unverified, so bytes "
          "changed on disk would go unnoticed", file=sys.stderr, flush=True)
