"""fastres: Triton kernels that make residual-network training fast."""

from __future__ import annotations

from ._backend import Backend, backend_for

__version__ = "0.1.0"

__all__ = ["Backend", "backend_for", "__version__"]
