"""Pure-PyTorch references of everything fastres computes.

They are the oracle of the tests, the baseline of the benchmarks, and the
path tensors take when no kernel applies (see :func:`fastres.backend_for`).
"""

from . import nn, optim

__all__ = ["nn", "optim"]
