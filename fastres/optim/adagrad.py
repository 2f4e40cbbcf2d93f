from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import Bucket, FusedOptimizer, Run, check_lr, check_nonnegative


class Adagrad(FusedOptimizer):
    """``torch.optim.Adagrad`` (lr_decay, initial_accumulator_value) in one fused launch per bucket.

    Like torch, the state (``step``, ``sum``) is created for every param at
    construction. ``foreach`` and ``fused`` are validated like torch's and choose nothing.
    """

    def __init__(
        self,
        params: Any,
        lr: Union[float, torch.Tensor] = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        check_lr(lr)
        check_nonnegative(lr_decay, "lr_decay value")
        check_nonnegative(weight_decay, "weight_decay value")
        check_nonnegative(initial_accumulator_value, "initial_accumulator_value value")
        check_nonnegative(eps, "epsilon value")
        defaults = dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults)
        # Like torch: every param's sum starts at the constructor's value, even
        # in a group that sets its own initial_accumulator_value.
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, initial_accumulator_value)

    _rule = "adagrad"

    def _init_state(self, p: torch.Tensor, group: Union[dict[str, Any], float]) -> bool:
        """``group``: the param's group (params added later) or the initial value itself."""
        state = self.state[p]
        self._step_tensor(state, p)
        if "sum" not in state:
            value = group["initial_accumulator_value"] if isinstance(group, dict) else group
            state["sum"] = torch.full_like(p, value, memory_format=torch.preserve_format)
        return False

    def _update(self, group: dict[str, Any], bucket: Bucket, grads: list[torch.Tensor], run: Run) -> None:
        run(
            bucket.params, grads, bucket.state["sum"], bucket.state["step"],
            lr=group["lr"], lr_decay=float(group["lr_decay"]), weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]), maximize=group["maximize"],
        )
