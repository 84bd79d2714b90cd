"""Subnet adapters for timm's transformer and ConvNeXt blocks (``model.arch = 'timm:...'``).

What a path and a channel are, per family (the models stay timm's own; masks come from outside):

- ViT / DeiT ``Block`` (``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``): two paths, the attention
  branch and the MLP branch, each ending in its DropPath (an identity when drop_path is 0), after
  LayerScale. The residual stream itself is not a path (no module carries it). The attention
  branch's channels are its heads: a head is ``head_dim`` consecutive input columns of ``attn.proj``
  (the heads are concatenated head-major before the projection), so masking a head zeroes its
  slice of the projection's weight. The MLP branch's channels are its hidden units, fc2's input
  columns.
- Swin ``SwinTransformerBlock``: the same per (shifted) window-attention block; patch merging
  between stages is not a block, so it is never masked.
- ConvNeXt ``ConvNeXtBlock`` (``drop_path(gamma * mlp(norm(dwconv(x)))) + shortcut(x)``): two paths
  as in the ResNets, the residual branch and its shortcut (an identity, or a downsampling conv).
  The branch's channels are the MLP's hidden units (fc2's input: a Linear, or a 1x1 conv with
  ``conv_mlp``); the depthwise conv's channels are not masked.

Registered by qualified class name, so importing advews imports no timm. Every consuming layer is
a plain ``nn.Linear`` or groups-1 conv, so the mask rides on its weight columns (``apply.py``),
which equals masking its input, values and gradients (tests/test_timm.py). Widths: with two paths
per block any rho > 0.5 keeps both paths (ceil rule) and thins heads and hidden units only: the 3
heads of a ViT-Ti stay 3 at rho 0.7 (ceil 2.1) and become 2 at rho 0.6, 4 heads become 3 at rho
0.7; rho <= 0.5 also drops one of the two branches of every block.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from advews.errors import AdvewsError
from advews.subnets.space import LayerSpace, PathSpace, register_adapter


def _consumer(name: str, module: nn.Module, width: int) -> None:
    """``module`` reads ``width`` input channels and can carry a weight mask."""
    got = getattr(module, "in_features", getattr(module, "in_channels", None))
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or got != width:
        raise AdvewsError(f"{name} is a {type(module).__name__} reading {got} inputs, expected a Linear or "
                          f"1x1 conv reading {width}: this timm block cannot be masked")


def _heads(name: str, attn: nn.Module) -> LayerSpace:
    proj, heads = attn.proj, attn.num_heads
    width = proj.in_features if isinstance(proj, nn.Linear) else -1
    if width % heads:
        raise AdvewsError(f"{name}.proj reads {width} inputs, not a multiple of its {heads} heads")
    _consumer(f"{name}.proj", proj, width)
    return LayerSpace(f"{name}.proj", proj, heads, group=width // heads)


def _hidden(name: str, fc2: nn.Module) -> LayerSpace:
    width = getattr(fc2, "in_features", getattr(fc2, "in_channels", 0))
    _consumer(name, fc2, width)
    return LayerSpace(name, fc2, width)


def transformer_paths(name: str, block: nn.Module) -> Sequence[PathSpace]:
    """Attention branch (heads) and MLP branch (hidden units) of a ViT/DeiT or Swin block."""
    return (PathSpace(f"{name}.attn", block.drop_path1, (_heads(f"{name}.attn", block.attn),), block.attn.proj),
            PathSpace(f"{name}.mlp", block.drop_path2, (_hidden(f"{name}.mlp.fc2", block.mlp.fc2),), block.mlp.fc2))


def convnext_paths(name: str, block: nn.Module) -> Sequence[PathSpace]:
    """Residual branch (MLP hidden units) and shortcut of a ConvNeXt block."""
    fc2 = block.mlp.fc2
    return (PathSpace(f"{name}.residual", block.drop_path, (_hidden(f"{name}.mlp.fc2", fc2),), fc2),
            PathSpace(f"{name}.shortcut", block.shortcut, ()))


register_adapter("timm.models.vision_transformer.Block", transformer_paths)
register_adapter("timm.models.swin_transformer.SwinTransformerBlock", transformer_paths)
register_adapter("timm.models.convnext.ConvNeXtBlock", convnext_paths)
