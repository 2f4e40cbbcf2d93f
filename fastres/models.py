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


def convert(model: nn.Module, report: bool = False) -> nn.Module:
    """Fuse ``model``'s conv -> BatchNorm -> ReLU chains and residual blocks; returns the fused model, with
    the same parameters, buffers and ``state_dict`` keys.

    Two steps, one entry point:

    * Instances of the exact :mod:`fastres.reference.nn` classes become their fused twins in place
      (subclasses with their own ``forward`` are left alone, since fusing them could change what they do).
    * If convs and BatchNorms remain outside fastres's fused modules (a ResNet written in plain PyTorch,
      whatever its style), the model is traced with ``torch.fx`` and the patterns are fused on the graph
      (:mod:`fastres._graph`): the result is a ``torch.fx.GraphModule`` that shares ``model``'s modules
      (as ``torch.fx`` does: train/eval, ``.to()`` and optimizers work on either). A model that cannot be
      traced comes back as it is.

    ``report=True`` prints, for every conv and BatchNorm, which fused op took it or why none did; the rows
    are also in the result's ``fastres_report`` attribute. A fused module or call runs its kernels only
    while its modules are what it fuses (no hooks, parametrisations, replaced or subclassed children, ...);
    otherwise it runs the PyTorch ops and says why once (:class:`fastres.FusionWarning`).
    """
    from . import _graph

    if getattr(model, "_fastres_converted", False):
        rows = model.__dict__.get("fastres_report", [])
    else:
        for module in model.modules():
            fused = _FUSED.get(type(module))
            if fused is not None:
                module.__class__ = fused
        _name_fused(model)
        rows = _fused_rows(model)
        if any(row.op is None for row in rows):
            model, rows = _graph.convert_graph(model)
            model.__dict__["_fastres_converted"] = True
    model.__dict__["fastres_report"] = rows
    if report:
        print(render_report(rows))
    return model


def render_report(rows: list) -> str:
    """The report ``convert(..., report=True)`` prints: one line per conv and BatchNorm."""
    fused = sum(row.op is not None for row in rows)
    lines = [f"fastres.convert: {fused} of {len(rows)} convs and BatchNorms fused"]
    lines += [str(row) for row in rows]
    return "\n".join(lines)


def _fused_rows(model: nn.Module) -> list:
    """Report rows of the convs and BatchNorms inside fastres's fused modules (taken: the module's name)
    and of the others (not yet: ``op`` None)."""
    from ._graph import Row

    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (fnn.ResidualBlock, fnn.ConvBNReLU, ResNet)):
            kind = f"fastres.{'nn.' if not isinstance(module, ResNet) else ''}{type(module).__name__}"
            for child in module.children() if isinstance(module, ResNet) else module.modules():
                if isinstance(child, (nn.Conv2d, nn.BatchNorm2d)):
                    owners.setdefault(id(child), f"{kind} {name!r}" if name else kind)
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)):
            rows.append(Row(name, type(module).__name__, owners.get(id(module))))
    return rows


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
