"""advews-eval's --state: one JSON file per shard holding everything that shard has finished, so a
killed run resumes where it stopped and ``advews-eval --merge`` builds the report from the files alone.

Format ``advews-eval-state/1`` (flags are strings of '0'/'1', one per example of the shard, in order):

- ``identity``: what must match to resume or merge: the attacks and their parameters, seed, batch
  size, --amp, the total number of examples, the shard layout and the model weights' SHA-256;
- ``shard``, ``shards``, ``start``, ``stop``: this shard holds global examples [start, stop);
- ``data``: SHA-256 of the shard's inputs and labels; ``labels``: its labels; ``info``: how the
  report names the model; ``threat``: [eps, norm];
- ``clean``: clean flags, once computed;
- ``attacks``: {attack: {robust, low_robust (with --amp), stages {stage: flags}, entry}} for each
  attack finished on the whole shard (``entry``: its JSON entry without the accuracies);
- ``progress``: {attack: ...} for the attack under way: AutoAttack's per-stage state
  (``advews-autoattack-state/1``), or for the other attacks the batches done, their flags so far,
  the seconds spent and the RNG state after the last batch done (so the rest draws the same noise).

The file is rewritten atomically after every batch (AutoAttack: every stage).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict, Optional

import torch

from advews.errors import AdvewsError

STATE_FORMAT = "advews-eval-state/1"


def shard_path(base: str, shard: int, shards: int) -> str:
    """The state file of shard ``shard`` of ``shards``: ``base`` itself for one shard, else
    ``run.json`` -> ``run.shard0of4.json`` (what ``advews-eval --merge`` is given)."""
    if shards == 1:
        return base
    root, ext = os.path.splitext(base)
    return f"{root}.shard{shard}of{shards}{ext}"


def read_state(path: str) -> Dict[str, Any]:
    """An existing state file, or a one-line error saying why it is not one."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise AdvewsError(f"cannot read --state {path}: {' '.join(str(error).split())}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise AdvewsError(f"{path} is not an advews-eval state file ({STATE_FORMAT}); give another --state "
                          "or delete it")
    return state


def write_state(path: str, state: Dict[str, Any]) -> None:
    """Atomic rewrite: a run killed mid-write keeps the previous file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def resume_or_new(path: Optional[str], fresh: Dict[str, Any]) -> Dict[str, Any]:
    """The saved state at ``path`` when it belongs to this run (same identity, shard and data), else
    ``fresh``; a state of another run is refused, naming the first thing that differs."""
    if not path or not os.path.exists(path):
        return fresh
    state = read_state(path)
    for key in ("identity", "shard", "shards", "start", "stop", "data"):
        if state.get(key) != fresh[key]:
            differs = _first_difference(state.get(key), fresh[key]) if key == "identity" else key
            raise AdvewsError(f"--state {path} was written by another evaluation ({differs} differs); "
                              "use another state file or delete it")
    return state


def _first_difference(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if old.get(key) != new.get(key):
                return {"model": "the model weights"}.get(key, key)
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
