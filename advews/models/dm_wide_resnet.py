"""DeepMind's WideResNet, the net of the RobustBench top CIFAR entries: WRN-28-10 and WRN-70-16 with SiLU.

Used by Gowal et al. 2020 ("Uncovering the limits"), Rebuffi et al. 2021 ("Fixing data augmentation")
and Wang et al. 2023 ("Better diffusion models further improve adversarial training", DM-Improves-AT).
Written from these references (read for their facts, no code copied):

- deepmind-research ``adversarial_robustness/pytorch/model_zoo.py`` (``WideResNet``), identical to
  RobustBench's ``robustbench/model_zoo/architectures/dm_wide_resnet.py`` (``DMWideResNet``):
  a pre-activation block BN-act-conv3x3(stride)-BN-act-conv3x3; a 1x1 projection shortcut exactly
  when the width changes, fed the block's *activated* input, while the identity shortcut takes the
  raw input; the strided 3x3 conv pads TF-"SAME"-style, one row and column at the bottom and right
  only (``F.pad(0, 1, 0, 1)``), and the 1x1 shortcut conv is unpadded; no conv biases; stem: a 3x3
  conv to 16 channels; three stages of widths 16w, 32w, 64w with (depth - 4) / 6 blocks each and
  strides 1, 2, 2; head: BN-act, average pool, linear. Activation ReLU or Swish (= SiLU).
  Module names are theirs (``init_conv``, ``layer.G.block.I.{batchnorm_0, conv_0, batchnorm_1,
  conv_1, shortcut}``, ``batchnorm``, ``logits``), so their state_dicts load with no key mapping.
- deepmind-research ``adversarial_robustness/jax/model_zoo.py`` (the original): BN decay 0.99, i.e.
  PyTorch momentum 0.01; Wang et al.'s ``core/models/wideresnetwithswish.py`` (wzekai99/DM-Improves-AT)
  trains with that momentum 0.01 (the PyTorch ports above keep PyTorch's 0.1; weights do not
  depend on it) and initialises convs N(0, 2 / (k * k * out_channels)), BN to (1, 0), linear bias 0.

Where this differs: the references bake CIFAR mean/std into the net (CIFAR-10 std 0.2471, ...); here
advews's ``Normalized`` wrapper applies the dataset's (advews's CIFAR-10 std is 0.2470), and
``load_external(normalization='cifar10_dm')`` reproduces theirs (``DM_CIFAR10_MEAN`` ...). The head
pools globally instead of ``avg_pool2d(8)``: the same on 32x32 inputs, and defined on others. There
is no input-padding option (theirs defaults to 0) and no in-place activation. The identity shortcut
is an ``nn.Identity`` rather than None (no weights), so a subnet can drop it as a path. The JAX
original's BN has no bias; the PyTorch ports' and this one's do.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from advews.errors import AdvewsError
from advews.models.activation import activation_fn

# The input statistics the references bake into the net (deepmind-research, RobustBench).
DM_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
DM_CIFAR10_STD = (0.2471, 0.2435, 0.2616)
DM_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
DM_CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class DMBlock(nn.Module):
    """Pre-activation block; the strided conv pads only bottom/right, as the TF original's "SAME"."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int = 1, activation: str = "silu", bn_momentum: float = 0.01,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise AdvewsError(f"DMBlock stride must be 1 or 2, got {stride}")
        self.act = activation_fn(activation)
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, padding=1 if stride == 1 else 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes or stride != 1
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if self.has_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.batchnorm_0(x))
        shortcut = self.shortcut(out if self.has_shortcut else x)
        if self.stride == 2:
            out = F.pad(out, (0, 1, 0, 1))
        out = self.conv_1(self.act(self.batchnorm_1(self.conv_0(out))))
        return shortcut + out


class DMBlockGroup(nn.Module):
    """One stage; exists so parameter names read ``layer.G.block.I`` as in the references."""

    def __init__(
        self, num_blocks: int, in_planes: int, out_planes: int, stride: int, activation: str, bn_momentum: float,
    ):
        super().__init__()
        self.block = nn.Sequential(*[
            DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation, bn_momentum)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-``depth``-``width`` of Gowal et al. / Rebuffi et al. / Wang et al.; SiLU unless ``activation='relu'``."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "silu",
        bn_momentum: float = 0.01,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AdvewsError(f"dm_wide_resnet depth must be 6n+4 with n >= 1 (e.g. 28, 70, 106), got {depth}")
        if width < 1:
            raise AdvewsError(f"dm_wide_resnet width must be a positive integer, got {width}")
        self.act = activation_fn(activation)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.layer = nn.Sequential(*[
            DMBlockGroup(n, widths[i], widths[i + 1], 1 if i == 0 else 2, activation, bn_momentum) for i in range(3)
        ])
        self.batchnorm = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.logits = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.batchnorm(self.layer(self.init_conv(x))))
        return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))


def dm_wrn_28_10(
    num_classes: int = 10, in_channels: int = 3, activation: str = "silu", bn_momentum: float = 0.01,
) -> DMWideResNet:
    """Wang et al. 2023's and Rebuffi et al. 2021's WRN-28-10 (36.5M parameters at 10 classes)."""
    return DMWideResNet(28, 10, num_classes, in_channels, activation, bn_momentum)


def dm_wrn_70_16(
    num_classes: int = 10, in_channels: int = 3, activation: str = "silu", bn_momentum: float = 0.01,
) -> DMWideResNet:
    """Gowal et al. 2020's and Rebuffi et al. 2021's WRN-70-16 (266.8M parameters at 10 classes)."""
    return DMWideResNet(70, 16, num_classes, in_channels, activation, bn_momentum)
