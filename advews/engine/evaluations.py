"""The evaluations of a checkpoint that lie next to it: the JSONs ``advews-eval --output`` writes
(clean, attacks, AutoAttack, corruptions, flip rates) and audit cards (``advews-eval --audit``).

An export's model card and RobustBench entry are built from them, so each one is matched to the
exported weights first: a JSON counts only if it names this checkpoint file, its epoch and the same
weights (EMA or live). One of another checkpoint or epoch (a ``last.pt`` evaluated before training
went on) is skipped with a warning, never reported as this model's. Each keeps its SHA-256 (of the
file's bytes, as found) and the command that wrote it, so a reader can check and rerun it."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

RESULT, AUDIT = "result", "audit"
UNRECORDED = "not recorded (written by the Python API, or by an advews-eval that did not record its command)"


@dataclass(frozen=True)
class Evaluation:
    """One JSON next to the checkpoint: its path, kind (RESULT or AUDIT), content, and its bytes as
    read with their SHA-256 (the export copies those bytes, so the hash is the copy's)."""

    path: str
    kind: str
    data: Dict[str, Any]
    raw: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def command(self) -> str:
        """The command that wrote it, as recorded in it (``UNRECORDED`` when it carries none)."""
        command = self.data.get("command")
        return command if isinstance(command, str) and command else UNRECORDED


def _kind(data: Any) -> Optional[str]:
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("verdict"), str) and isinstance(data.get("indicators"), list):
        return AUDIT
    if isinstance(data.get("attacks"), dict) and "clean_acc" in data and "n_examples" in data:
        return RESULT
    return None


def _mismatch(data: Dict[str, Any], checkpoint: str, epoch: Any, weights: str) -> Optional[str]:
    """Why an evaluation is not of these weights, or None when it is."""
    named = data.get("checkpoint")
    if not isinstance(named, str):
        return "it names no checkpoint (an --arch or --model evaluation)"
    if os.path.basename(os.path.normpath(named)) != os.path.basename(checkpoint):
        return f"it evaluates {named}, not {os.path.basename(checkpoint)}"
    if data.get("epoch") != epoch:
        return f"it evaluates epoch {data.get('epoch')}, the checkpoint holds epoch {epoch}"
    if data.get("weights", weights) != weights:
        return f"it evaluates the {data.get('weights')} weights, the export holds the {weights} weights"
    return None


def find_evaluations(checkpoint: str, epoch: Any, weights: str) -> Tuple[List[Evaluation], List[str]]:
    """The evaluations of ``checkpoint``'s exported weights among the ``*.json`` beside it (sorted by
    name), and a warning for each advews evaluation JSON there that is of other weights. Files that
    are not advews evaluations (or not JSON) are not evaluations, and are passed over silently."""
    found: List[Evaluation] = []
    warnings: List[str] = []
    folder = os.path.dirname(os.path.abspath(checkpoint))
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.json"))):
        try:
            with open(path, "rb") as f:
                raw = f.read()
            data = json.loads(raw)
        except (OSError, ValueError):
            continue
        kind = _kind(data)
        if kind is None:
            continue
        why = _mismatch(data, checkpoint, epoch, weights)
        if why is not None:
            warnings.append(f"{path} is left out of the model card: {why}")
            continue
        found.append(Evaluation(path, kind, data, raw))
    return found, warnings


def data_flag(command: str) -> Optional[str]:
    """The --data an advews-eval command line names, if any (None also when no command is recorded)."""
    try:
        words = shlex.split(command) if command != UNRECORDED else []
    except ValueError:  # unbalanced quotes: not a command advews-eval wrote
        words = command.split()
    for i, word in enumerate(words):
        if word == "--data" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--data="):
            return word.split("=", 1)[1]
    return None


def attack_label(name: str, entry: Dict[str, Any]) -> str:
    """How a card names an attack: 'PGD-20', 'AutoAttack (standard)', 'square-5000', ..."""
    if name == "autoattack":
        return f"AutoAttack ({entry.get('version', '?')})"
    steps = entry.get("steps")
    return f"{name.upper() if name in ('pgd', 'fgsm', 'cw') else name}" + (f"-{steps}" if steps else "")
