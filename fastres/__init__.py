"""fastres: Triton kernels that make residual-network training fast."""

from __future__ import annotations

from . import functional, nn, optim, reference, testing
from ._backend import Backend, FusionWarning, backend_for
from .models import ResNet, convert, resnet18_cifar, resnet20, resnet32, resnet44, resnet56, resnet110

__version__ = "0.1.0"

__all__ = [
    "Backend", "FusionWarning", "backend_for", "functional", "nn", "optim", "reference", "testing", "__version__",
    "ResNet", "convert", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18_cifar",
]
