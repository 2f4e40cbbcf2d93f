"""Pure-PyTorch optimizer updates: the spec of the kernels and the tests' oracle for them.

(The runtime path for tensors the kernels do not take is torch.optim's own
implementations: fastres/optim/_torch_path.py.)

Same signatures as :mod:`fastres.launchers.optim` without the table cache.
Each function follows torch.optim's single-tensor formulas, with the math in
fp32 for fp16/bf16/fp32 params (fp64 for fp64 params) and results stored in
the param's dtype, exactly what the kernels do. Steps are float32 scalars that
are incremented here, as in the kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Scalar = Union[float, torch.Tensor]
Tensors = Sequence[torch.Tensor]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _skip(found_inf: Optional[torch.Tensor]) -> bool:
    # Reads the device flag on the host: a synchronisation on CUDA, which only
    # the pure-PyTorch path (float64 params, or no triton) pays.
    return found_inf is not None and bool(found_inf.item() != 0)


def _grad(grad: torch.Tensor, grad_scale: Optional[torch.Tensor], maximize: bool, dtype: torch.dtype) -> torch.Tensor:
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=dtype)
    return -g if maximize else g


def _lr(lr: Scalar) -> float:
    return float(lr)


def sgd(
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Optional[Tensors],
    first_step: Sequence[bool],
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    if _skip(found_inf):
        return
    lr = _lr(lr)
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        param = p.to(dtype)
        g = _grad(grads[i], grad_scale, maximize, dtype)
        if weight_decay != 0:
            g = g + weight_decay * param
        if momentum != 0:
            assert momentum_buffers is not None
            buf = momentum_buffers[i]
            if first_step[i]:
                new_buf = g
            else:
                new_buf = buf.to(dtype) * momentum + (1 - dampening) * g
            buf.copy_(new_buf)
            g = g + momentum * new_buf if nesterov else new_buf
        p.copy_(param - lr * g)


def adam(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Tensors],
    steps: Tensors,
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    if _skip(found_inf):
        return
    lr = _lr(lr)
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        steps[i].add_(1)
        step = float(steps[i])
        param = p.to(dtype)
        g = _grad(grads[i], grad_scale, maximize, dtype)
        if weight_decay != 0:
            if decoupled_weight_decay:
                param = param * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * param
        exp_avg = torch.lerp(exp_avgs[i].to(dtype), g, 1 - beta1)
        exp_avg_sq = exp_avg_sqs[i].to(dtype) * beta2 + (1 - beta2) * g * g
        exp_avgs[i].copy_(exp_avg)
        exp_avg_sqs[i].copy_(exp_avg_sq)
        if amsgrad:
            assert max_exp_avg_sqs is not None
            exp_avg_sq = torch.maximum(max_exp_avg_sqs[i].to(dtype), exp_avg_sq)
            max_exp_avg_sqs[i].copy_(exp_avg_sq)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
        p.copy_(param - step_size * (exp_avg / denom))


def rmsprop(
    params: Tensors,
    grads: Tensors,
    square_avgs: Tensors,
    momentum_buffers: Optional[Tensors],
    grad_avgs: Optional[Tensors],
    steps: Tensors,
    *,
    lr: Scalar,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    if _skip(found_inf):
        return
    lr = _lr(lr)
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        steps[i].add_(1)
        param = p.to(dtype)
        g = _grad(grads[i], grad_scale, maximize, dtype)
        if weight_decay != 0:
            g = g + weight_decay * param
        square_avg = square_avgs[i].to(dtype) * alpha + (1 - alpha) * g * g
        square_avgs[i].copy_(square_avg)
        if centered:
            assert grad_avgs is not None
            grad_avg = torch.lerp(grad_avgs[i].to(dtype), g, 1 - alpha)
            grad_avgs[i].copy_(grad_avg)
            avg = (square_avg - grad_avg * grad_avg).sqrt() + eps
        else:
            avg = square_avg.sqrt() + eps
        if momentum > 0:
            assert momentum_buffers is not None
            buf = momentum_buffers[i].to(dtype) * momentum + g / avg
            momentum_buffers[i].copy_(buf)
            p.copy_(param - lr * buf)
        else:
            p.copy_(param - lr * (g / avg))


def adagrad(
    params: Tensors,
    grads: Tensors,
    state_sums: Tensors,
    steps: Tensors,
    *,
    lr: Scalar,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    if _skip(found_inf):
        return
    lr = _lr(lr)
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        steps[i].add_(1)
        step = float(steps[i])
        param = p.to(dtype)
        g = _grad(grads[i], grad_scale, maximize, dtype)
        if weight_decay != 0:
            g = g + weight_decay * param
        clr = lr / (1 + (step - 1) * lr_decay)
        state_sum = state_sums[i].to(dtype) + g * g
        state_sums[i].copy_(state_sum)
        p.copy_(param - clr * (g / (state_sum.sqrt() + eps)))


def adadelta(
    params: Tensors,
    grads: Tensors,
    square_avgs: Tensors,
    acc_deltas: Tensors,
    steps: Tensors,
    *,
    lr: Scalar,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    if _skip(found_inf):
        return
    lr = _lr(lr)
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        steps[i].add_(1)
        param = p.to(dtype)
        g = _grad(grads[i], grad_scale, maximize, dtype)
        if weight_decay != 0:
            g = g + weight_decay * param
        square_avg = square_avgs[i].to(dtype) * rho + (1 - rho) * g * g
        acc_delta = acc_deltas[i].to(dtype)
        std = (square_avg + eps).sqrt()
        delta = (acc_delta + eps).sqrt() / std * g
        acc_delta = acc_delta * rho + (1 - rho) * delta * delta
        square_avgs[i].copy_(square_avg)
        acc_deltas[i].copy_(acc_delta)
        p.copy_(param - lr * delta)
