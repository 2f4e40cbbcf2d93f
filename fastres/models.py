"""``fastres.ResNet``: the CIFAR-10 ResNet of the notes built from fused blocks.

A drop-in twin of :class:`fastres.reference.nn.ResNet`: same constructor,
same state_dict keys. :func:`convert` turns a plain model into a fused one in
place, keeping its weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import functional as F
from . import nn as fnn
from .reference import nn as ref

__all__ = ["ResNet", "convert", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18_cifar"]


class ResNet(ref.ResNet):
    """``ResNet(block, layers, num_classes=10)``; ``block`` is usually
    :class:`fastres.nn.ResidualBlock` (the fused stem runs either way)."""

    def __init__(self, block: type[nn.Module] = fnn.ResidualBlock, layers: Sequence[int] = (2, 2, 2),
                 num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), in_channels: int = 3) -> None:
        super().__init__(block, layers, num_classes, widths=widths, in_channels=in_channels)
        _name_fused(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        children = self._modules
        return F._conv_bn_relu(x, children.get("conv"), children.get("bn"), children.get("relu"), self,
                               lambda: ref.ResNet.stem(self, x))


_FUSED = {ref.ResNet: ResNet, ref.ResidualBlock: fnn.ResidualBlock, ref.ConvBNReLU: fnn.ConvBNReLU}


def convert(model: nn.Module) -> nn.Module:
    """Turn a plain model (instances of :mod:`fastres.reference.nn` classes) into
    the fused one in place, keeping parameters, buffers and hooks; returns it.

    Only the exact reference classes are converted (subclasses with their own
    ``forward`` are left alone, since fusing them could change what they do).
    A converted module runs its kernels only while its children are what they
    fuse (no hooks, parametrisations, replaced or subclassed children, ...);
    otherwise it runs the plain forward and says why once
    (:class:`fastres.FusionWarning`, naming the module as in ``model``).
    """
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused
    _name_fused(model)
    return model


def _name_fused(model: nn.Module) -> None:
    """Each fused module remembers its name in ``model``, for the FusionWarning that says it runs
    PyTorch's ops (a module's name is its parent's business: nothing else knows it)."""
    for name, module in model.named_modules():
        if name and isinstance(module, (fnn.ResidualBlock, fnn.ConvBNReLU)):
            module.__dict__["_fastres_name"] = name


def _factory(name: str):
    def make(num_classes: int = 10) -> ResNet:
        return ref.build(name, num_classes, resnet=ResNet, block=fnn.ResidualBlock)  # type: ignore[return-value]

    make.__name__ = make.__qualname__ = name
    layers, widths = ref.ARCHITECTURES[name]
    make.__doc__ = f"Fused {name}: stage widths {widths}, blocks {layers}."
    return make


resnet20 = _factory("resnet20")
resnet32 = _factory("resnet32")
resnet44 = _factory("resnet44")
resnet56 = _factory("resnet56")
resnet110 = _factory("resnet110")
resnet18_cifar = _factory("resnet18_cifar")
