"""What the fused optimizers share: grouping, state checks, path choice, AMP.

A subclass gives its torch.optim name, builds ``defaults`` after validating
like torch does, and implements ``_update(group, params, run)`` for one
bucket: the params of one param group sharing a device and dtype, all with
a gradient. ``run(name, ...)`` calls the kernel launcher (one launch) or the
pure-PyTorch reference of the same name, as :func:`fastres.backend_for`
decides.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from .._backend import uses_kernels
from ..launchers import optim as launchers
from ..launchers.multi_tensor import TableCache
from ..reference import optim as reference

Run = Callable[..., None]


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(value: Any, what: str) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {what}: {value}")


def _is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlap: the tensor's elements fill its numel() slots."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same element order in memory (strides of size-1 dims do not matter)."""
    return a.shape == b.shape and all(
        size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


class FusedOptimizer(Optimizer):
    """Base of fastres' optimizers: one kernel launch per bucket per step."""

    # torch.amp.GradScaler passes grad_scale/found_inf instead of unscaling
    # and syncing: the kernels unscale and skip the step on inf themselves.
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__}: differentiable=True is not supported by fastres' fused kernels; "
                f"use torch.optim.{type(self).__name__} to differentiate through the step"
            )
        self._table_caches: dict[tuple, TableCache] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._table_caches = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        for index, p in enumerate(self.param_groups[-1]["params"]):
            if not p.is_floating_point():
                self.param_groups.pop()
                raise ValueError(
                    f"{type(self).__name__}: param {index} of param group {group_index} has dtype {p.dtype}; "
                    "fastres optimizers update floating-point params only (float16, bfloat16, float32 in the "
                    "kernels, float64 on the PyTorch path), not complex or integer ones"
                )

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (one kernel launch per bucket).

        Args:
            closure: reevaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group_index, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(p, index, group_index)
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in buckets.items():
                run = self._runner((group_index, device, dtype), params[0], grad_scale, found_inf)
                self._update(group, params, run)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], run: Run) -> None:
        raise NotImplementedError  # each optimizer defines its update

    def _runner(
        self, key: tuple, probe: torch.Tensor, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]
    ) -> Run:
        amp = dict(grad_scale=grad_scale, found_inf=found_inf)
        if uses_kernels(probe):
            cache = self._table_caches.setdefault(key, TableCache())
            return lambda name, *args, **kw: getattr(launchers, name)(cache, *args, **kw, **amp)
        return lambda name, *args, **kw: getattr(reference, name)(*args, **kw, **amp)

    def _check_param(self, p: torch.Tensor, index: int, group_index: int) -> None:
        name = type(self).__name__
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise RuntimeError(
                f"{name} does not support sparse gradients (param {index} of param group {group_index}); "
                "use torch.optim.SparseAdam or a dense gradient"
            )
        if not _is_dense(p):
            raise ValueError(
                f"{name}: param {index} of param group {group_index} is not dense (shape {tuple(p.shape)}, "
                f"strides {p.stride()}); fastres updates params as flat memory, so they must have no gaps"
            )
        if not _same_layout(grad, p):
            warnings.warn(
                f"{name}: the grad of param {index} of param group {group_index} has strides {grad.stride()} "
                f"but the param has {p.stride()}; copying it into the param's layout each step",
                stacklevel=3,
            )
            p.grad = torch.empty_like(p).copy_(grad)

    # ----------------------------------------------------------------- state

    @staticmethod
    def _step_tensor(state: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        """The param's step: a float32 scalar on its device, as torch's fused optimizers keep it.

        A state loaded from a non-fused torch.optim (CPU step) is moved once.
        """
        step = state.get("step")
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(0.0 if step is None else float(step), dtype=torch.float32, device=p.device)
            state["step"] = step
        elif step.device != p.device or step.dtype != torch.float32:
            step = step.to(device=p.device, dtype=torch.float32)
            state["step"] = step
        return step

    @staticmethod
    def _zeros(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
