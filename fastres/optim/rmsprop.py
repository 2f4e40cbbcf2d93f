from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import Bucket, FusedOptimizer, Run, check_lr, check_nonnegative


class RMSprop(FusedOptimizer):
    """``torch.optim.RMSprop`` (centered, momentum) in one fused launch per bucket.

    torch has no fused RMSprop; this one matches torch.optim.RMSprop's
    arguments, defaults, state (``step``, ``square_avg``, ``momentum_buffer``,
    ``grad_avg``) and numbers. ``foreach`` is accepted and chooses nothing.
    """

    def __init__(
        self,
        params: Any,
        lr: Union[float, torch.Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonnegative(eps, "epsilon value")
        check_nonnegative(momentum, "momentum value")
        check_nonnegative(weight_decay, "weight_decay value")
        check_nonnegative(alpha, "alpha value")
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )
        super().__init__(params, defaults)

    _rule = "rmsprop"

    def _state_layout(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] > 0, group["centered"])

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        state = self.state[p]
        self._step_tensor(state, p)
        names = ("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
        for name in names + (("grad_avg",) if group["centered"] else ()):
            if name not in state:
                state[name] = self._zeros(p)
        return False

    def _update(self, group: dict[str, Any], bucket: Bucket, grads: list[torch.Tensor], run: Run) -> None:
        momentum, centered = group["momentum"], group["centered"]
        run(
            bucket.params, grads, bucket.state["square_avg"],
            bucket.state["momentum_buffer"] if momentum > 0 else None,
            bucket.state["grad_avg"] if centered else None, bucket.state["step"],
            lr=group["lr"], alpha=float(group["alpha"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), momentum=float(momentum), centered=centered,
            maximize=group["maximize"],
        )
