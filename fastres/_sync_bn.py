"""Synchronised BatchNorm inside the fused ops: ``nn.SyncBatchNorm``'s collectives
on the kernels' packed per-channel rows.

The kernels compute each BatchNorm's statistics over the local batch (no running
statistics update) and, in backward, the local sums ``sum(g)`` and
``sum(g * x_hat)`` (the BN's bias and weight gradients, which stay local, as
``nn.SyncBatchNorm`` returns them). Between launches these functions combine
them across the process group, as ``nn.SyncBatchNorm`` does:

* forward: one ``all_gather`` of (mean, invstd, count) per BN, combined by
  Chan's formula in float64 (as ``batch_norm_gather_stats_with_counts``, which
  has no CPU kernel), running statistics updated from it, repacked as the kernels' ``[4, C]`` rows (scale, shift, mean, invstd);
* backward: one ``all_reduce`` of (sum(g), sum(g * x_hat), count) per BN,
  repacked as the ``[3, C]`` coefficients (coef_g, coef_c, coef_y) with
  ``dy = g * coef_g + y * coef_y + coef_c``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from .launchers import conv as L


def group_named(name: Optional[str]):
    """The process group a fused op was given by name (an operator schema cannot hold a group); None
    for an op whose BatchNorms do not synchronise."""
    return distributed_c10d._resolve_process_group(name) if name else None


def sync_stats(y: torch.Tensor, local: torch.Tensor, bn: L.BatchNormArgs, group) -> torch.Tensor:
    """Global packed statistics from this rank's (``local``, of ``y``); updates ``bn``'s running statistics."""
    C = y.shape[1]
    count = torch.full((1,), y.numel() // C, dtype=torch.float32, device=y.device)
    combined = torch.cat([local[2], local[3], count])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(combined) for _ in range(world)]
    dist.all_gather(gathered, combined, group)
    mean_all, invstd_all, count_all = torch.stack(gathered).split(C, dim=1)
    # Chan's combination of the ranks' (count, mean, biased variance), in float64 (C values each).
    n_i, mean_i = count_all.double(), mean_all.double()
    var_i = invstd_all.double().pow(-2) - bn.eps
    n = n_i.sum(0)
    mean64 = (n_i * mean_i).sum(0) / n
    var64 = (n_i * (var_i + (mean_i - mean64) ** 2)).sum(0) / n
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        # momentum=None: a cumulative average, its factor a device tensor (no host sync per step).
        factor = (1.0 / bn.num_batches_tracked).to(bn.running_mean.dtype) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean64.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var64 * n / (n - 1)).to(bn.running_var.dtype), factor)
    mean, invstd = mean64.float(), (var64 + bn.eps).rsqrt().float()
    scale = bn.weight.float() * invstd
    return torch.stack([scale, bn.bias.float() - mean * scale, mean, invstd])


def sync_coefs(coefs: L.BackwardCoefs, stats: torch.Tensor, bn_weight: torch.Tensor, y: torch.Tensor,
               group) -> L.BackwardCoefs:
    """``coefs`` with its packed rows rebuilt from the sums over every rank (parameter gradients stay local)."""
    count = torch.full((1,), y.numel() // y.shape[1], dtype=torch.float32, device=y.device)
    combined = torch.cat([coefs.dbias, coefs.dweight, count])
    dist.all_reduce(combined, dist.ReduceOp.SUM, group)
    sum_g, sum_g_xhat, total = combined[:-1].view(2, -1).unbind(0) + (combined[-1],)
    mean, invstd = stats[2], stats[3]
    coef_g = bn_weight.float() * invstd
    coef_y = -coef_g * invstd * sum_g_xhat / total
    coef_c = -coef_g * sum_g / total - coef_y * mean
    return coefs._replace(packed=torch.stack([coef_g, coef_c, coef_y]))


def local_args(bn: L.BatchNormArgs, group) -> L.BatchNormArgs:
    """What the kernels get of a synchronised BN: no running statistics (updated after the gather)."""
    if group is None:
        return bn
    return bn._replace(running_mean=None, running_var=None, num_batches_tracked=None)


def maybe_sync_stats(y, local, bn: L.BatchNormArgs, group) -> torch.Tensor:
    return local if group is None else sync_stats(y, local, bn, group)


def maybe_sync_coefs(coefs, stats, bn_weight, y, group: Optional[object]):
    return coefs if group is None else sync_coefs(coefs, stats, bn_weight, y, group)
