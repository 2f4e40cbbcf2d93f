from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import Bucket, FusedOptimizer, Run, check_lr, check_nonnegative


class Adadelta(FusedOptimizer):
    """``torch.optim.Adadelta`` in one fused launch per bucket (torch has no fused Adadelta).

    Same arguments, defaults, state (``step``, ``square_avg``, ``acc_delta``)
    and numbers as torch.optim.Adadelta. ``foreach`` is accepted and chooses nothing.
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

    _rule = "adadelta"

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        state = self.state[p]
        self._step_tensor(state, p)
        for name in ("square_avg", "acc_delta"):
            if name not in state:
                state[name] = self._zeros(p)
        return False

    def _update(self, group: dict[str, Any], bucket: Bucket, grads: list[torch.Tensor], run: Run) -> None:
        run(
            bucket.params, grads, bucket.state["square_avg"], bucket.state["acc_delta"], bucket.state["step"],
            lr=group["lr"], rho=float(group["rho"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), maximize=group["maximize"],
        )
