"""The subnet space of a residual net: its blocks, each block's paths, each path's maskable layers.

A subnet keeps some paths of every block (residual branch, shortcut) and, inside every kept path,
some hidden channels of every layer. The space is discovered from outside the model through small
per-block-type adapters, so models stay plain and a new architecture only needs a new adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Type, Union

import gin
from torch import nn
from torchvision.models import resnet as tv_resnet

from advews.errors import AdvewsError
from advews.models import BasicBlock, Bottleneck, DMBlock, PreActBlock, WideBlock


@gin.configurable
def keep_count(n: int, rho: float, rounding: str = "ceil") -> int:
    """How many of ``n`` items (paths or channels) a width-``rho`` subnet keeps.

    ``rounding`` picks the rule applied to ``rho * n``: "ceil" (the paper's, default), "round" (half
    up) or "floor"; the result is clamped to [1, n]. With the paper's rule a block with 2 paths keeps
    both for any rho > 0.5. ``rho * n`` is first rounded to 9 decimals, so float error does not tip
    ceil(0.7 * 10) to 8.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"subnet width rho must be in (0, 1], got {rho}")
    x = round(rho * n, 9)
    rules = {"ceil": math.ceil, "round": lambda v: math.floor(v + 0.5), "floor": math.floor}
    if rounding not in rules:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(rules)}")
    return min(n, max(1, int(rules[rounding](x))))


@dataclass(frozen=True)
class LayerSpace:
    """Hidden channels of a path, masked at the input of ``module``, the conv or linear that consumes
    them. ``group``: input columns per channel, consecutive (an attention head is ``head_dim``
    columns of the output projection's input), so the module reads ``channels * group`` inputs."""

    name: str
    module: nn.Module
    channels: int
    group: int = 1


@dataclass(frozen=True)
class PathSpace:
    """One summand of a block: zeroing the output of ``output_module`` removes exactly this path.
    ``gain_module``: where ``L1Search`` reads the path's weight magnitude when ``output_module``
    holds no weight (a transformer branch ends in an identity or DropPath)."""

    name: str
    output_module: nn.Module
    layers: Tuple[LayerSpace, ...]
    gain_module: Optional[nn.Module] = None


@dataclass(frozen=True)
class BlockSpace:
    name: str
    paths: Tuple[PathSpace, ...]


BlockShape = Tuple[Tuple[int, ...], ...]


@dataclass(frozen=True)
class SubnetSpace:
    """The blocks of a model in forward order."""

    blocks: Tuple[BlockSpace, ...]

    def shape(self) -> Tuple[BlockShape, ...]:
        """Per block, per path, the channel count of each layer: all a policy needs to know."""
        return tuple(tuple(tuple(l.channels for l in p.layers) for p in b.paths) for b in self.blocks)

    def num_items(self) -> int:
        """Number of choosable items (paths and channels): the length of a subnet's tensor form."""
        return sum(len(b) + sum(sum(p) for p in b) for b in self.shape())


Adapter = Callable[[str, nn.Module], Sequence[PathSpace]]


@dataclass(frozen=True)
class ResidualAdapter:
    """Adapter for a block computing ``residual(x) + shortcut(x)`` (possibly followed by a ReLU).

    ``output``: attribute whose output is the residual branch's summand. ``consumers``: convs whose
    inputs are the branch's hidden activations, taken after BN + ReLU so masked channels are zero.
    ``shortcut``: attribute holding the shortcut module (an empty ``nn.Sequential`` for identity); a
    block whose attribute is None has no module to hook, so its shortcut is not a choosable path.
    """

    output: str
    consumers: Tuple[str, ...]
    shortcut: str = "shortcut"

    def __call__(self, name: str, block: nn.Module) -> Sequence[PathSpace]:
        layers = []
        for attr in self.consumers:
            conv = getattr(block, attr)
            if not hasattr(conv, "in_channels"):
                raise AdvewsError(f"{name}.{attr} is a {type(conv).__name__}, not a conv: cannot mask its input")
            layers.append(LayerSpace(f"{name}.{attr}", conv, conv.in_channels))
        paths = [PathSpace(f"{name}.residual", getattr(block, self.output), tuple(layers))]
        shortcut = getattr(block, self.shortcut)
        if shortcut is not None:
            paths.append(PathSpace(f"{name}.{self.shortcut}", shortcut, ()))
        return paths


BOTTLENECK_MASKS = ("conv2", "conv2+conv3")


@gin.configurable("bottleneck_masks", module="advews")
def bottleneck_consumers(layers: str = "conv2") -> Tuple[str, ...]:
    """Which hidden activations of a bottleneck block a subnet thins: the convs whose inputs are masked.

    'conv2' (default): the input of conv2 only (the output channels of conv1), as the authors'
    MaskBottleneck does for the ResNet-50 rows of Tables 1-3. 'conv2+conv3': also conv3's input
    (conv2's output channels), a subnet of every hidden layer of the block.
    """
    if layers not in BOTTLENECK_MASKS:
        raise AdvewsError(f"bottleneck_masks.layers must be one of {', '.join(BOTTLENECK_MASKS)}, got {layers!r}")
    return tuple(layers.split("+"))


@dataclass(frozen=True)
class BottleneckAdapter:
    """A ``ResidualAdapter`` whose masked layers follow ``bottleneck_masks`` when a model is discovered."""

    output: str
    shortcut: str = "shortcut"

    def __call__(self, name: str, block: nn.Module) -> Sequence[PathSpace]:
        return ResidualAdapter(self.output, bottleneck_consumers(), self.shortcut)(name, block)


_ADAPTERS: Dict[Type[nn.Module], Adapter] = {
    PreActBlock: ResidualAdapter("conv2", ("conv2",)),
    WideBlock: ResidualAdapter("conv2", ("conv2",)),
    DMBlock: ResidualAdapter("conv_1", ("conv_1",)),  # shortcut: a 1x1 conv or an nn.Identity
    BasicBlock: ResidualAdapter("bn2", ("conv2",)),
    Bottleneck: BottleneckAdapter("bn3"),
    # torchvision's ResNets (``tv_resnet50``): ``downsample`` is None for an identity shortcut
    tv_resnet.BasicBlock: ResidualAdapter("bn2", ("conv2",), shortcut="downsample"),
    tv_resnet.Bottleneck: BottleneckAdapter("bn3", shortcut="downsample"),
}


# Adapters of another library's blocks, by the class's qualified name: registering them imports
# nothing (timm's blocks, ``timm_adapters``; a timm model means timm is already imported).
_NAMED_ADAPTERS: Dict[str, Adapter] = {}


def register_adapter(block_cls: Union[Type[nn.Module], str], adapter: Adapter) -> None:
    """Teach ``discover`` a block type (subclasses included): ``adapter(name, block)`` lists its paths.
    ``block_cls`` may be the class's qualified name, ``'package.module.Class'``."""
    if isinstance(block_cls, str):
        _NAMED_ADAPTERS[block_cls] = adapter
    else:
        _ADAPTERS[block_cls] = adapter


def _adapter_for(module: nn.Module) -> Adapter | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
        named = _NAMED_ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def discover(model: nn.Module) -> SubnetSpace:
    """The subnet space of ``model``: every block with a registered adapter, in ``modules()`` order."""
    blocks = []
    for name, module in model.named_modules():
        adapter = _adapter_for(module)
        if adapter is not None:
            blocks.append(BlockSpace(name, tuple(adapter(name, module))))
    if not blocks:
        known = ", ".join(sorted([c.__name__ for c in _ADAPTERS] + [n.rsplit(".", 1)[1] for n in _NAMED_ADAPTERS]))
        raise AdvewsError(
            f"{type(model).__name__} has no residual block with a subnet adapter (known: {known}); "
            "add one with advews.subnets.register_adapter"
        )
    return SubnetSpace(tuple(blocks))
