from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch

from .._backend import uses_kernels
from ..launchers import core
from ..launchers import grad_norm as launchers


def clip_grad_norm_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` in two launches, without a host synchronisation.

    Clips the gradients of ``parameters`` in place so that their global
    ``norm_type``-norm is at most ``max_norm``, and returns the norm before
    clipping. The 2-norm and the inf-norm of grads that share one device and
    one kernel dtype take the fused kernels; anything else (other norms, mixed
    devices or dtypes, CPU without the interpreter) calls torch's function.
    ``foreach`` is accepted for drop-in use and ignored.

    ``error_if_nonfinite=True`` reads the norm on the host (a synchronisation),
    as torch does.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    fused = (
        len(grads) > 0
        and norm_type in (2.0, math.inf)
        and all(g.device == grads[0].device and g.dtype == grads[0].dtype for g in grads)
        and all(not g.is_sparse and g.is_contiguous() for g in grads)
        and uses_kernels(grads[0])
    )
    if not fused:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    with core.on_device_of(grads[0]):  # Triton launches on the current device
        total_norm = launchers.clip_grad_norm(grads, max_norm, inf_norm=norm_type == math.inf)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return total_norm.to(grads[0].dtype)
