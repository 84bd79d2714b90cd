"""What a resume may change. A checkpoint's optimizer and scheduler state would silently win over a
changed ``optimizer.lr`` (and so would anything else restored from it), so a resume compares the
gin bindings with the checkpoint's and refuses differences, except:

* ``MAY_CHANGE``: settings that do not alter what the run computes so far or that extend it
  (``train.epochs``: a longer run; the schedule follows the new length from here on), the device,
  compilation, checkpoint cadence, and where the data lives and how it is read;
* with ``--override``: any other setting except ``NEVER_CHANGE_PREFIXES`` (the model, the defense,
  the data, the batch size and the optimizer type, which the saved state or the mid-epoch position
  depend on). The new values are applied (optimizer hyper-parameters re-set after the state is
  loaded) and recorded in the checkpoint; a defense setting whose saved state no longer fits (e.g.
  ``EWS.search``) is refused when the state is loaded.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Tuple

import gin
import gin.config as gin_config

from advews.errors import AdvewsError

MAY_CHANGE = (
    "train.epochs",
    "train.device",
    "train.compile",
    "train.checkpoint_every_steps",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
)
NEVER_CHANGE_PREFIXES = ("model.", "data.", "train.defense", "train.batch_size", "optimizer.name")

_MISSING = object()


def _short(selector: str) -> str:
    return selector.rsplit(".", 1)[-1]


def current_bindings() -> Dict[str, Any]:
    """The parsed gin bindings as {'scope/name.param': value} (macros as '%NAME')."""
    out = {}
    for (scope, selector), params in gin_config._CONFIG.items():
        for param, value in params.items():
            if selector == "gin.macro":
                out[f"%{scope}"] = value
            else:
                out[f"{scope + '/' if scope else ''}{_short(selector)}.{param}"] = value
    return out


def bindings_of(config: str) -> Dict[str, Any]:
    """Bindings of a config text (e.g. a checkpoint's); replaces the parsed gin config."""
    gin.clear_config()
    gin.parse_config(config)
    return current_bindings()


def _default(key: str) -> Any:
    """The configurable's default for an unbound parameter (``_MISSING`` when unknown)."""
    if key.startswith("%"):
        return _MISSING
    name, param = key.split("/")[-1].rsplit(".", 1)
    try:
        configurable = gin_config._REGISTRY.get_match(name)
        parameter = inspect.signature(configurable.wrapped).parameters.get(param)
    except (KeyError, ValueError, TypeError):
        return _MISSING
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return _MISSING
    return parameter.default


def show_value(value: Any) -> str:
    return "(default)" if value is _MISSING else repr(value)


def _same_value(a: Any, b: Any) -> bool:
    """Equal as written (1 and 1.0 differ), dicts whatever their key order (config.gin sorts them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return repr(a) == repr(b)


def changed_settings(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, old value, new value) of each setting whose effective value differs."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        a = _default(key) if a is _MISSING else a
        b = _default(key) if b is _MISSING else b
        if not _same_value(a, b):
            changes.append((key, a, b))
    return changes


def describe(changes: List[Tuple[str, Any, Any]], limit: int = 6) -> str:
    shown = ", ".join(f"{k} ({show_value(a)} -> {show_value(b)})" for k, a, b in changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def check_changes(old: Dict[str, Any], new: Dict[str, Any], override: bool, run: str) -> List[Tuple[str, Any, Any]]:
    """The changes a resume of ``run`` applies; refuses (one line naming them) what it may not."""
    changes = [c for c in changed_settings(old, new) if c[0].split("/")[-1] not in MAY_CHANGE]
    fixed = [c for c in changes if c[0].split("/")[-1].startswith(NEVER_CHANGE_PREFIXES)]
    if fixed:
        raise AdvewsError(f"cannot resume {run}: these settings differ from its checkpoint and cannot change "
                          f"within a run: {describe(fixed)}; start a new run in another --output instead")
    if changes and not override:
        raise AdvewsError(f"cannot resume {run}: these settings differ from its checkpoint: {describe(changes)}; "
                          "drop them to continue as trained, or pass --override to apply them from here on")
    return changes
