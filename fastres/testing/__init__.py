"""Helpers for tests of fastres and of code built on it.

:mod:`fastres.testing.traffic` models the memory traffic of launches and aten
ops (``python -m fastres.testing.traffic`` prints the ResNet-20 report).
:mod:`fastres.testing.no_gpu` takes launches through Triton's compile and
launch path on a machine without a GPU (compiled for one, recorded, not run).
:mod:`fastres.testing.zoo` holds CIFAR ResNets written the common plain-PyTorch
ways, the models ``fastres.convert`` is tested and counted on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..launchers.core import count_launches, observe_launches, stub_launches

# fastres.testing.traffic and .no_gpu are imported on demand: `python -m fastres.testing.traffic`
# must find it unimported.
__all__ = ["count_launches", "observe_launches", "saved_tensor_bytes", "stub_launches"]


def saved_tensor_bytes(fn: Callable[[], Any], keep: Callable[[torch.Tensor], bool] | None = None) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs.

    Each storage counts once, however many ops save it (a ReLU output that
    the next conv also saves is one activation). Parameters and other
    leaves that require grad are not counted: they are held anyway.
    ``keep`` narrows the count further (e.g. to batch-sized tensors).
    Returns the total; what ``fn`` returns is kept alive until then.
    """
    seen: dict[tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad) and (keep is None or keep(t)):
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(seen.values())
