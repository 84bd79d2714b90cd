"""Models trained elsewhere: a public state_dict loaded into a zoo architecture, or any ``module:function``.

Public CIFAR checkpoints name the same tensors in several ways: ``layer1.0.conv1`` and ``linear``
(kuangliu-style ResNets, Rice et al.'s PreAct ResNet), ``downsample`` and ``fc`` (torchvision style),
``block1.layer.0.convShortcut`` with a final ``bn1`` and ``fc`` (the TRADES / RobustBench WideResNet),
behind a ``module.`` (DataParallel) or ``model.`` prefix. An explicit rename table maps them onto our
names; a key that already names one of our tensors is kept as it is, so our own layout and
torchvision's load unchanged and our ResNets' stem ``bn1`` is never mistaken for the WRN's final BN.
Every shape is checked, and nothing is dropped silently except the tensors listed in ``UNUSED``.

DeepMind's WideResNet (RobustBench's ``DMWideResNet``: ``layer.0.block.0.conv_0``, ``logits``) needs
no renaming: ``dm_wide_resnet`` / ``dm_wrn_28_10`` / ``dm_wrn_70_16`` use its names (pass
``options={'activation': 'relu'}`` for its ReLU entries). It bakes its own input statistics into the
net; ``normalization='cifar10_dm'`` / ``'cifar100_dm'`` are those, for logits equal to the reference's.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from advews.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from advews.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from advews.errors import AdvewsError
from advews.models import build_model
from advews.models.dm_wide_resnet import DM_CIFAR10_MEAN, DM_CIFAR10_STD, DM_CIFAR100_MEAN, DM_CIFAR100_STD
from advews.models.normalize import Normalized

NORMALIZATIONS: Dict[str, Optional[Tuple[Sequence[float], Sequence[float]]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # the statistics DeepMind's / RobustBench's DMWideResNet bake in (std 0.2471 where advews has 0.2470)
    "cifar10_dm": (DM_CIFAR10_MEAN, DM_CIFAR10_STD),
    "cifar100_dm": (DM_CIFAR100_MEAN, DM_CIFAR100_STD),
    "none": None,
}

Rename = Tuple[str, Union[str, Callable[[re.Match], str]]]

# Applied in order, each at most once, to every key that is not already one of ours.
RENAMES: Tuple[Rename, ...] = (
    (r"^layer(\d+)\.", lambda m: f"layers.{int(m[1]) - 1}."),  # layer1.0.conv1 -> layers.0.0.conv1
    (r"^block(\d+)\.layer\.", lambda m: f"layers.{int(m[1]) - 1}."),  # WRN block1.layer.0 -> layers.0.0
    (r"\.downsample\.", ".shortcut."),  # torchvision-style projection shortcut
    (r"\.convShortcut\.", ".shortcut.0."),  # WRN 1x1 projection conv
    (r"^fc\.", "linear."),
    (r"^bn1\.", "bn."),  # WRN's final BN (our ResNets' stem bn1 is already ours, so it is kept)
)
# Tensors public checkpoints hold that their own forward never uses.
UNUSED = (
    r"^sub_block1\.",  # TRADES' WideResNet defines a "1st sub-block" it never calls
)
PREFIXES = re.compile(r"^((module|model)\.)+")
NORMALIZATION_KEYS = ("mean", "std")


def _few(items: Sequence[str], k: int = 4) -> str:
    return ", ".join(items[:k]) + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def _our_name(key: str, ours: Mapping[str, Any]) -> str:
    if key in ours:
        return key
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key, count=1)
    return key


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file (``torch.load(weights_only=True)``, so no code runs), unwrapped
    from a ``state_dict`` / ``model_state_dict`` / ``model`` / ``net`` entry when it holds one."""
    if not os.path.isfile(path):
        raise AdvewsError(f"no weights file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a plain state_dict"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdvewsError(f"cannot read {path} as a state_dict (torch.load weights_only=True): {first}") from None

    def tensors_only(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    for key in ("state_dict", "model_state_dict", "model", "net"):
        if not tensors_only(obj) and isinstance(obj, dict) and tensors_only(obj.get(key)):
            obj = obj[key]
    if not tensors_only(obj):
        raise AdvewsError(f"{path} holds no state_dict (a dict of tensors, possibly under 'state_dict' or 'model')")
    return obj


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str = "weights",
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Rename ``source`` onto the keys of ``target``; returns (the net's state, normalisation tensors).

    BN ``num_batches_tracked`` counters missing from old checkpoints are taken from ``target``. Any
    missing, unexpected, ambiguous or wrongly shaped tensor raises one AdvewsError line naming a few.
    """
    mapped: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    norm: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    ambiguous: List[str] = []
    for key, value in source.items():
        bare = PREFIXES.sub("", key)
        if bare in NORMALIZATION_KEYS:
            norm[bare] = value
            continue
        if any(re.match(p, bare) for p in UNUSED):
            continue
        name = _our_name(bare, target)
        if name not in target:
            unexpected.append(key)
        elif name in mapped:
            ambiguous.append(f"{origin[name]} and {key} -> {name}")
        else:
            mapped[name], origin[name] = value, key
    for name, value in target.items():
        if name not in mapped and name.endswith("num_batches_tracked"):
            mapped[name] = value
    missing = [k for k in target if k not in mapped]
    shapes = [f"{origin[k]} {tuple(v.shape)} vs {k} {tuple(target[k].shape)}"
              for k, v in mapped.items() if k in origin and v.shape != target[k].shape]
    problems = [f"{label} {len(items)}: {_few(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("ambiguous", ambiguous),
                 ("wrong shape", shapes)) if items]
    if problems:
        raise AdvewsError(f"{what} do not fit the model: {'; '.join(problems)}")
    return mapped, norm


def load_external(
    arch: str,
    weights: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    normalization: str = "cifar10",
    options: Optional[Dict[str, Any]] = None,
) -> Normalized:
    """A zoo architecture (``ARCHITECTURES``, built with ``options``) holding the weights of a plain
    state_dict file, wrapped in ``Normalized`` and set to eval mode.

    ``normalization``: the input normalisation the weights were trained with (cifar10, cifar100,
    imagenet, or none for nets that take raw [0, 1] pixels). A file that carries its own mean/std
    (an advews ``Normalized`` state) must agree with it, so a mismatch cannot pass unnoticed.
    """
    if normalization not in NORMALIZATIONS:
        raise AdvewsError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    stats = NORMALIZATIONS[normalization]
    mean, std = stats if stats is not None else ((0.0,) * in_channels, (1.0,) * in_channels)
    if len(mean) != in_channels:
        raise AdvewsError(f"normalization {normalization!r} is for {len(mean)} channels, in_channels is {in_channels}")
    model = build_model({"arch": arch, "options": dict(options or {}), "num_classes": num_classes,
                         "in_channels": in_channels, "mean": list(mean), "std": list(std)})
    state, norm = map_state_dict(read_state_dict(weights), model.model.state_dict(), what=f"weights {weights}")
    for key, value in norm.items():
        ours = getattr(model, key)
        if value.shape != ours.shape or not torch.allclose(value.float(), ours, atol=1e-4):
            raise AdvewsError(f"{weights} was saved with input {key} {value.flatten().tolist()}, but "
                              f"normalization {normalization!r} uses {ours.flatten().tolist()}")
    model.model.load_state_dict(state)
    return model.eval()


def load_module(spec: str) -> nn.Module:
    """The nn.Module returned by calling ``function()`` of ``module`` for a ``module:function`` spec.

    The module is imported by name, so it must be on ``sys.path`` (a CLI may add the working directory).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AdvewsError(f"model spec {spec!r} is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AdvewsError(f"cannot import {module_name!r} for model spec {spec!r}: {e}") from None
    build = getattr(module, attr, None)
    if not callable(build):
        raise AdvewsError(f"module {module_name!r} has no function {attr!r}")
    model = build()
    if not isinstance(model, nn.Module):
        raise AdvewsError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
