"""What a loader read is checked before it is used: a checkpoint or export whose ``model_spec``,
``threat_model`` or ``data_spec`` has the wrong types, whose spec does not fit its weights, whose
weights are not finite or whose normalisation divides by zero is refused in one line, instead of a
load_state_dict traceback or a silently wrong evaluation. ``advews-export`` runs the same checks
before it writes, so it never shares a model that cannot be loaded.

The model is built on the ``meta`` device to compare shapes, which allocates nothing, so checking
a 267M-parameter WideResNet costs about a second.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any, Dict, List, Mapping, Optional

import torch

from advews.errors import AdvewsError

NORMS = ("Linf", "L2")
_warned: set = set()


def warn_once(key: str, line: str) -> None:
    """One ``warning: ...`` line on stderr, once per ``key`` in this process."""
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {line}", file=sys.stderr, flush=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (list, dict)) else f"a {type(value).__name__}"


def _stats(path: str, spec: Dict[str, Any], key: str) -> None:
    """``mean``/``std``: a list of in_channels finite numbers; std never 0 (the model divides by it)."""
    if key not in spec:
        return
    value = spec[key]
    if not isinstance(value, (list, tuple)) or not all(_number(v) for v in value):
        raise AdvewsError(f"{path}: model_spec {key} must be a list of numbers, one per input channel, got {value!r}")
    if len(value) != spec["in_channels"]:
        raise AdvewsError(f"{path}: model_spec {key} has {len(value)} entries, but in_channels is "
                          f"{spec['in_channels']}")
    if not all(math.isfinite(v) for v in value):
        raise AdvewsError(f"{path}: model_spec {key} {list(value)} must hold finite numbers")
    if key == "std" and any(v <= 0 for v in value):
        raise AdvewsError(f"{path}: model_spec std {list(value)} must hold numbers > 0 (the model divides by it)")


def check_spec(path: str, spec: Any) -> None:
    """The types of a ``model_spec``: known arch, options dict, classes, channels, mean and std."""
    from advews.models import ARCHITECTURES, known_arch

    if not isinstance(spec, dict):
        raise AdvewsError(f"{path} is not an advews checkpoint (model_spec is {_kind(spec)}, not a dict)")
    arch = spec.get("arch")
    if not known_arch(arch):
        raise AdvewsError(f"{path}: model_spec names unknown model {arch!r}; "
                          f"this advews knows {', '.join(sorted(ARCHITECTURES))} and timm:NAME")
    for key, low in (("num_classes", 2), ("in_channels", 1)):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise AdvewsError(f"{path}: model_spec {key} must be an integer >= {low}, got {value!r}")
    options = spec.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise AdvewsError(f"{path}: model_spec options must be a dict of keyword arguments, got {options!r}")
    _stats(path, spec, "mean")
    _stats(path, spec, "std")
    version = spec.get("timm_version")
    if version is not None and not isinstance(version, str):
        raise AdvewsError(f"{path}: model_spec timm_version must be a version string like '1.0.31', got {version!r}")


def check_threat_model(path: str, threat: Any) -> None:
    """``threat_model``: absent, or {"eps": finite number >= 0, "norm": Linf or L2} (each optional)."""
    if threat is None:
        return
    if not isinstance(threat, dict):
        raise AdvewsError(f"{path}: threat_model must be a dict like {{'eps': 0.031, 'norm': 'Linf'}}, "
                          f"got {_kind(threat)}")
    eps = threat.get("eps")
    if eps is not None and not (_number(eps) and math.isfinite(eps) and eps >= 0):
        raise AdvewsError(f"{path}: threat_model eps must be a finite number >= 0, got {eps!r}")
    norm = threat.get("norm")
    if norm is not None and norm not in NORMS:
        raise AdvewsError(f"{path}: threat_model norm must be one of {', '.join(NORMS)}, got {norm!r}")


def data_keys() -> List[str]:
    """The ``data.*`` settings this advews knows (what a checkpoint's ``data_spec`` may hold)."""
    from advews.data import load_data

    return [k for k in inspect.signature(load_data).parameters if k not in ("rank", "world")]


def known_data_spec(path: str, data_spec: Any) -> Dict[str, Any]:
    """``data_spec`` without the keys this advews does not know, each named once in a warning.

    Such a key comes from a newer advews's ``data.*`` setting. Its weights and model spec are checked
    in full, and the data_spec only names the test split to evaluate on (the keys that choose it,
    dataset, root, image_size, val_size, split_seed, test_limit, are known), so the model stays usable;
    refusing would leave no way to evaluate it even with --data."""
    if data_spec is None:
        return {}
    if not isinstance(data_spec, dict) or not all(isinstance(k, str) for k in data_spec):
        raise AdvewsError(f"{path}: data_spec must be a dict of data.* settings like {{'dataset': 'cifar10'}}, "
                          f"got {_kind(data_spec)}")
    if data_spec and not isinstance(data_spec.get("dataset"), str):
        raise AdvewsError(f"{path}: data_spec dataset must be a dataset name, got {data_spec.get('dataset')!r}")
    known = data_keys()
    unknown = [k for k in data_spec if k not in known]
    if unknown:
        warn_once(f"{path}:data_spec", f"{path}: data_spec key{'s' if len(unknown) > 1 else ''} "
                  f"{', '.join(map(repr, unknown))} unknown to this advews (written by a newer version?) "
                  f"{'are' if len(unknown) > 1 else 'is'} ignored")
    return {k: v for k, v in data_spec.items() if k in known}


def check_state_types(path: str, state: Any) -> Dict[str, Any]:
    """The metadata of a loaded checkpoint or export; returns its data_spec without unknown keys."""
    if not isinstance(state, dict):
        raise AdvewsError(f"{path} is not an advews checkpoint (it holds {_kind(state)}, not a dict)")
    if "model_spec" not in state:
        raise AdvewsError(f"{path} is not an advews checkpoint (no model_spec)")
    check_spec(path, state["model_spec"])
    check_threat_model(path, state.get("threat_model"))
    for key, types, what in (("defense", str, "a defense name"), ("epoch", int, "an integer")):
        value = state.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise AdvewsError(f"{path}: {key} must be {what}, got {value!r}")
    return known_data_spec(path, state.get("data_spec"))


def describe_spec(spec: Dict[str, Any]) -> str:
    """How a refusal names a model spec: arch, classes, channels."""
    channels = spec["in_channels"]
    return (f"{spec['arch']}, {spec['num_classes']} classes, {channels} input channel{'s' if channels != 1 else ''}"
            + (f", options {spec['options']}" if spec.get("options") else ""))


def _first_misfit(model: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The first way ``weights`` do not load into a model whose state_dict is ``model`` (strict)."""
    for key, value in sorted(weights.items(), key=lambda kv: kv[0] in ("mean", "std")):  # the net's tensors first
        if key not in model:
            return f"its weights hold {key} {list(value.shape)}, which the model does not have"
        if tuple(value.shape) != tuple(model[key].shape):
            return f"{key} is {list(value.shape)} in the weights, {list(model[key].shape)} in the model"
    missing = [k for k in model if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        return f"the weights lack {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    return None


def _build_meta(path: str, spec: Dict[str, Any]) -> torch.nn.Module:
    from advews.models import build_model

    try:
        with torch.device("meta"):
            return build_model(spec)
    except AdvewsError as e:
        raise AdvewsError(f"{path}: {e}") from None
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdvewsError(f"{path}: cannot build its model_spec ({describe_spec(spec)}): {first}") from None


def _timm_drift(spec: Dict[str, Any]) -> str:
    """The timm version note of a timm spec ('' for other archs or the same timm)."""
    from advews.models.timm_arch import is_timm, version_note

    return version_note(spec.get("timm_version")) if is_timm(spec.get("arch")) else ""


def check_weights(path: str, spec: Dict[str, Any], weights: Any) -> None:
    """``weights`` (a state_dict) are finite, fit the model ``spec`` builds and agree with its
    normalisation; ``spec`` has passed ``check_spec``."""
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in weights.items()):
        raise AdvewsError(f"{path}: its model weights are {_kind(weights)}, not a dict of tensors")
    model = _build_meta(path, spec).state_dict()
    misfit = _first_misfit(model, weights)
    drift = _timm_drift(spec)
    if misfit:
        raise AdvewsError(f"{path}: its model_spec ({describe_spec(spec)}) does not fit its weights ({misfit})"
                          + (f"; {drift}" if drift else ""))
    if drift:
        warn_once(f"{path}:timm", f"{path}: {drift}; its weights fit this timm's {spec['arch']}, "
                  "but layers may compute differently: compare its clean accuracy before trusting numbers")
    bad = [k for k, v in weights.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        what = "NaN" if torch.isnan(weights[bad[0]]).any() else "Inf"
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise AdvewsError(f"{path}: its weights are not finite ({what} in {bad[0]}{more}); "
                          "the model cannot be evaluated")
    std = weights.get("std")
    if std is not None and not bool((std > 0).all()):
        raise AdvewsError(f"{path}: its input std {std.flatten().tolist()} must be > 0 (the model divides by it)")
    for key in ("mean", "std"):
        held = weights.get(key)
        if key in spec and held is not None and not torch.allclose(
                torch.tensor(spec[key], dtype=torch.float32), held.detach().float().cpu().flatten(), atol=1e-6):
            raise AdvewsError(f"{path}: its model_spec ({describe_spec(spec)}) does not fit its weights "
                              f"(model_spec {key} {list(spec[key])}, the weights hold {held.flatten().tolist()})")


def check_finite_module(path: str, model: torch.nn.Module) -> None:
    """A model loaded from elsewhere (--arch --weights): no NaN or Inf in its state."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise AdvewsError(f"{path}: its weights are not finite (NaN or Inf in {bad[0]}{more}); "
                          "the model cannot be evaluated")


def check_rng_states(path: str, rng: Any) -> None:
    """A resumed checkpoint's ``rng`` entry: one random-number-generator state per rank, each of
    which ``checkpoint.set_rng_state`` accepts (tried here, then this process's own state restored).
    Call before a resume uses it (``engine.state`` ``_load``)."""
    from advews.engine.checkpoint import rng_state, set_rng_state

    if not isinstance(rng, list) or not rng:
        raise AdvewsError(f"cannot resume {path}: its rng entry must be a list of per-rank RNG states, "
                          f"got {_kind(rng)}")
    saved = rng_state()
    try:
        for rank, entry in enumerate(rng):
            try:
                set_rng_state(entry)
            except Exception as e:  # noqa: BLE001 - any failure means the entry is not an RNG state
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise AdvewsError(f"cannot resume {path}: its rng entry for rank {rank} is not an RNG state "
                                  f"({first})") from None
    finally:
        set_rng_state(saved)
