"""Launchers of the multi-tensor optimizer kernels: one launch per bucket.

A bucket is the tensors of one param group that share a device and dtype.
Each launcher takes the bucket's lists (params, grads, state tensors, steps),
its hyperparameters and GradScaler's optional ``grad_scale``/``found_inf``
tensors, and makes exactly one kernel launch. Nothing here synchronises with
the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..kernels import optim as kernels
from .core import launch
from .multi_tensor import Tables, TableCache

# 1024 elements per block (8 per thread with 4 warps: two 16-byte accesses per
# tensor in fp32); 16 blocks per program so 100M parameters take ~6k programs.
BLOCK = 1024
CHUNK = 16 * BLOCK
NUM_WARPS = 4

Scalar = Union[float, torch.Tensor]
Tensors = Sequence[torch.Tensor]


def _log2_split(base: float) -> tuple[float, float]:
    """log2(base) as an fp32 (hi, lo) pair whose sum keeps ~48 bits."""
    if base == 0.0:
        return -math.inf, 0.0
    value = math.log2(base)
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, value - hi


def _lr_args(lr: Scalar, device: torch.device) -> tuple[float, Optional[torch.Tensor]]:
    if isinstance(lr, torch.Tensor):
        if lr.device == device:
            return 0.0, lr
        return float(lr), None  # a CPU scalar tensor for CUDA params: read on the host, no sync
    return float(lr), None


def _amp_args(
    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], device: torch.device
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
    return grad_scale, found_inf


@dataclass
class _Launch:
    """What every optimizer launch shares: tables, lr, AMP pointers and flags.

    Pointer arguments a variant does not read get a stand-in tensor, so each
    launcher passes the fields as they are.
    """

    tables: Tables
    lr: float
    lr_ptr: torch.Tensor
    grad_scale_ptr: torch.Tensor
    found_inf_ptr: torch.Tensor
    meta: dict


def _prepare(
    cache: TableCache,
    columns: Sequence[Sequence[Optional[torch.Tensor]]],
    steps: Optional[Tensors],
    first_step: Optional[Sequence[bool]],
    lr: Scalar,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    maximize: bool,
    weight_decay: float,
) -> _Launch:
    params = columns[0]
    device = params[0].device
    tables = cache.tables(columns, steps, first_step, CHUNK)
    lr_value, lr_tensor = _lr_args(lr, device)
    grad_scale, found_inf = _amp_args(grad_scale, found_inf, device)
    stand_in = params[0]
    return _Launch(
        tables=tables,
        lr=lr_value,
        lr_ptr=stand_in if lr_tensor is None else lr_tensor,
        grad_scale_ptr=stand_in if grad_scale is None else grad_scale,
        found_inf_ptr=stand_in if found_inf is None else found_inf,
        meta=dict(
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            ALIGNED=tables.aligned,
            LR_FROM_PTR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            MAXIMIZE=maximize,
            HAS_WEIGHT_DECAY=weight_decay != 0,
            num_warps=NUM_WARPS,
        ),
    )


def sgd(
    cache: TableCache,
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Optional[Tensors],
    first_step: Sequence[bool],
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    columns = [params, grads] + ([momentum_buffers] if momentum_buffers is not None else [])
    args = _prepare(
        cache, columns, None, first_step, lr, grad_scale, found_inf, maximize, weight_decay
    )
    launch(
        kernels._sgd_kernel,
        (args.tables.n_programs,),
        args.tables.tensor_table, args.tables.chunk_table, params[0], args.lr, args.lr_ptr,
        weight_decay, momentum, 1.0 - dampening,
        args.grad_scale_ptr, args.found_inf_ptr,
        HAS_MOMENTUM=momentum != 0,
        NESTEROV=nesterov,
        **args.meta,
    )


def adam(
    cache: TableCache,
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Tensors],
    steps: Tensors,
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    args = _prepare(
        cache, columns, steps, None, lr, grad_scale, found_inf, maximize, weight_decay
    )
    log2_beta1 = _log2_split(beta1)
    log2_beta2 = _log2_split(beta2)
    launch(
        kernels._adam_kernel,
        (args.tables.n_programs,),
        args.tables.tensor_table, args.tables.chunk_table, args.tables.counters, params[0], args.lr, args.lr_ptr,
        beta2, 1.0 - beta1, 1.0 - beta2, *log2_beta1, *log2_beta2, eps, weight_decay,
        args.grad_scale_ptr, args.found_inf_ptr,
        DECOUPLED=decoupled_weight_decay,
        AMSGRAD=amsgrad,
        **args.meta,
    )


def rmsprop(
    cache: TableCache,
    params: Tensors,
    grads: Tensors,
    square_avgs: Tensors,
    momentum_buffers: Optional[Tensors],
    grad_avgs: Optional[Tensors],
    steps: Tensors,
    *,
    lr: Scalar,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    columns = [params, grads, square_avgs, momentum_buffers or [None] * len(params), grad_avgs or [None] * len(params)]
    args = _prepare(
        cache, columns, steps, None, lr, grad_scale, found_inf, maximize, weight_decay
    )
    launch(
        kernels._rmsprop_kernel,
        (args.tables.n_programs,),
        args.tables.tensor_table, args.tables.chunk_table, args.tables.counters, params[0], args.lr, args.lr_ptr,
        alpha, 1.0 - alpha, eps, weight_decay, momentum,
        args.grad_scale_ptr, args.found_inf_ptr,
        CENTERED=centered,
        HAS_MOMENTUM=momentum > 0,
        **args.meta,
    )


def adagrad(
    cache: TableCache,
    params: Tensors,
    grads: Tensors,
    state_sums: Tensors,
    steps: Tensors,
    *,
    lr: Scalar,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    args = _prepare(
        cache, [params, grads, state_sums], steps, None, lr, grad_scale, found_inf, maximize, weight_decay
    )
    launch(
        kernels._adagrad_kernel,
        (args.tables.n_programs,),
        args.tables.tensor_table, args.tables.chunk_table, args.tables.counters, params[0], args.lr, args.lr_ptr,
        lr_decay, weight_decay, eps,
        args.grad_scale_ptr, args.found_inf_ptr,
        **args.meta,
    )


def adadelta(
    cache: TableCache,
    params: Tensors,
    grads: Tensors,
    square_avgs: Tensors,
    acc_deltas: Tensors,
    steps: Tensors,
    *,
    lr: Scalar,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    args = _prepare(
        cache, [params, grads, square_avgs, acc_deltas], steps, None, lr, grad_scale, found_inf, maximize, weight_decay
    )
    launch(
        kernels._adadelta_kernel,
        (args.tables.n_programs,),
        args.tables.tensor_table, args.tables.chunk_table, args.tables.counters, params[0], args.lr, args.lr_ptr,
        rho, 1.0 - rho, eps, weight_decay,
        args.grad_scale_ptr, args.found_inf_ptr,
        **args.meta,
    )
