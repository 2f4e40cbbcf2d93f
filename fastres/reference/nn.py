"""The plain-PyTorch CIFAR-10 ResNet of the course notes (see SEEDS.md).

These modules are the oracle the fused ones are tested against, the baseline
of the benchmarks and the ``--impl torch`` side of the training example. The
fused twins in :mod:`fastres.nn` and :mod:`fastres.models` subclass them and
keep exactly these attributes, so state_dicts load either way and
:func:`fastres.convert` can swap a model's classes in place.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """``Conv2d(kernel_size=3, padding=1, bias=False)``, as in the notes."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class ConvBNReLU(nn.Module):
    """``conv -> BatchNorm2d -> ReLU`` with children ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels, stride)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The notes' residual projection: ``conv3x3(stride) -> BatchNorm2d``."""
    return nn.Sequential(conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ResidualBlock(nn.Module):
    """``conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN``, ``+ residual``, ReLU.

    ``downsample`` maps the input to the residual when the stride or channel
    count changes (``None`` means identity, which needs ``stride == 1`` and
    ``in_channels == out_channels``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        if downsample is None and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"ResidualBlock: an identity residual needs stride 1 and in_channels == out_channels, got "
                f"in_channels={in_channels}, out_channels={out_channels}, stride={stride}; pass "
                f"downsample=fastres.reference.nn.downsample({in_channels}, {out_channels}, {stride})"
            )
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """The CIFAR-10 ResNet of the notes: ``ResNet(ResidualBlock, [2, 2, 2])``.

    ``widths`` are the channels of the stages (the notes: 16, 32, 64; the
    ResNet-18-CIFAR variant: 64, 128, 256, 512); every stage after the first
    starts with a stride-2 block. Global average pooling equals the notes'
    ``AvgPool2d(8)`` at 32x32 inputs (``avg_pool2d(4)`` for the wide variant)
    and accepts any input size. He initialisation as the notes teach.
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int], num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), in_channels: int = 3) -> None:
        super().__init__()
        if len(layers) != len(widths) or any(int(n) < 1 for n in layers):
            raise ValueError(f"ResNet: layers must give one block count >= 1 per stage width {tuple(widths)}, got {list(layers)}")
        self.in_channels = widths[0]
        self.conv = conv3x3(in_channels, widths[0])
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self.make_layer(block, width, int(blocks), 1 if i == 0 else 2))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_stages = len(widths)
        init_he_(self)

    def make_layer(self, block: type[nn.Module], out_channels: int, blocks: int, stride: int = 1) -> nn.Sequential:
        projection = None
        if stride != 1 or self.in_channels != out_channels:
            projection = downsample(self.in_channels, out_channels, stride)
        layers = [block(self.in_channels, out_channels, stride, projection)]
        self.in_channels = out_channels
        layers += [block(out_channels, out_channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = self.avg_pool(out).flatten(1)
        return self.fc(out)


def init_he_(model: nn.Module) -> None:
    """He initialisation (the notes): conv and linear weights ~ N(0, 2 / n_in),
    biases 0; BatchNorm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# He et al.'s CIFAR depths 6n + 2 ([n, n, n] blocks) and the notes' wide variant.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet20": ((3, 3, 3), (16, 32, 64)),
    "resnet32": ((5, 5, 5), (16, 32, 64)),
    "resnet44": ((7, 7, 7), (16, 32, 64)),
    "resnet56": ((9, 9, 9), (16, 32, 64)),
    "resnet110": ((18, 18, 18), (16, 32, 64)),
    "resnet18_cifar": ((2, 2, 2, 2), (64, 128, 256, 512)),
}


def build(name: str, num_classes: int = 10, resnet: type[ResNet] = ResNet, block: type[nn.Module] = ResidualBlock) -> ResNet:
    """``build("resnet20")``: one of :data:`ARCHITECTURES` made of ``resnet`` and ``block``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    layers, widths = ARCHITECTURES[name]
    return resnet(block, layers, num_classes, widths=widths)


def resnet20(num_classes: int = 10) -> ResNet:
    return build("resnet20", num_classes)


def resnet32(num_classes: int = 10) -> ResNet:
    return build("resnet32", num_classes)


def resnet44(num_classes: int = 10) -> ResNet:
    return build("resnet44", num_classes)


def resnet56(num_classes: int = 10) -> ResNet:
    return build("resnet56", num_classes)


def resnet110(num_classes: int = 10) -> ResNet:
    return build("resnet110", num_classes)


def resnet18_cifar(num_classes: int = 10) -> ResNet:
    """The notes' wide variant: 64/128/256/512 channels, ``[2, 2, 2, 2]`` blocks."""
    return build("resnet18_cifar", num_classes)
