"""Models to evaluate, as nn.Modules taking [0, 1] pixels (normalisation inside) that carry what an
evaluation needs to know about their training: its threat model (the default eps and norm), its
dataset (the default test data, the split a subnet search trains on) and how reports name it."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from advews.api.arguments import check_arguments, public
from advews.api.checks import check_checkpoint, checkpoint_image_shape
from advews.api.options import EvalOptions
from advews.api.sources import DATA_FORMS, check_model_source, dataset_args, external_defaults, load_eval_data
from advews.errors import AdvewsError

PathArg = Union[str, "os.PathLike[str]"]


class Facts(NamedTuple):
    """What ``load_model`` attaches to a model; a module from elsewhere has none of it."""

    source: Dict[str, Any]  # the entries that name the model in the JSON (checkpoint and epoch, arch, ...)
    threat_model: Dict[str, Any]  # {"eps": ..., "norm": ...} it was trained against, {} when unknown
    data_spec: Dict[str, Any]  # its dataset ({"dataset": "cifar10", ...}), {} when unknown
    image_shape: Optional[Tuple[Optional[int], ...]]  # (C, H, W) it was trained on, None when unknown


def facts(model: nn.Module) -> Facts:
    """The attributes ``load_model`` set, or what is known of any other module (its class name)."""
    default = {"model": f"{type(model).__module__}.{type(model).__qualname__}"}
    return Facts(getattr(model, "source", default), getattr(model, "threat_model", {}),
                 getattr(model, "data_spec", {}), getattr(model, "image_shape", None))


def _attach(model: nn.Module, known: Facts) -> nn.Module:
    for name, value in known._asdict().items():
        setattr(model, name, value)
    return model


@public
def load_model(
    path: Optional[PathArg] = None,
    *,
    arch: Optional[str] = None,
    weights: Optional[PathArg] = None,
    normalization: Optional[str] = None,
    num_classes: Optional[int] = None,
    data: Optional[str] = None,
    device: str = "cpu",
    weights_from: Optional[str] = None,
) -> nn.Module:
    """The model of an advews checkpoint (best.pt / last.pt) or advews-export directory at ``path``,
    or zoo architecture ``arch`` holding the state_dict file ``weights`` (like advews-eval's --arch,
    --weights, --normalization, --num-classes; ``data``, a --data spec, sets their defaults and the
    input channels). In eval mode on ``device``, with the attributes ``threat_model``, ``data_spec``,
    ``source`` and ``image_shape`` (see ``Facts``), which ``evaluate`` takes its defaults from.
    ``weights_from``: a checkpoint's 'ema' or 'live' weights (like --weights-from; default its EMA's
    when it has one)."""
    check_arguments("load_model", locals())
    from advews.engine.devices import resolve_device

    path, weights = (None if p is None else os.fspath(p) for p in (path, weights))
    check_model_source(EvalOptions(checkpoint=path, arch=arch, weights=weights, normalization=normalization,
                                   num_classes=num_classes, weights_from=weights_from))
    where = resolve_device(device)
    if path is not None:
        return checkpoint_model(path, where, weights_from)
    if data is None:
        raise AdvewsError(f"--data is required without --checkpoint (there is no training dataset): {DATA_FORMS}")
    model = arch_model(EvalOptions(arch=arch, weights=weights, normalization=normalization,
                                   num_classes=num_classes, data=data), _channels(data))
    return model.to(where)


def checkpoint_model(path: str, device: torch.device, weights_from: Optional[str] = None) -> nn.Module:
    """An advews checkpoint or export, checked before its weights (``engine.ema.select_weights``:
    ``weights_from``, default the EMA's when it has one) are built into the model: the types of
    what it records, and weights that fit its model_spec, are finite and never divide by a zero std
    (``engine.model_check``), each refused in one line. data_spec keys unknown to this advews are
    dropped with a warning that names them."""
    from advews.engine.ema import select_weights
    from advews.engine.export import is_export, load_export
    from advews.engine.model_check import check_state_types, check_weights
    from advews.models import build_model

    if is_export(path):  # config.json and model.safetensors only: no pickle, no training code
        state = load_export(path, map_location=device)
    else:
        from advews.engine.checkpoint import load_checkpoint

        state = load_checkpoint(path, map_location=device)
    data_spec = check_state_types(path, state)  # before check_checkpoint, which assumes the types
    check_checkpoint(path, state)
    weights, which = select_weights(state, weights_from, path)
    check_weights(path, state["model_spec"], weights)  # fits the model, finite, std > 0
    model = build_model(state["model_spec"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # what check_weights cannot foresee (a module's own load hook)
        raise AdvewsError(f"{path}: its weights do not load into its model_spec "
                          f"({' '.join(str(e).split())[:300]})") from None
    return _attach(model.to(device).eval(), Facts(
        {"checkpoint": path, "epoch": state.get("epoch"), "weights": which}, state.get("threat_model") or {},
        data_spec, checkpoint_image_shape({**state, "data_spec": data_spec})))


def arch_model(args: EvalOptions, in_channels: int) -> nn.Module:
    """--arch with --weights: normalisation and classes from the flags, else from --data dataset:NAME."""
    from advews.engine.model_check import check_finite_module
    from advews.models.external import load_external

    normalization, num_classes = external_defaults(args.data, args.normalization, args.num_classes)
    model = load_external(args.arch, args.weights, num_classes=num_classes, in_channels=in_channels,
                          normalization=normalization)
    check_finite_module(args.weights, model)
    source = {"arch": args.arch, "weights": args.weights, "normalization": normalization, "num_classes": num_classes}
    data_spec = dataset_args(args.data) if args.data.startswith("dataset:") else {}
    return _attach(model, Facts(source, {}, data_spec, None))


def module_model(spec: str) -> nn.Module:
    """--model MODULE:FUNCTION, imported from the current directory as advews-train finds it."""
    from advews.models.external import load_module

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return _attach(load_module(spec), Facts({"model": spec}, {}, {}, None))


def _channels(data: str) -> int:
    """Input channels of ``data``'s images: the registry's, else those of the loaded test split."""
    from advews.data import get_dataset

    if data.startswith("dataset:"):
        shape = get_dataset(dataset_args(data)["dataset"]).image_shape
        if shape is not None:
            return shape[0]
    return load_eval_data(data, {}).image_shape[0]
