from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import Bucket, FusedOptimizer, Run


class SGD(FusedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov) in one fused launch per bucket.

    Same arguments, defaults, state (``momentum_buffer``) and numbers as
    torch.optim.SGD. ``foreach`` and ``fused`` are validated like torch's and
    choose nothing: one fused kernel on CUDA, torch's fused SGD on the torch path.
    """

    def __init__(
        self,
        params: Any,
        lr: Union[float, torch.Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Union[float, torch.Tensor] = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        # torch.optim.SGD's checks (``x < 0``: unlike the other optimizers it lets NaN through).
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults)

    _rule = "sgd"

    def _state_layout(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] != 0,)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        if group["momentum"] == 0:
            return False  # like torch: no state at all without momentum
        state = self.state[p]
        if state.get("momentum_buffer") is None:  # torch starts the buffer at the first gradient
            state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            return True
        return False

    def _update(self, group: dict[str, Any], bucket: Bucket, grads: list[torch.Tensor], run: Run) -> None:
        momentum = group["momentum"]
        run(
            bucket.params, grads, bucket.state["momentum_buffer"] if momentum != 0 else None, bucket.first_step,
            lr=group["lr"], momentum=float(momentum), dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"], maximize=group["maximize"],
        )
