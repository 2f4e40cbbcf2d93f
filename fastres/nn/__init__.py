"""Fused modules: drop-in twins of :mod:`fastres.reference.nn`.

Same parameters, buffers and attribute names as the plain modules (they
subclass them), so state_dicts load either way; only ``forward`` differs.
Inputs are checked (clear errors), then tensors that take no kernel (see
:func:`fastres.backend_for`) run the plain PyTorch forward.
"""

from __future__ import annotations

import torch

from .. import functional as F
from ..reference import nn as ref

__all__ = ["ConvBNReLU", "ResidualBlock", "downsample", "conv3x3"]

conv3x3 = ref.conv3x3
downsample = ref.downsample


class ConvBNReLU(ref.ConvBNReLU):
    """``relu(bn(conv(x)))`` as one fused op (children ``conv`` and ``bn``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_bn_relu(x, self.conv, self.bn)


class ResidualBlock(ref.ResidualBlock):
    """The notes' residual block, fused: ``ResidualBlock(in, out, stride=1, downsample=None)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.residual_block(x, self)
