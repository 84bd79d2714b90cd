"""Any timm model as an advews architecture: ``model.arch = 'timm:convnext_tiny'``.

``model.options`` go to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``,
``embed_dim``, ``num_heads``, ``depths``, ``dims``, ``drop_path_rate``, ...), so a small variant is a
gin line; classes and input channels come from the data, and normalisation is done by the
``Normalized`` wrapper as for every other architecture. No weights are downloaded (``pretrained``
is refused): robust training starts from scratch, and a pretrained start is a weights file.

Two options are advews's own, the ConvStem of Singh et al. 2023 ("Revisiting Adversarial Training
for ImageNet", nmndeep/revisiting-at), which replaces the patchify stem by a stack of 3x3 convs:
``conv_stem = True`` on a ViT/DeiT replaces ``patch_embed.proj`` (a p x p, stride-p conv) by log2(p)
stride-2 3x3 convs of widths w, 2w, 4w, ... (``conv_stem_width`` w, 48 as theirs), each followed by
a channels-first LayerNorm and GELU, then a 1x1 conv to the embedding width (their ViT-S/B stem for
p = 16). On a ConvNeXt it replaces the stride-p ``stem`` by log2(p) stride-2 3x3 convs ending at
``dims[0]`` (widths dims[0]/2, dims[0] for the standard p = 4), each with LayerNorm and GELU (their
ConvNeXt-T/S stem; their B/L stem, one more stride-1 conv, is not built here).

The timm version is part of a model's identity: timm renames and reshapes modules between releases
(RobustBench #162, #168), so ``model_spec`` records it and loaders compare it (``version_note``).
"""

from __future__ import annotations

import math
from typing import Any, Dict

from torch import nn

from advews.errors import AdvewsError

PREFIX = "timm:"
STEM_OPTIONS = ("conv_stem", "conv_stem_width")
CONV_STEM_WIDTH = 48


def is_timm(arch: Any) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)


def timm_version() -> str:
    import timm

    return timm.__version__


def _name(arch: str) -> str:
    import timm

    name = arch[len(PREFIX):]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        hint = f" (timm has e.g. {', '.join(close)})" if close else " (see timm.list_models())"
        raise AdvewsError(f"unknown timm model {name!r} in model.arch {arch!r}{hint}")
    return name


def check_timm(arch: str, options: Dict[str, Any]) -> None:
    """The timm name exists and advews's own options are valid; timm's keywords are checked when the
    model is built (``build_timm`` turns timm's TypeError into one line)."""
    _name(arch)
    if options.get("pretrained"):
        raise AdvewsError(f"model.options pretrained={options['pretrained']!r}: advews downloads no weights; "
                          "train from scratch or load a weights file (advews-eval --arch --weights)")
    stem = options.get("conv_stem", False)
    if not isinstance(stem, bool):
        raise AdvewsError(f"model.options conv_stem must be True or False, got {stem!r}")
    width = options.get("conv_stem_width", CONV_STEM_WIDTH)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise AdvewsError(f"model.options conv_stem_width must be a positive integer, got {width!r}")
    if "conv_stem_width" in options and not stem:
        raise AdvewsError("model.options conv_stem_width is set but conv_stem is not True; set conv_stem = True")


def _conv_block(cin: int, cout: int, stride: int) -> list:
    from timm.layers import LayerNorm2d

    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1), LayerNorm2d(cout), nn.GELU()]


def _stride_steps(stride: int, where: str) -> int:
    steps = int(round(math.log2(stride))) if stride >= 2 else 0
    if stride < 2 or 2 ** steps != stride:
        raise AdvewsError(f"conv_stem needs a patch size that is a power of 2 (>= 2); {where} has stride {stride}")
    return steps


def vit_conv_stem(proj: nn.Conv2d, width: int) -> nn.Sequential:
    """Singh et al.'s ViT ConvStem in place of the patchify conv ``proj`` (same output grid)."""
    steps = _stride_steps(proj.stride[0], "the ViT's patch_embed.proj")
    layers, cin = [], proj.in_channels
    for i in range(steps):
        layers += _conv_block(cin, width * 2 ** i, 2)
        cin = width * 2 ** i
    layers.append(nn.Conv2d(cin, proj.out_channels, kernel_size=1))
    return nn.Sequential(*layers)


def convnext_conv_stem(stem: nn.Sequential) -> nn.Sequential:
    """Singh et al.'s ConvNeXt ConvStem in place of the patchify ``stem`` (conv + norm)."""
    conv = stem[0]
    steps = _stride_steps(conv.stride[0], "the ConvNeXt's stem")
    dim, layers, cin = conv.out_channels, [], conv.in_channels
    for i in range(steps):
        cout = dim // 2 ** (steps - 1 - i)
        layers += _conv_block(cin, cout, 2)
        cin = cout
    return nn.Sequential(*layers)


def build_timm(arch: str, num_classes: int, in_channels: int, **options: Any) -> nn.Module:
    """``timm.create_model`` with advews's classes, channels and options (ConvStem applied after)."""
    import timm
    from timm.models.convnext import ConvNeXt
    from timm.models.vision_transformer import VisionTransformer

    check_timm(arch, options)
    stem = options.pop("conv_stem", False)
    width_given = "conv_stem_width" in options
    width = options.pop("conv_stem_width", CONV_STEM_WIDTH)
    try:
        net = timm.create_model(_name(arch), pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                **options)
    except (TypeError, ValueError, AssertionError, IndexError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdvewsError(f"timm cannot build {arch} with model.options {options}: {first}") from None
    if stem:
        if isinstance(net, VisionTransformer) and isinstance(getattr(net.patch_embed, "proj", None), nn.Conv2d):
            net.patch_embed.proj = vit_conv_stem(net.patch_embed.proj, width)
        elif isinstance(net, ConvNeXt) and isinstance(net.stem[0], nn.Conv2d):
            if width_given:
                raise AdvewsError("conv_stem_width applies to ViTs; a ConvNeXt's ConvStem ends at dims[0]")
            net.stem = convnext_conv_stem(net.stem)
        else:
            raise AdvewsError(f"conv_stem applies to timm ViT/DeiT and ConvNeXt models with a patchify stem, "
                              f"not {arch} ({type(net).__name__})")
    return net


def version_note(saved: Any) -> str:
    """How a loader names a timm version difference ('' when the versions agree or none is saved)."""
    if not isinstance(saved, str) or saved == timm_version():
        return ""
    return f"it was saved with timm {saved}, this is timm {timm_version()} (pip install timm=={saved})"

