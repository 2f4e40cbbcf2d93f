"""Multi-tensor optimizer kernels: one launch updates every tensor of a bucket.

A program updates one chunk of one tensor (see ``multi_tensor.py`` for the
tables). Math is fp32 whatever the param dtype; params and state are stored in
the param's dtype. Each update follows torch.optim's single-tensor formulas
(same operation order, ``lerp``'s two-sided formula, IEEE-rounded ``sqrt``
and division), so fp32 results agree with torch.optim to rounding.

Scalar arguments that derive from Python floats only (``1 - beta``,
``log2(beta)``) are computed by the host in float64 as torch does; those that
depend on ``lr`` (which may live in a device tensor for CUDA graphs) are
computed here, per program, in float64.

Bytes moved per element (fp32): SGD 12 (momentum 20), Adam/AdamW 28 (amsgrad
36), RMSprop 20 (+8 momentum, +8 centered), Adagrad 20, Adadelta 28.
"""

import triton
import triton.language as tl

from .multi_tensor import (
    FIRST_STEP,
    PARAM,
    STATE0,
    STATE1,
    STATE2,
    advance_step,
    chunk_of_program,
    lerp,
    load_grad,
    power_of,
    tensor_ptr,
    to_storage,
    update_skipped,
)


@triton.jit
def _load_lr(lr, lr_ptr, LR_FROM_PTR: tl.constexpr):
    if LR_FROM_PTR:
        return tl.load(lr_ptr).to(tl.float64)
    else:
        return tl.cast(lr, tl.float64)


# --------------------------------------------------------------------------- SGD


@triton.jit
def _sgd_block(row_ptr, offsets, mask, grad_scale, lr, weight_decay, momentum, one_minus_dampening, first_step,
               HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, element_ty: tl.constexpr, ALIGNED: tl.constexpr):
    param_ptr = tensor_ptr(row_ptr, PARAM, element_ty, ALIGNED) + offsets
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = load_grad(row_ptr, offsets, mask, grad_scale, element_ty, ALIGNED, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    if HAS_MOMENTUM:
        buf_ptr = tensor_ptr(row_ptr, STATE0, element_ty, ALIGNED) + offsets
        if first_step:  # torch: buf = grad.clone() on the first step, no dampening
            buf = grad
        else:
            buf = tl.load(buf_ptr, mask=mask).to(tl.float32) * momentum + one_minus_dampening * grad
        tl.store(buf_ptr, to_storage(buf, element_ty), mask=mask)
        if NESTEROV:
            grad = grad + momentum * buf
        else:
            grad = buf
    tl.store(param_ptr, to_storage(param - lr * grad, element_ty), mask=mask)


@triton.jit
def _sgd_kernel(tensor_table_ptr, chunk_table_ptr, param_ref_ptr, lr, lr_ptr, weight_decay, momentum,
                one_minus_dampening, grad_scale_ptr, found_inf_ptr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    if update_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    lr32 = _load_lr(lr, lr_ptr, LR_FROM_PTR).to(tl.float32)
    first_step = tl.load(row_ptr + FIRST_STEP) != 0
    offsets = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        _sgd_block(row_ptr, block_start + offsets, None, grad_scale, lr32, weight_decay, momentum,
                   one_minus_dampening, first_step, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_MOMENTUM,
                   NESTEROV, element_ty, ALIGNED)
    if full_end < end:
        _sgd_block(row_ptr, full_end + offsets, full_end + offsets < end, grad_scale, lr32, weight_decay,
                   momentum, one_minus_dampening, first_step, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY,
                   HAS_MOMENTUM, NESTEROV, element_ty, ALIGNED)


# -------------------------------------------------------------------------- Adam


@triton.jit
def _adam_block(row_ptr, offsets, mask, grad_scale, step_size, bias_correction2_sqrt, decay_factor, weight_decay,
                beta2, one_minus_beta1, one_minus_beta2, eps,
                HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, element_ty: tl.constexpr, ALIGNED: tl.constexpr):
    param_ptr = tensor_ptr(row_ptr, PARAM, element_ty, ALIGNED) + offsets
    exp_avg_ptr = tensor_ptr(row_ptr, STATE0, element_ty, ALIGNED) + offsets
    exp_avg_sq_ptr = tensor_ptr(row_ptr, STATE1, element_ty, ALIGNED) + offsets
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = load_grad(row_ptr, offsets, mask, grad_scale, element_ty, ALIGNED, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param = param * decay_factor
        else:
            grad = grad + weight_decay * param
    exp_avg = lerp(tl.load(exp_avg_ptr, mask=mask).to(tl.float32), grad, one_minus_beta1)
    exp_avg_sq = tl.load(exp_avg_sq_ptr, mask=mask).to(tl.float32) * beta2 + one_minus_beta2 * grad * grad
    tl.store(exp_avg_ptr, to_storage(exp_avg, element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr, to_storage(exp_avg_sq, element_ty), mask=mask)
    if AMSGRAD:
        max_ptr = tensor_ptr(row_ptr, STATE2, element_ty, ALIGNED) + offsets
        second_moment = tl.maximum(tl.load(max_ptr, mask=mask).to(tl.float32), exp_avg_sq,
                                   propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
        tl.store(max_ptr, to_storage(second_moment, element_ty), mask=mask)
    else:
        second_moment = exp_avg_sq
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    param = param - step_size * tl.div_rn(exp_avg, denom)
    tl.store(param_ptr, to_storage(param, element_ty), mask=mask)


@triton.jit
def _adam_kernel(tensor_table_ptr, chunk_table_ptr, counter_ptr, param_ref_ptr, lr, lr_ptr, beta2,
                 one_minus_beta1, one_minus_beta2, log2_beta1_hi, log2_beta1_lo, log2_beta2_hi, log2_beta2_lo,
                 eps, weight_decay, grad_scale_ptr, found_inf_ptr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                 DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    if update_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    step = advance_step(row_ptr, counter_ptr, tensor, n_chunks)
    lr64 = _load_lr(lr, lr_ptr, LR_FROM_PTR)
    bias_correction1 = 1.0 - power_of(log2_beta1_hi, log2_beta1_lo, step)
    bias_correction2 = 1.0 - power_of(log2_beta2_hi, log2_beta2_lo, step)
    step_size = (lr64 / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    decay_factor = (1.0 - lr64 * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    offsets = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        _adam_block(row_ptr, block_start + offsets, None, grad_scale, step_size, bias_correction2_sqrt,
                    decay_factor, weight_decay, beta2, one_minus_beta1, one_minus_beta2, eps,
                    HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, element_ty, ALIGNED)
    if full_end < end:
        _adam_block(row_ptr, full_end + offsets, full_end + offsets < end, grad_scale, step_size,
                    bias_correction2_sqrt, decay_factor, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
                    eps, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, element_ty, ALIGNED)


# ----------------------------------------------------------------------- RMSprop


@triton.jit
def _rmsprop_block(row_ptr, offsets, mask, grad_scale, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                   HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                   CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, element_ty: tl.constexpr, ALIGNED: tl.constexpr):
    param_ptr = tensor_ptr(row_ptr, PARAM, element_ty, ALIGNED) + offsets
    square_avg_ptr = tensor_ptr(row_ptr, STATE0, element_ty, ALIGNED) + offsets
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = load_grad(row_ptr, offsets, mask, grad_scale, element_ty, ALIGNED, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    square_avg = tl.load(square_avg_ptr, mask=mask).to(tl.float32) * alpha + one_minus_alpha * grad * grad
    tl.store(square_avg_ptr, to_storage(square_avg, element_ty), mask=mask)
    if CENTERED:
        grad_avg_ptr = tensor_ptr(row_ptr, STATE2, element_ty, ALIGNED) + offsets
        grad_avg = lerp(tl.load(grad_avg_ptr, mask=mask).to(tl.float32), grad, one_minus_alpha)
        tl.store(grad_avg_ptr, to_storage(grad_avg, element_ty), mask=mask)
        avg = tl.sqrt_rn(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = tl.sqrt_rn(square_avg) + eps
    if HAS_MOMENTUM:
        buf_ptr = tensor_ptr(row_ptr, STATE1, element_ty, ALIGNED) + offsets
        buf = tl.load(buf_ptr, mask=mask).to(tl.float32) * momentum + tl.div_rn(grad, avg)
        tl.store(buf_ptr, to_storage(buf, element_ty), mask=mask)
        param = param - lr * buf
    else:
        param = param - lr * tl.div_rn(grad, avg)
    tl.store(param_ptr, to_storage(param, element_ty), mask=mask)


@triton.jit
def _rmsprop_kernel(tensor_table_ptr, chunk_table_ptr, counter_ptr, param_ref_ptr, lr, lr_ptr, alpha,
                    one_minus_alpha, eps, weight_decay, momentum, grad_scale_ptr, found_inf_ptr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, LR_FROM_PTR: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                    HAS_WEIGHT_DECAY: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    if update_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    advance_step(row_ptr, counter_ptr, tensor, n_chunks)  # kept for torch's state layout; unused by the rule
    lr32 = _load_lr(lr, lr_ptr, LR_FROM_PTR).to(tl.float32)
    offsets = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        _rmsprop_block(row_ptr, block_start + offsets, None, grad_scale, lr32, alpha, one_minus_alpha, eps,
                       weight_decay, momentum, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, CENTERED,
                       HAS_MOMENTUM, element_ty, ALIGNED)
    if full_end < end:
        _rmsprop_block(row_ptr, full_end + offsets, full_end + offsets < end, grad_scale, lr32, alpha,
                       one_minus_alpha, eps, weight_decay, momentum, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY,
                       CENTERED, HAS_MOMENTUM, element_ty, ALIGNED)


# ----------------------------------------------------------------------- Adagrad


@triton.jit
def _adagrad_block(row_ptr, offsets, mask, grad_scale, clr, weight_decay, eps,
                   HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                   element_ty: tl.constexpr, ALIGNED: tl.constexpr):
    param_ptr = tensor_ptr(row_ptr, PARAM, element_ty, ALIGNED) + offsets
    sum_ptr = tensor_ptr(row_ptr, STATE0, element_ty, ALIGNED) + offsets
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = load_grad(row_ptr, offsets, mask, grad_scale, element_ty, ALIGNED, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    state_sum = tl.load(sum_ptr, mask=mask).to(tl.float32) + grad * grad
    tl.store(sum_ptr, to_storage(state_sum, element_ty), mask=mask)
    param = param - clr * tl.div_rn(grad, tl.sqrt_rn(state_sum) + eps)
    tl.store(param_ptr, to_storage(param, element_ty), mask=mask)


@triton.jit
def _adagrad_kernel(tensor_table_ptr, chunk_table_ptr, counter_ptr, param_ref_ptr, lr, lr_ptr, lr_decay,
                    weight_decay, eps, grad_scale_ptr, found_inf_ptr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, LR_FROM_PTR: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                    HAS_WEIGHT_DECAY: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    if update_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    step = advance_step(row_ptr, counter_ptr, tensor, n_chunks)
    lr64 = _load_lr(lr, lr_ptr, LR_FROM_PTR)
    clr = (lr64 / (1.0 + (step.to(tl.float64) - 1.0) * tl.cast(lr_decay, tl.float64))).to(tl.float32)
    offsets = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        _adagrad_block(row_ptr, block_start + offsets, None, grad_scale, clr, weight_decay, eps,
                       HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, element_ty, ALIGNED)
    if full_end < end:
        _adagrad_block(row_ptr, full_end + offsets, full_end + offsets < end, grad_scale, clr, weight_decay, eps,
                       HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, element_ty, ALIGNED)


# ---------------------------------------------------------------------- Adadelta


@triton.jit
def _adadelta_block(row_ptr, offsets, mask, grad_scale, lr, rho, one_minus_rho, eps, weight_decay,
                    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                    element_ty: tl.constexpr, ALIGNED: tl.constexpr):
    param_ptr = tensor_ptr(row_ptr, PARAM, element_ty, ALIGNED) + offsets
    square_avg_ptr = tensor_ptr(row_ptr, STATE0, element_ty, ALIGNED) + offsets
    acc_delta_ptr = tensor_ptr(row_ptr, STATE1, element_ty, ALIGNED) + offsets
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = load_grad(row_ptr, offsets, mask, grad_scale, element_ty, ALIGNED, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    square_avg = tl.load(square_avg_ptr, mask=mask).to(tl.float32) * rho + one_minus_rho * grad * grad
    acc_delta = tl.load(acc_delta_ptr, mask=mask).to(tl.float32)
    # Each value stored as soon as it is final (every load above is issued first): fewer values live at
    # once, 61-72 registers on sm_90 instead of 72-84.
    tl.store(square_avg_ptr, to_storage(square_avg, element_ty), mask=mask)
    std = tl.sqrt_rn(square_avg + eps)
    delta = tl.div_rn(tl.sqrt_rn(acc_delta + eps), std) * grad
    tl.store(param_ptr, to_storage(param - lr * delta, element_ty), mask=mask)
    acc_delta = acc_delta * rho + one_minus_rho * delta * delta
    tl.store(acc_delta_ptr, to_storage(acc_delta, element_ty), mask=mask)


@triton.jit
def _adadelta_kernel(tensor_table_ptr, chunk_table_ptr, counter_ptr, param_ref_ptr, lr, lr_ptr, rho,
                     one_minus_rho, eps, weight_decay, grad_scale_ptr, found_inf_ptr,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, LR_FROM_PTR: tl.constexpr,
                     HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                     HAS_WEIGHT_DECAY: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    if update_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    advance_step(row_ptr, counter_ptr, tensor, n_chunks)  # kept for torch's state layout; unused by the rule
    lr32 = _load_lr(lr, lr_ptr, LR_FROM_PTR).to(tl.float32)
    offsets = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        _adadelta_block(row_ptr, block_start + offsets, None, grad_scale, lr32, rho, one_minus_rho, eps,
                        weight_decay, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, element_ty, ALIGNED)
    if full_end < end:
        _adadelta_block(row_ptr, full_end + offsets, full_end + offsets < end, grad_scale, lr32, rho,
                        one_minus_rho, eps, weight_decay, HAS_GRAD_SCALE, MAXIMIZE, HAS_WEIGHT_DECAY, element_ty, ALIGNED)


# ------------------------------------------------------ ahead-of-time compile specs


def _aot_specs(kernel_args, pointer_args, flags):
    """Each dtype with the default flags, fp32 with every flag on, and an unaligned variant."""
    specs = []
    variants = [(dtype, {}) for dtype in ("fp32", "fp16", "bf16")]
    variants.append(("fp32", {flag: True for flag in flags}))
    variants.append(("bf16", {"ALIGNED": False, **{flag: True for flag in flags[:2]}}))
    for dtype, overrides in variants:
        signature = {name: pointer_args.get(name, "fp32") for name in kernel_args}
        signature["param_ref_ptr"] = "*" + dtype
        constexprs = {"BLOCK": 1024, "CHUNK": 16384, "ALIGNED": True, **{flag: False for flag in flags}}
        constexprs.update(overrides)
        for name in constexprs:
            signature[name] = "constexpr"
        specs.append({"signature": signature, "constexprs": constexprs, "num_warps": 4})
    return specs


_TABLES = {"tensor_table_ptr": "*i64", "chunk_table_ptr": "*i64", "counter_ptr": "*i32",
           "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
_COMMON_FLAGS = ["LR_FROM_PTR", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "MAXIMIZE", "HAS_WEIGHT_DECAY"]

AOT_SPECS = {
    "_sgd_kernel": _aot_specs(
        ["tensor_table_ptr", "chunk_table_ptr", "param_ref_ptr", "lr", "lr_ptr", "weight_decay", "momentum",
         "one_minus_dampening", "grad_scale_ptr", "found_inf_ptr"],
        _TABLES, _COMMON_FLAGS + ["HAS_MOMENTUM", "NESTEROV"]),
    "_adam_kernel": _aot_specs(
        ["tensor_table_ptr", "chunk_table_ptr", "counter_ptr", "param_ref_ptr", "lr", "lr_ptr", "beta2",
         "one_minus_beta1", "one_minus_beta2", "log2_beta1_hi", "log2_beta1_lo", "log2_beta2_hi", "log2_beta2_lo",
         "eps", "weight_decay", "grad_scale_ptr", "found_inf_ptr"],
        _TABLES, _COMMON_FLAGS + ["DECOUPLED", "AMSGRAD"]),
    "_rmsprop_kernel": _aot_specs(
        ["tensor_table_ptr", "chunk_table_ptr", "counter_ptr", "param_ref_ptr", "lr", "lr_ptr", "alpha",
         "one_minus_alpha", "eps", "weight_decay", "momentum", "grad_scale_ptr", "found_inf_ptr"],
        _TABLES, _COMMON_FLAGS + ["CENTERED", "HAS_MOMENTUM"]),
    "_adagrad_kernel": _aot_specs(
        ["tensor_table_ptr", "chunk_table_ptr", "counter_ptr", "param_ref_ptr", "lr", "lr_ptr", "lr_decay",
         "weight_decay", "eps", "grad_scale_ptr", "found_inf_ptr"],
        _TABLES, _COMMON_FLAGS),
    "_adadelta_kernel": _aot_specs(
        ["tensor_table_ptr", "chunk_table_ptr", "counter_ptr", "param_ref_ptr", "lr", "lr_ptr", "rho",
         "one_minus_rho", "eps", "weight_decay", "grad_scale_ptr", "found_inf_ptr"],
        _TABLES, _COMMON_FLAGS),
}

# Called from the kernels above; compiled as part of them.
DEVICE_FUNCTIONS = ("_load_lr", "_sgd_block", "_adam_block", "_rmsprop_block", "_adagrad_block", "_adadelta_block")
