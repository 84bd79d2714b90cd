"""Plain architectures, selectable by name from gin; no subnet code lives here."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import gin
from torch import nn

from advews.errors import AdvewsError
from advews.models.dm_wide_resnet import DMBlock, DMWideResNet, dm_wrn_28_10, dm_wrn_70_16
from advews.models.normalize import Normalized
from advews.models.preact_resnet import PreActBlock, PreActResNet, preact_resnet18, small_preact_resnet
from advews.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
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


@gin.configurable("model")
def model_spec(arch: str = "preact_resnet18", options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The architecture name and its keyword options; the data adds classes, channels and normalisation."""
    if arch not in ARCHITECTURES:
        raise AdvewsError(f"unknown model {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    return {"arch": arch, "options": dict(options or {})}


def build_model(spec: Dict[str, Any]) -> Normalized:
    """Build a normalised model from a spec dict: arch, options, num_classes, in_channels, mean, std.

    The same dict is stored in checkpoints, so a checkpoint alone rebuilds its model.
    """
    arch = spec["arch"]
    if arch not in ARCHITECTURES:
        raise AdvewsError(f"unknown model {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    try:
        net = ARCHITECTURES[arch](
            num_classes=spec["num_classes"], in_channels=spec["in_channels"], **spec.get("options", {})
        )
    except TypeError as e:
        raise AdvewsError(f"bad options {spec.get('options')} for model {arch!r}: {e}") from None
    return Normalized(net, spec.get("mean", [0.0] * spec["in_channels"]), spec.get("std", [1.0] * spec["in_channels"]))


__all__ = [
    "ARCHITECTURES", "BasicBlock", "Bottleneck", "DMBlock", "DMWideResNet", "Normalized",
    "PreActBlock", "PreActResNet", "ResNet", "WideBlock", "WideResNet", "build_model", "dm_wrn_28_10",
    "dm_wrn_70_16", "model_spec", "preact_resnet18", "resnet18", "resnet50", "small_preact_resnet",
    "tv_resnet50", "wrn_28_10", "wrn_34_10",
]
