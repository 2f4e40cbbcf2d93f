from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import FusedOptimizer, Run, check_lr, check_nonnegative


class RMSprop(FusedOptimizer):
    """``torch.optim.RMSprop`` (centered, momentum) in one fused launch per bucket.

    torch has no fused RMSprop; this one matches torch.optim.RMSprop's
    arguments, defaults, state (``step``, ``square_avg``, ``momentum_buffer``,
    ``grad_avg``) and numbers. ``foreach`` is accepted and ignored.
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

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], run: Run) -> None:
        momentum, centered = group["momentum"], group["centered"]
        square_avgs, momentum_buffers, grad_avgs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["square_avg"] = self._zeros(p)
                if momentum > 0:
                    state["momentum_buffer"] = self._zeros(p)
                if centered:
                    state["grad_avg"] = self._zeros(p)
            steps.append(self._step_tensor(state, p))
            square_avgs.append(state["square_avg"])
            if momentum > 0:
                momentum_buffers.append(state["momentum_buffer"])
            if centered:
                grad_avgs.append(state["grad_avg"])
        run(
            "rmsprop", params, [p.grad for p in params], square_avgs,
            momentum_buffers if momentum > 0 else None, grad_avgs if centered else None, steps,
            lr=group["lr"], alpha=float(group["alpha"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), momentum=float(momentum), centered=centered,
            maximize=group["maximize"],
        )
