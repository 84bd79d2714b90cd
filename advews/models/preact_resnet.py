"""Pre-activation ResNets (He et al. 2016) for small images: PreAct ResNet-18 and a small 28x28 net."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from advews.models.activation import activation_fn


class PreActBlock(nn.Module):
    """bn-act-conv x2 with a residual branch and an (identity or 1x1) shortcut path; act is ReLU or SiLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.act = activation_fn(activation)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if len(self.shortcut) > 0 else self.shortcut(x)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act(self.bn2(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Stem conv, stages of PreActBlocks, final bn-act, global average pool, linear.

    ``activation`` ('relu', the default, or 'silu') is used everywhere; it holds no weights, so it does
    not change the state_dict.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        self.act = activation_fn(activation)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, w, stride, dropout, activation))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = self.act(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet18(
    num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, activation: str = "relu"
) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, dropout, activation)


def small_preact_resnet(
    num_classes: int = 10,
    in_channels: int = 1,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    dropout: float = 0.0,
    activation: str = "relu",
) -> PreActResNet:
    """The quickstart net for 28x28 grayscale: one block per stage at widths 16/32/64 by default."""
    return PreActResNet(
        tuple([blocks_per_stage] * len(widths)), tuple(widths), num_classes, in_channels, dropout, activation
    )
