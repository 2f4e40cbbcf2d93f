"""What the fused optimizers share: grouping, state checks, path choice, AMP.

A subclass gives its torch.optim name, builds ``defaults`` after validating
like torch does, and implements ``_update(group, params, run)`` for one
bucket: the params of one param group sharing a device and dtype, all with
a gradient. ``run(name, ...)`` calls the kernel launcher (one launch) or, where
:func:`fastres.backend_for` says ``"torch"``, torch.optim's fastest
implementation of the same update (:mod:`._torch_path`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from .._backend import uses_kernels
from ..launchers import core
from ..launchers import optim as launchers
from ..launchers.multi_tensor import TableCache
from . import _torch_path

Run = Callable[..., None]


class Bucket:
    """The params of one param group that share a device and dtype, with their state lists.

    The lists are built once per plan and passed to the launcher as the same
    list objects every step, which lets the table cache skip re-reading their
    addresses (state tensors are updated in place, never replaced).
    """

    def __init__(self, kernels: bool) -> None:
        self.uses_kernels = kernels
        self.params: list[torch.Tensor] = []
        self.state: dict[str, list[torch.Tensor]] = {}
        self.first_step: list[bool] = []
        self.tables = TableCache()

    def add(self, p: torch.Tensor, state: Optional[dict[str, Any]], first_step: bool) -> None:
        self.params.append(p)
        self.first_step.append(first_step)
        for name, value in (state or {}).items():
            self.state.setdefault(name, []).append(value)


@dataclass
class Plan:
    """How one param group steps while its params with grads and their state stay the same."""

    key: tuple
    params: list[torch.Tensor]
    states: list[Optional[dict[str, Any]]]
    buckets: list[Bucket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._entries = [(s, name, value) for s in self.states if s for name, value in s.items()]

    def is_current(self, state: dict) -> bool:
        """False once the optimizer state was reset, loaded, or had a tensor replaced: plan again."""
        return all(state.get(p) is s for p, s in zip(self.params, self.states)) and all(
            s.get(name) is value for s, name, value in self._entries
        )


def check_lr(lr: Any, foreach: Optional[bool] = None, capturable: bool = True) -> None:
    """torch.optim's lr checks; Adam's also refuses a tensor lr with foreach=True and capturable=False."""
    if isinstance(lr, torch.Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
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
        self._plans: dict[int, Plan] = {}
        super().__init__(params, defaults)
        # torch.optim's checks of fused=True, in its order (after the params').
        if defaults.get("fused"):
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__}: differentiable=True is not supported by fastres' fused kernels; "
                f"use torch.optim.{type(self).__name__} to differentiate through the step"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = {}

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()

    # ------------------------------------------------------------------ step

    # torch.compile(optimizer.step) runs the step as it is: it is one launch per bucket already, and
    # dynamo would trace into the planning and Triton's launcher (on CPU, its interpreter) and fail.
    @torch.compiler.disable
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
        amp = dict(grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        for group_index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            key = (tuple(map(id, params)), self._state_layout(group))
            plan = self._plans.get(group_index)
            if plan is None or plan.key != key or not plan.is_current(self.state):
                plan = self._plans[group_index] = self._make_plan(group_index, group, params, key)
            for bucket in plan.buckets:
                grads = [p.grad for p in bucket.params]
                if any(g.is_sparse or g.stride() != p.stride() for g, p in zip(grads, bucket.params)):
                    for g, p in zip(grads, bucket.params):
                        if g.is_sparse or g.stride() != p.stride():
                            self._check_grad(p, group_index)  # raises, or relays the grad out like p
                    grads = [p.grad for p in bucket.params]
                if bucket.uses_kernels:
                    run = functools.partial(getattr(launchers, self._rule), bucket.tables, **amp)
                else:
                    run = functools.partial(getattr(_torch_path, self._rule), **amp)
                with core.on_device_of(bucket.params[0]):  # Triton launches on the current device
                    self._update(group, bucket, grads, run)
                bucket.first_step = [False] * len(bucket.params)
        return loss

    # Each optimizer sets these.
    _rule: str  # name of its launcher, torch-path and reference function

    def _state_layout(self, group: dict[str, Any]) -> tuple:
        """The group settings that decide which state tensors exist."""
        return ()

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Create p's state if missing; return True when it is p's first step (SGD's buffer)."""
        raise NotImplementedError  # each optimizer defines its state

    def _update(self, group: dict[str, Any], bucket: "Bucket", grads: list[torch.Tensor], run: Run) -> None:
        raise NotImplementedError  # each optimizer defines its update

    def _make_plan(self, group_index: int, group: dict[str, Any], params: list[torch.Tensor], key: tuple) -> "Plan":
        buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
        states = []
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            self._check_param(p, index, group_index)
            first_step = self._init_state(p, group)
            states.append(self.state.get(p))
            bucket = buckets.get((p.device, p.dtype))
            if bucket is None:
                bucket = buckets[(p.device, p.dtype)] = Bucket(uses_kernels(p))
            bucket.add(p, self.state.get(p), first_step)
        return Plan(key, params, states, list(buckets.values()))

    def _check_param(self, p: torch.Tensor, index: int, group_index: int) -> None:
        name = type(self).__name__
        if not (p.is_contiguous() or _is_dense(p)):
            raise ValueError(
                f"{name}: param {index} of param group {group_index} is not dense (shape {tuple(p.shape)}, "
                f"strides {p.stride()}); fastres updates params as flat memory, so they must have no gaps"
            )
        self._check_grad(p, group_index, index)

    def _check_grad(self, p: torch.Tensor, group_index: int, index: Optional[int] = None) -> None:
        name = type(self).__name__
        if index is None:
            index = next(i for i, q in enumerate(self.param_groups[group_index]["params"]) if q is p)
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise RuntimeError(
                f"{name} does not support sparse gradients (param {index} of param group {group_index}); "
                "use torch.optim.SparseAdam or a dense gradient"
            )
        if grad.stride() != p.stride() and not _same_layout(grad, p):
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

        Made on the device by a fill (``torch.tensor(value, device=...)`` would copy from pageable host
        memory, which blocks the host until the stream reaches the copy). A state loaded from a
        non-fused torch.optim (a CPU step tensor, or a number) is read on the host, which costs no
        synchronisation, and filled in the same way; a step on another GPU is copied.
        """
        step = state.get("step")
        if not isinstance(step, torch.Tensor) or (step.device.type == "cpu" and p.device.type != "cpu"):
            value = 0.0 if step is None else float(step)
            step = torch.full((), value, dtype=torch.float32, device=p.device)
            state["step"] = step
        elif step.dtype != torch.float32 or step.device != p.device:
            step = step.to(device=p.device, dtype=torch.float32)
            state["step"] = step
        return step

    @staticmethod
    def _zeros(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
