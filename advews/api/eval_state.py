"""advews-eval's --state: one JSON file per shard holding everything that shard has finished, so a
killed run resumes where it stopped and ``advews-eval --merge`` builds the report from the files alone.

Format ``advews-eval-state/2`` (flags are strings of '0'/'1', one per example of the shard, in order):

- ``identity``: what must match to resume or merge: the attacks and their parameters, seed, batch
  size, --amp, the total number of examples, the shard layout, the model weights' SHA-256 and
  ``data``, the SHA-256 of the content of the whole evaluation set (all n examples and labels as
  selected, whatever path or spec named them), so shards of other data never merge;
- ``shard``, ``shards``, ``start``, ``stop``: this shard holds global examples [start, stop);
- ``data``: SHA-256 of the shard's inputs and labels; ``labels``: its labels; ``info``: how the
  report names the model (not part of the identity: ``./G.pt`` and ``G.pt`` are one model when
  their weights hash the same); ``threat``: [eps, norm];
- ``clean``: clean flags, once computed;
- ``attacks``: {attack: {robust, low_robust (with --amp), stages {stage: flags}, entry}} for each
  attack finished on the whole shard (``entry``: its JSON entry without the accuracies);
- ``progress``: {attack: ...} for the attack under way: AutoAttack's per-stage state
  (``advews-autoattack-state/1``), or for the other attacks the batches done, their flags so far,
  the seconds spent and the RNG state after the last batch done (so the rest draws the same noise);
- ``hash``: SHA-256 of everything else (canonical JSON), so an edited or damaged file (flags flipped
  to robust, a field retyped) is refused on resume and on merge. It detects edits and damage, not a
  forger who recomputes it.

The file is rewritten atomically after every batch (AutoAttack: every stage), through a temporary
name of this process's own, while the process holds ``FILE.lock`` (one evaluation per state file).
Files of format ``advews-eval-state/1`` (before the data fingerprint and the hash) are refused with
a line saying so: they cannot prove which data they hold, so the shard is rerun with a new file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from advews.errors import AdvewsError, disk_full, is_disk_full, remove_quietly
from advews.locks import Lock, is_tmp_of, tmp_name

STATE_FORMAT = "advews-eval-state/2"
OLD_FORMATS = ("advews-eval-state/1",)
LOCK_ADVICE = "wait for it to finish, or give this evaluation another --state file"


def shard_path(base: str, shard: int, shards: int) -> str:
    """The state file of shard ``shard`` of ``shards``: ``base`` itself for one shard, else
    ``run.json`` -> ``run.shard0of4.json`` (what ``advews-eval --merge`` is given)."""
    if shards == 1:
        return base
    root, ext = os.path.splitext(base)
    return f"{root}.shard{shard}of{shards}{ext}"


def content_hash(state: Dict[str, Any]) -> str:
    """SHA-256 of the state's canonical JSON, its ``hash`` field left out."""
    body = {k: v for k, v in state.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_state(path: str) -> Dict[str, Any]:
    """An existing state file of this format, whole and unedited, or a one-line error saying why not."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise AdvewsError(f"cannot read --state {path}: {' '.join(str(error).split())}") from None
    form = state.get("format") if isinstance(state, dict) else None
    if form in OLD_FORMATS:
        raise AdvewsError(f"--state {path} was written by an older advews ({form}), whose state files do not "
                          "record the evaluated data; rerun this evaluation with a new --state file (or delete it)")
    if form != STATE_FORMAT:
        raise AdvewsError(f"{path} is not an advews-eval state file ({STATE_FORMAT}); give another --state "
                          "or delete it")
    check_schema(state, path)
    if state["hash"] != content_hash(state):
        raise AdvewsError(f"--state {path} was edited or damaged (its content hash does not match); rerun this "
                          "shard with a new --state file")
    return state


def _fail(path: str, field: str, want: str, value: Any) -> AdvewsError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    got = "it is missing" if value is _MISSING else f"got {shown}"
    return AdvewsError(f"--state {path}: {field} must be {want}, {got}; the file was edited or damaged, rerun "
                       "this shard with a new --state file")


_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_schema(state: Dict[str, Any], path: str) -> None:
    """Every field the resume and the merge read has the type and range they rely on (one line each)."""

    def need(where: Dict[str, Any], key: str, ok: Callable[[Any], bool], want: str, name: str = "") -> Any:
        value = where.get(key, _MISSING)
        if value is _MISSING or not ok(value):
            raise _fail(path, name or repr(key), want, value)
        return value

    is_dict = lambda v: isinstance(v, dict)  # noqa: E731
    identity = need(state, "identity", is_dict, "an object")
    for key, ok, want in (("attack", lambda v: isinstance(v, str), "a string"),
                          ("params", lambda v: is_dict(v) and all(map(is_dict, v.values())), "an object of objects"),
                          ("seed", _is_int, "an integer"), ("batch_size", lambda v: _is_int(v) and v >= 1,
                                                                 "an integer >= 1"),
                          ("amp", lambda v: v is None or isinstance(v, str), "null or a string"),
                          ("n_examples", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
                          ("layout", lambda v: isinstance(v, str), "a string"),
                          ("model", lambda v: isinstance(v, str), "a hash string"),
                          ("data", lambda v: isinstance(v, str), "a hash string")):
        need(identity, key, ok, want, f"identity.{key}")
    shards = need(state, "shards", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    need(state, "shard", lambda v: _is_int(v) and 0 <= v < shards, f"an integer from 0 to {shards - 1}")
    start = need(state, "start", lambda v: _is_int(v) and 0 <= v < identity["n_examples"],
                 f"an integer from 0 to {identity['n_examples'] - 1}")
    stop = need(state, "stop", lambda v: _is_int(v) and start < v <= identity["n_examples"],
                f"an integer from {start + 1} to {identity['n_examples']}")
    n = stop - start
    flags = lambda v: isinstance(v, str) and len(v) == n and not set(v) - {"0", "1"}  # noqa: E731
    want_flags = f"a string of {n} '0'/'1' flags"
    need(state, "data", lambda v: isinstance(v, str), "a hash string")
    need(state, "info", is_dict, "an object")
    need(state, "threat", lambda v: isinstance(v, list) and len(v) == 2, "a list [eps, norm]")
    need(state, "labels", lambda v: isinstance(v, list) and len(v) == n and all(map(_is_int, v)),
         f"a list of {n} integer labels")
    if "clean" in state:
        need(state, "clean", flags, want_flags)
    attacks = need(state, "attacks", is_dict, "an object")
    for name, done in attacks.items():
        where = f"attacks.{name}"
        need(attacks, name, is_dict, "an object", where)
        need(done, "robust", flags, want_flags, f"{where}.robust")
        need(done, "entry", lambda v: is_dict(v) and _is_number(v.get("seconds", 0)), "an object", f"{where}.entry")
        if "low_robust" in done:
            need(done, "low_robust", flags, want_flags, f"{where}.low_robust")
        if "stages" in done:
            stages = need(done, "stages", is_dict, "an object", f"{where}.stages")
            for stage in stages:
                need(stages, stage, flags, want_flags, f"{where}.stages.{stage}")
    need(state, "progress", is_dict, "an object")
    if "seconds" in state:
        need(state, "seconds", _is_number, "a number")
    need(state, "hash", lambda v: isinstance(v, str), "a hash string")


def write_state(path: str, state: Dict[str, Any]) -> None:
    """Atomic rewrite with the content hash, through this process's own temporary name: a run killed
    mid-write keeps the previous file; a full disk is one line saying the previous file is kept."""
    text = json.dumps({**state, "hash": content_hash(state)})
    try:
        atomic_write(path, lambda target: _write_text(target, text))
    except OSError as error:
        kept = (f"the previous {path} is kept with the work finished before (the same command resumes from it "
                "once there is space)" if os.path.exists(path) else "nothing of this evaluation was saved yet")
        if is_disk_full(error):
            raise disk_full(path, kept) from None
        raise AdvewsError(f"cannot write --state {path}: {error.strerror or error}; {kept}") from None


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename onto ``path``; on any failure the temporary file is removed (with
    the ``.tmp`` of writers that make their own, like save_per_example) and ``path`` is untouched."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        remove_quietly(tmp + ".tmp")
        raise


class DiskFullLine(str):
    """A failure line of an output that could not be written because the disk is full (exit 4)."""


def write_result(path: str, flag: str, write: Callable[[str], None]) -> Tuple[str, Optional[str]]:
    """Write --output or --hdf5 atomically (never a partial or 0-byte file at ``path``). If that fails,
    the result goes to a new file in the current folder, else the temporary one; returns where it went
    and, after a failure, the line that says so (a ``DiskFullLine`` when the disk was full)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, write)
        return path, None
    except OSError as error:
        reason, full = error.strerror or str(error), is_disk_full(error)
    suffix = os.path.splitext(path)[1]
    for folder in dict.fromkeys((os.getcwd(), tempfile.gettempdir())):
        fallback = os.path.join(folder, f"advews-eval-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{suffix}")
        try:
            if os.path.exists(fallback):
                continue
            atomic_write(fallback, write)
        except OSError:
            continue
        if full:
            return fallback, DiskFullLine(disk_full(path, f"the result was saved to {fallback} instead"))
        return fallback, f"could not write {flag} {path} ({reason}); the result was saved to {fallback} instead"
    if full:
        return path, DiskFullLine(disk_full(path, "nothing was written; the result is only in the report above"))
    raise AdvewsError(f"could not write {flag} {path} ({reason}), nor a fallback in {os.getcwd()} or "
                      f"{tempfile.gettempdir()}; the result is only in the report above")


def resume_or_new(path: Optional[str], fresh: Dict[str, Any]) -> Dict[str, Any]:
    """The saved state at ``path`` when it belongs to this run (same identity, shard and data), else
    ``fresh``; a state of another run is refused, naming the first thing that differs."""
    if not path or not os.path.exists(path):
        return fresh
    state = read_state(path)
    for key in ("identity", "shard", "shards", "start", "stop", "data"):
        if state.get(key) != fresh[key]:
            differs = first_difference(state.get(key), fresh[key]) if key == "identity" else key
            raise AdvewsError(f"--state {path} was written by another evaluation ({differs} differs); "
                              "use another state file or delete it")
    return state


class StateLock(Lock):
    """``Lock`` whose file is removed when released, so no ``.lock`` file is left beside the state
    (nor by a refused run). Safe because a holder checks, after its flock, that the path still names
    the file it locked: one that locked a file just removed tries again on the new one."""

    def acquire(self) -> "StateLock":
        for _ in range(100):
            super().acquire()
            if self._fd is None:  # no advisory locks on this system
                return self
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                return self
            super().release()
        raise AdvewsError(f"{self.what}: cannot hold {self.path} (it keeps being replaced); {self.advice}")

    def release(self) -> None:
        if self._fd is not None:
            remove_quietly(self.path)  # while still held: a waiting process's check sees it gone
        super().release()


def claim(path: Optional[str], fresh: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[Lock]]:
    """The record to continue (``resume_or_new``) and the lock on ``path.lock`` held for the whole
    evaluation, so a second evaluation of the same state file is refused (one line naming the holder's
    pid). The state is checked before the lock file is made, so a refused state leaves nothing behind;
    it is read again under the lock, and other processes' temporary files are removed."""
    if not path:
        return fresh, None
    resume_or_new(path, fresh)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = StateLock(f"{path}.lock", f"--state {path}", LOCK_ADVICE).acquire()
    try:
        folder, base = os.path.split(os.path.abspath(path))
        for name in os.listdir(folder):
            if is_tmp_of(name, base):
                remove_quietly(os.path.join(folder, name))
        return resume_or_new(path, fresh), lock
    except BaseException:
        lock.release()
        raise


def first_difference(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if old.get(key) != new.get(key):
                return {"model": "the model weights", "data": "the evaluated data"}.get(key, key)
    return "identity"


def pack(flags: torch.Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def unpack(text: str, n: int, where: str) -> torch.Tensor:
    if not isinstance(text, str) or len(text) != n or set(text) - {"0", "1"}:
        raise AdvewsError(f"corrupt state {where}: expected {n} flags")
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def save_rng(device: torch.device) -> Dict[str, str]:
    """The RNG states an attack draws from (CPU, and the device's on CUDA), as text."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def restore_rng(saved: Dict[str, str], device: torch.device) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(saved["cpu"]))
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(tensor(saved["cuda"]), device)
