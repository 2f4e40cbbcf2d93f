"""fastres: Triton kernels that make residual-network training fast."""

from __future__ import annotations

from . import optim, reference, testing
from ._backend import Backend, backend_for

__version__ = "0.1.0"

__all__ = ["Backend", "backend_for", "optim", "reference", "testing", "__version__"]
