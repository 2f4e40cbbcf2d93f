"""Functional forms of the fused conv + BatchNorm + ReLU ops (filled in by #4)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    return torch.relu(bn(conv(x)))


def residual_block(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    return type(block).__mro__[1].forward(block, x)
