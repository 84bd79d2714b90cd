"""Plain architectures, selectable by name from gin; no subnet code lives here."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional

import gin
from torch import nn

from advews.errors import AdvewsError
from advews.models.dm_wide_resnet import DMBlock, DMWideResNet, dm_wrn_28_10, dm_wrn_70_16
from advews.models.activation import activation_fn
from advews.models.normalize import Normalized
from advews.models.preact_resnet import PreActBlock, PreActResNet, preact_resnet18, small_preact_resnet
from advews.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from advews.models.timm_arch import build_timm, check_timm, is_timm, timm_version
from advews.models.wide_resnet import WideBlock, WideResNet, wrn_28_10, wrn_34_10


def tv_resnet50(num_classes: int = 1000, in_channels: int = 3, **options: Any) -> nn.Module:
    """torchvision's ImageNet ResNet-50 (7x7 stem, max-pool), randomly initialised: no weights are
    downloaded. ``options`` go to ``torchvision.models.resnet50`` (e.g. ``zero_init_residual``)."""
    if in_channels != 3:
        raise AdvewsError(f"tv_resnet50 takes 3 input channels, got in_channels={in_channels}")
    from torchvision.models import resnet50 as build  # slow import, only for this architecture

    return build(weights=None, num_classes=num_classes, **options)


ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "small_preact_resnet": small_preact_resnet,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "wrn_28_10": wrn_28_10,
    "wrn_34_10": wrn_34_10,
    "wide_resnet": WideResNet,
    "dm_wrn_28_10": dm_wrn_28_10,
    "dm_wrn_70_16": dm_wrn_70_16,
    "dm_wide_resnet": DMWideResNet,
    "tv_resnet50": tv_resnet50,
}


DEFAULT_ARCH = "preact_resnet18"
POSITIVE_INTS = ("blocks_per_stage", "depth", "widen_factor", "width")  # options that count layers or channels
WRN_DEPTHS = {"wide_resnet": "e.g. 28, 34", "dm_wide_resnet": "e.g. 28, 70, 106"}


def known_arch(arch: Any) -> bool:
    """A name of ``ARCHITECTURES`` or ``timm:NAME`` (any timm model)."""
    return isinstance(arch, str) and (arch in ARCHITECTURES or is_timm(arch))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_options(arch: str, options: Any) -> None:
    """``model.arch`` and ``model.options`` in one line each before anything is built: an unknown
    architecture or option, a width or depth that is not a positive integer, a dropout outside
    [0, 1), an unknown activation (torch would fail later with a negative-dimension traceback)."""
    if not known_arch(arch):
        raise AdvewsError(f"unknown model {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}, "
                          "or timm:NAME for any timm model")
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise AdvewsError(f"model.options must be a dict of keyword options such as {{'dropout': 0.1}}, got {options!r}")
    if is_timm(arch):
        check_timm(arch, options)
        return
    params = inspect.signature(ARCHITECTURES[arch]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [n for n in params if n not in ("num_classes", "in_channels")]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise AdvewsError(f"model.options {unknown[0]!r} is not an option of model.arch {arch!r}; it takes "
                              f"{', '.join(allowed) or 'none'}")
    widths = options.get("widths")
    if "widths" in options and (not isinstance(widths, (list, tuple)) or not widths
                                or not all(_positive_int(w) for w in widths)):
        raise AdvewsError(f"model.options widths must be positive integers, got {widths!r}")
    for key in POSITIVE_INTS:
        if key in options and not _positive_int(options[key]):
            raise AdvewsError(f"{arch} {key} must be a positive integer, got {options[key]!r}")
    depth = options.get("depth")
    if arch in WRN_DEPTHS and depth is not None and (depth < 10 or (depth - 4) % 6):
        raise AdvewsError(f"{arch} depth must be 6n+4 with n >= 1 ({WRN_DEPTHS[arch]}), got {depth}")
    dropout = options.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdvewsError(f"model.options dropout must be a number in [0, 1), got {dropout!r}")
    if "activation" in options:
        activation_fn(options["activation"])  # "unknown activation ..." otherwise
    momentum = options.get("bn_momentum", 0.01)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise AdvewsError(f"model.options bn_momentum must be a number in [0, 1], got {momentum!r}")


@gin.configurable("model")
def model_spec(arch: str = DEFAULT_ARCH, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The architecture name and its keyword options; the data adds classes, channels and normalisation.
    A timm architecture also records the timm version it is built with (see ``timm_arch``)."""
    options = {} if options is None else options
    check_options(arch, options)
    spec = {"arch": arch, "options": dict(options)}
    if is_timm(arch):
        spec["timm_version"] = timm_version()
    return spec


def build_model(spec: Dict[str, Any]) -> Normalized:
    """Build a normalised model from a spec dict: arch, options, num_classes, in_channels, mean, std.

    The same dict is stored in checkpoints, so a checkpoint alone rebuilds its model.
    """
    arch = spec["arch"]
    check_options(arch, spec.get("options", {}))
    build = functools.partial(build_timm, arch) if is_timm(arch) else ARCHITECTURES[arch]
    try:
        net = build(num_classes=spec["num_classes"], in_channels=spec["in_channels"], **spec.get("options", {}))
    except TypeError as e:
        raise AdvewsError(f"bad options {spec.get('options')} for model {arch!r}: {e}") from None
    return Normalized(net, spec.get("mean", [0.0] * spec["in_channels"]), spec.get("std", [1.0] * spec["in_channels"]))


__all__ = [
    "ARCHITECTURES", "DEFAULT_ARCH", "BasicBlock", "Bottleneck", "DMBlock", "DMWideResNet", "Normalized",
    "PreActBlock", "PreActResNet", "ResNet", "WideBlock", "WideResNet", "build_model", "check_options", "known_arch", "dm_wrn_28_10",
    "dm_wrn_70_16", "model_spec", "preact_resnet18", "resnet18", "resnet50", "small_preact_resnet",
    "tv_resnet50", "wrn_28_10", "wrn_34_10",
]
