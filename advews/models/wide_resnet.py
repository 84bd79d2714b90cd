"""WideResNet (Zagoruyko & Komodakis 2016): WRN-28-10 and WRN-34-10 are the adversarial-training standards."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from advews.errors import AdvewsError
from advews.models.activation import activation_fn


class WideBlock(nn.Module):
    """Pre-activation wide block; the shortcut is a 1x1 conv when the shape changes. act: ReLU or SiLU."""

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


class WideResNet(nn.Module):
    """The TRADES / AWP WideResNet; ``activation`` 'relu' (default) or 'silu' changes no weight names."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        self.act = activation_fn(activation)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AdvewsError(f"wide_resnet depth must be 6n+4 with n >= 1 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(in_planes, w, stride, dropout, activation))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn_28_10(
    num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, activation: str = "relu"
) -> WideResNet:
    return WideResNet(28, 10, num_classes, in_channels, dropout, activation)


def wrn_34_10(
    num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, activation: str = "relu"
) -> WideResNet:
    return WideResNet(34, 10, num_classes, in_channels, dropout, activation)
