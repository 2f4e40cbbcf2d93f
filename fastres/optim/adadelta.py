from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import FusedOptimizer, Run, check_lr, check_nonnegative


class Adadelta(FusedOptimizer):
    """``torch.optim.Adadelta`` in one fused launch per bucket (torch has no fused Adadelta).

    Same arguments, defaults, state (``step``, ``square_avg``, ``acc_delta``)
    and numbers as torch.optim.Adadelta. ``foreach`` is accepted and ignored.
    """

    def __init__(
        self,
        params: Any,
        lr: Union[float, torch.Tensor] = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: Optional[bool] = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_nonnegative(eps, "epsilon value")
        check_nonnegative(weight_decay, "weight_decay value")
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], run: Run) -> None:
        square_avgs, acc_deltas, steps = [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["square_avg"] = self._zeros(p)
                state["acc_delta"] = self._zeros(p)
            steps.append(self._step_tensor(state, p))
            square_avgs.append(state["square_avg"])
            acc_deltas.append(state["acc_delta"])
        run(
            "adadelta", params, [p.grad for p in params], square_avgs, acc_deltas, steps,
            lr=group["lr"], rho=float(group["rho"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), maximize=group["maximize"],
        )
