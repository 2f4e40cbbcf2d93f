"""Launcher of the two-launch global gradient-norm clipping."""

from __future__ import annotations

from typing import Sequence

import torch

from ..kernels import grad_norm as kernels
from .core import launch
from .multi_tensor import TableCache

BLOCK = 1024
# Larger chunks than the optimizers: every program of the second launch reads
# all partials, so fewer partials keep that re-reading small.
CHUNK = 64 * BLOCK
PARTIALS_BLOCK = 1024
NUM_WARPS = 4

_caches: dict[tuple[torch.device, torch.dtype], TableCache] = {}


def clip_grad_norm(grads: Sequence[torch.Tensor], max_norm: float, inf_norm: bool) -> torch.Tensor:
    """Scale ``grads`` (one device and dtype) in place to a global norm of at most ``max_norm``.

    Returns the total norm before clipping as an fp32 scalar on the grads' device.
    """
    device, dtype = grads[0].device, grads[0].dtype
    cache = _caches.setdefault((device, dtype), TableCache())
    tables = cache.tables([grads, grads], None, None, CHUNK)
    partials = torch.empty(tables.n_programs, dtype=torch.float32, device=device)
    total_norm = torch.empty((), dtype=torch.float32, device=device)
    meta = dict(BLOCK=BLOCK, CHUNK=CHUNK, ALIGNED=tables.aligned, INF_NORM=inf_norm, num_warps=NUM_WARPS)
    launch(kernels._grad_norm_partials_kernel, (tables.n_programs,),
           tables.tensor_table, tables.chunk_table, grads[0], partials, **meta)
    launch(kernels._grad_norm_scale_kernel, (tables.n_programs,),
           tables.tensor_table, tables.chunk_table, grads[0], partials, tables.n_programs, total_norm,
           float(max_norm), PARTIALS_BLOCK=PARTIALS_BLOCK, **meta)
    return total_norm
