"""The one place that decides which implementation a tensor takes.

* CUDA tensor                          -> ``"triton"``: compiled Triton kernels.
* CPU tensor, ``TRITON_INTERPRET=1``   -> ``"interpreter"``: the same kernels,
  run by Triton's interpreter (slow; for tests on machines without a GPU).
* anything else                        -> ``"torch"``: the pure-PyTorch path.

``TRITON_INTERPRET`` is read once, when fastres is imported, because
``@triton.jit`` reads it when the kernels are decorated: changing it later
cannot turn already-built kernels into interpreted ones.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    _TRITON_ERROR = ""
except ImportError as exc:  # e.g. macOS or Windows wheels of torch without triton
    HAS_TRITON = False
    _TRITON_ERROR = str(exc)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The dtypes the kernels take; others (float64, complex, ...) take the PyTorch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FusionWarning(UserWarning):
    """A fused module runs PyTorch's ops instead of its kernels, and why (once per module and reason): a
    replaced or subclassed child, hooks, parametrisations, or a configuration the kernels do not take.
    ``warnings.filterwarnings("ignore", category=fastres.FusionWarning)`` silences it."""


class Backend(NamedTuple):
    """Which implementation a tensor takes (``name``) and why (``reason``)."""

    name: str
    reason: str


def backend_for(tensor: torch.Tensor) -> Backend:
    """Report the implementation fastres uses for ``tensor`` and why.

    >>> fastres.backend_for(torch.zeros(1))
    Backend(name='torch', reason='CPU tensor and TRITON_INTERPRET is not set: pure-PyTorch path')
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for: expected a torch.Tensor, got {type(tensor).__name__}")
    device = tensor.device.type
    if tensor.dtype not in KERNEL_DTYPES:
        return Backend("torch", f"{tensor.dtype} is not a kernel dtype (float16, bfloat16, float32): pure-PyTorch path")
    if device == "cuda":
        if not HAS_TRITON:
            return Backend("torch", f"CUDA tensor but triton is not importable ({_TRITON_ERROR}): pure-PyTorch path")
        if INTERPRET:
            return Backend("torch", "CUDA tensor but TRITON_INTERPRET=1 was set at import: pure-PyTorch path")
        return Backend("triton", "CUDA tensor: compiled Triton kernels")
    if device == "cpu":
        if INTERPRET and HAS_TRITON:
            return Backend("interpreter", "CPU tensor and TRITON_INTERPRET=1 at import: Triton kernels under the interpreter")
        if INTERPRET:
            return Backend("torch", f"TRITON_INTERPRET=1 but triton is not importable ({_TRITON_ERROR}): pure-PyTorch path")
        return Backend("torch", "CPU tensor and TRITON_INTERPRET is not set: pure-PyTorch path")
    return Backend("torch", f"{device} tensor: fastres has kernels for CUDA only: pure-PyTorch path")


def uses_kernels(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` takes the Triton kernels (compiled or interpreted): ``backend_for``'s
    decision without building its reason (this runs on every fused call)."""
    if tensor.dtype not in KERNEL_DTYPES or not HAS_TRITON:
        return False
    device = tensor.device.type
    return (device == "cuda" and not INTERPRET) or (device == "cpu" and INTERPRET)
