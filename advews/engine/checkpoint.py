"""Checkpoints hold everything a resume needs, load with ``weights_only=True``, survive a crash
mid-write (fsynced temporary file, atomic rename) and carry a content hash that a load verifies,
so bytes changed on disk are an error instead of a silently wrong model."""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from typing import Any, Dict

import numpy as np
import torch

from advews.errors import AdvewsError

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


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write atomically and durably (temporary file, fsync, rename, fsync of the directory), with
    the state's content hash inside, so a crash or power loss never leaves a truncated checkpoint."""
    state = {**state, HASH_KEY: content_hash(state)}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _replace_durably(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    """Replace a small text file (config.gin, metrics.jsonl) so readers see the old or the new, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace_durably(tmp, path)


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
    if isinstance(state, dict) and HASH_KEY in state and content_hash(state) != state[HASH_KEY]:
        raise AdvewsError(f"checkpoint {path} is corrupt: its contents do not match the hash stored when it "
                          "was written (bytes changed on disk)")
    return state
