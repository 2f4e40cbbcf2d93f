from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import Bucket, FusedOptimizer, Run, check_lr, check_nonnegative


def _to_scalar(value: Any) -> Any:
    """A 1-element tensor hyperparameter as a 0-d tensor, other values as they are (torch.optim's rule)."""
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` (amsgrad, maximize, decoupled weight decay) in one fused launch per bucket.

    Same arguments, defaults, state (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) and numbers as torch.optim.Adam. The step count lives
    on the param's device (as in torch's fused mode), so ``step()`` never
    synchronises; ``lr`` may be a tensor on that device (CUDA graphs).
    ``foreach`` and ``fused`` are validated like torch's and choose nothing:
    kernels where :func:`fastres.backend_for` allows, else torch.optim's fused
    Adam/AdamW (``fastres.optim._torch_path``).
    """

    def __init__(
        self,
        params: Any,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        # torch.optim.Adam's checks, in its order and with its messages.
        check_lr(lr, foreach, capturable)
        check_nonnegative(eps, "epsilon value")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        check_nonnegative(weight_decay, "weight_decay value")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True"
                    )
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
        defaults = dict(
            lr=lr, betas=tuple(map(_to_scalar, betas)), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    _rule = "adam"

    def _state_layout(self, group: dict[str, Any]) -> tuple:
        return (group["amsgrad"],)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        state = self.state[p]
        self._step_tensor(state, p)
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if name not in state:
                state[name] = self._zeros(p)
        return False

    def _read_betas(self, group: dict[str, Any]) -> tuple[float, float]:
        """The group's betas as floats: read every step, except tensors on a device.

        Reading a device tensor synchronises, so those are read once per betas
        tuple (a new tuple, e.g. from load_state_dict, is read again).
        """
        betas = group["betas"]
        if not any(isinstance(b, torch.Tensor) and b.device.type != "cpu" for b in betas):
            return float(betas[0]), float(betas[1])
        cache = self.__dict__.setdefault("_device_betas", {})
        read = cache.get(id(group))
        if read is None or read[0] is not betas:
            read = cache[id(group)] = (betas, (float(betas[0]), float(betas[1])))
        return read[1]

    def _update(self, group: dict[str, Any], bucket: Bucket, grads: list[torch.Tensor], run: Run) -> None:
        beta1, beta2 = self._read_betas(group)
        amsgrad = group["amsgrad"]
        run(
            bucket.params, grads, bucket.state["exp_avg"], bucket.state["exp_avg_sq"],
            bucket.state["max_exp_avg_sq"] if amsgrad else None, bucket.state["step"],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=amsgrad, maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2), fused."""

    def __init__(
        self,
        params: Any,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
            maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True,
        )
