"""A zoo of CIFAR ResNets written the way public code writes them, in plain PyTorch.

What ``fastres.convert`` is tested on (``tests/test_convert.py``), what ``python -m fastres.testing.traffic
--zoo`` counts at full size, and what the example trains with ``--model resnet9`` / ``preact_resnet18``.

Each style is one that widely used CIFAR ResNet code follows; none uses fastres's classes. Widths are
parameters, so tests run them small under the interpreter and the traffic tool at full size:

* ``KuangliuResNet18``: BasicBlock with ``self.shortcut = nn.Sequential()`` (identity) or a 1x1 conv + BN
  projection; ``F.relu`` and ``out += self.shortcut(x)``; ``F.avg_pool2d(out, 4)``.
* ``OptionAResNet20``: He et al.'s CIFAR ResNet-20 with the option-A shortcut, a ``LambdaLayer`` that
  takes every other pixel and zero-pads the channels; ``nn.ReLU`` modules; ``out = out + shortcut``.
* ``TorchvisionStyleResNet``: torchvision's BasicBlock idiom: one ``nn.ReLU(inplace=True)`` module used
  twice, ``if self.downsample is not None: identity = self.downsample(x)``, ``out += identity``; a 1x1
  stride-2 projection.
* ``PreActResNet18``: pre-activation blocks (BN -> ReLU -> conv), ``torch.relu``, the residual sum
  feeding the next block's BN, the shortcut taken from the pre-activated input.
* ``ResNet9``: the DAWNBench ResNet-9 (conv-BN-ReLU, max-pool, ``x + res(x)`` with the residual added
  after the ReLU), ``.relu()`` methods, an ``AdaptiveMaxPool2d`` head.
* ``BottleneckResNet``: 1x1 -> 3x3 -> 1x1 bottlenecks with expansion 4 and a 1x1 projection.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


# ------------------------------------------------------------------ kuangliu/pytorch-cifar style


class KuangliuBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class KuangliuResNet18(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(KuangliuBlock(self.in_planes, width, 2 if i > 0 and j == 0 else 1))
                self.in_planes = width
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


# ------------------------------------------------------------------ akamaster/pytorch_resnet_cifar10 style


class LambdaLayer(nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class OptionABlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = (planes - in_planes) // 2
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class OptionAResNet20(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=(3, 3, 3), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(OptionABlock(in_planes, width, 2 if i > 0 and j == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


# ------------------------------------------------------------------ torchvision BasicBlock idiom


class TorchvisionBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TorchvisionStyleResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=(2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = widths[0]
        self.layer1 = self._make_layer(widths[0], blocks[0], 1)
        self.layer2 = self._make_layer(widths[1], blocks[1], 2)
        self.layer3 = self._make_layer(widths[2], blocks[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [TorchvisionBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TorchvisionBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# ------------------------------------------------------------------ pre-activation (kuangliu PreActResNet)


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet18(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        layers, in_planes = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(PreActBlock(in_planes, width, 2 if i > 0 and j == 0 else 1))
                in_planes = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ------------------------------------------------------------------ ResNet-9 (DAWNBench, myrtle.ai)


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res1 = conv_bn(channels, channels)
        self.res2 = conv_bn(channels, channels)

    def forward(self, x):
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), num_classes: int = 10) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.prep = conv_bn(3, w0)
        self.layer1 = nn.Sequential(conv_bn(w0, w1), nn.MaxPool2d(2), Residual(w1))
        self.layer2 = nn.Sequential(conv_bn(w1, w2), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(w2, w3), nn.MaxPool2d(2), Residual(w3))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(w3, num_classes, bias=False)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.prep(x))))
        out = self.pool(out).flatten(1)
        return self.linear(out).mul(0.125)


# ------------------------------------------------------------------ bottlenecks (expansion 4)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class BottleneckResNet(nn.Module):
    def __init__(self, widths=(16, 32), blocks=(1, 1), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(Bottleneck(in_planes, width, 2 if i > 0 and j == 0 else 1))
                in_planes = width * 4
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# Small widths for the interpreter; each entry builds a model whose every BatchNorm has random statistics.
SMALL = {
    "kuangliu_resnet18": lambda: KuangliuResNet18(widths=(4, 8), blocks=(2, 1)),  # two identity blocks in a row
    "option_a_resnet20": lambda: OptionAResNet20(widths=(4, 8, 16), blocks=(1, 1, 1)),
    "torchvision_style": lambda: TorchvisionStyleResNet(widths=(4, 8, 16), blocks=(1, 1, 1)),
    "preact_resnet18": lambda: PreActResNet18(widths=(4, 8), blocks=(1, 1)),
    "resnet9": lambda: ResNet9(widths=(4, 8, 8, 16)),
    "bottleneck": lambda: BottleneckResNet(widths=(4, 4), blocks=(1, 1)),
}

# Full widths (the traffic report at batch 512).
FULL = {
    "kuangliu_resnet18": lambda: KuangliuResNet18(),
    "preact_resnet18": lambda: PreActResNet18(),
    "resnet9": lambda: ResNet9(),
    "option_a_resnet20": lambda: OptionAResNet20(),
}
