"""Fused modules: drop-in twins of :mod:`fastres.reference.nn`.

Same parameters, buffers and attribute names as the plain modules (they
subclass them), so state_dicts load either way; only ``forward`` differs.
Tensors that take no kernel (see :func:`fastres.backend_for`), and modules or
inputs the kernels would not give PyTorch's answer for (a replaced child,
hooks, parametrisations, configurations they do not take: see
:mod:`fastres.functional`), run the plain PyTorch forward: its answer, or its
error.
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
        children = self._modules
        return F._conv_bn_relu(x, children.get("conv"), children.get("bn"), children.get("relu"), self,
                               lambda: ref.ConvBNReLU.forward(self, x))


class ResidualBlock(ref.ResidualBlock):
    """The notes' residual block, fused: ``ResidualBlock(in, out, stride=1, downsample=None)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.residual_block(x, self)
