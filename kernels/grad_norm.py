"""Global gradient-norm clipping over many tensors in two launches.

1. ``_grad_norm_partials_kernel``: one fp32 partial (sum of squares, or max
   of |g| for the inf-norm) per chunk, written to its own slot: no atomics,
   the same result on every run.
2. ``_grad_norm_scale_kernel``: every program reduces all partials in the same
   order (so all agree on the total), program 0 stores the total norm, and
   each program scales its chunk by ``min(max_norm / (total + 1e-6), 1)`` as
   ``torch.nn.utils.clip_grad_norm_`` does.

Bytes per element: read g (partials), read and write g (scale): 3x the
gradient size, against torch's foreach path which does the same passes in
more launches.
"""

import triton
import triton.language as tl

from .multi_tensor import GRAD, chunk_of_program, tensor_ptr, to_storage


@triton.jit
def _max_propagating_nan(x):
    """``tl.max`` drops NaNs; torch's inf-norm of a tensor holding a NaN is NaN."""
    has_nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=0))


@triton.jit
def _grad_norm_partials_kernel(tensor_table_ptr, chunk_table_ptr, param_ref_ptr, partials_ptr,
                               BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
                               INF_NORM: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    grad_ptr = tensor_ptr(row_ptr, GRAD, element_ty, ALIGNED)
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        g = tl.load(grad_ptr + block_start + offsets).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(g), propagate_nan=tl.PropagateNan.ALL) if INF_NORM else acc + g * g
    if full_end < end:
        g = tl.load(grad_ptr + full_end + offsets, mask=full_end + offsets < end, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(g), propagate_nan=tl.PropagateNan.ALL) if INF_NORM else acc + g * g
    partial = _max_propagating_nan(acc) if INF_NORM else tl.sum(acc, axis=0)
    tl.store(partials_ptr + tl.program_id(0), partial)


@triton.jit
def _grad_norm_scale_kernel(tensor_table_ptr, chunk_table_ptr, param_ref_ptr, partials_ptr, n_partials,
                            total_norm_ptr, max_norm,
                            BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
                            INF_NORM: tl.constexpr, PARTIALS_BLOCK: tl.constexpr):
    element_ty: tl.constexpr = param_ref_ptr.dtype.element_ty
    partial_offsets = tl.arange(0, PARTIALS_BLOCK)
    acc = tl.zeros([PARTIALS_BLOCK], dtype=tl.float32)
    for i in range(0, n_partials, PARTIALS_BLOCK):
        partial = tl.load(partials_ptr + i + partial_offsets, mask=i + partial_offsets < n_partials, other=0.0)
        acc = tl.maximum(acc, partial, propagate_nan=tl.PropagateNan.ALL) if INF_NORM else acc + partial
    total = _max_propagating_nan(acc) if INF_NORM else tl.sqrt_rn(tl.sum(acc, axis=0))
    if tl.program_id(0) == 0:
        tl.store(total_norm_ptr, total)
    # NaN-propagating min: a NaN norm makes NaN grads, as torch.clamp does.
    clip_coef = tl.minimum(tl.div_rn(max_norm, total + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)

    row_ptr, tensor, start, end, n_chunks = chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK)
    grad_ptr = tensor_ptr(row_ptr, GRAD, element_ty, ALIGNED)
    offsets = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        g = tl.load(grad_ptr + block_start + offsets).to(tl.float32)
        tl.store(grad_ptr + block_start + offsets, to_storage(g * clip_coef, element_ty))
    if full_end < end:
        mask = full_end + offsets < end
        g = tl.load(grad_ptr + full_end + offsets, mask=mask).to(tl.float32)
        tl.store(grad_ptr + full_end + offsets, to_storage(g * clip_coef, element_ty), mask=mask)


DEVICE_FUNCTIONS = ("_max_propagating_nan",)


def _aot_specs(signature, flags):
    specs = []
    for dtype, aligned, inf_norm in (("fp32", True, False), ("fp16", True, False), ("bf16", True, True),
                                     ("fp32", False, True)):
        constexprs = {"BLOCK": 1024, "CHUNK": 65536, "ALIGNED": aligned, "INF_NORM": inf_norm, **flags}
        full = {**signature, "param_ref_ptr": "*" + dtype, **{name: "constexpr" for name in constexprs}}
        specs.append({"signature": full, "constexprs": constexprs, "num_warps": 4})
    return specs


AOT_SPECS = {
    "_grad_norm_partials_kernel": _aot_specs(
        {"tensor_table_ptr": "*i64", "chunk_table_ptr": "*i64", "param_ref_ptr": None, "partials_ptr": "*fp32"}, {}),
    "_grad_norm_scale_kernel": _aot_specs(
        {"tensor_table_ptr": "*i64", "chunk_table_ptr": "*i64", "param_ref_ptr": None, "partials_ptr": "*fp32",
         "n_partials": "i32", "total_norm_ptr": "*fp32", "max_norm": "fp32"}, {"PARTIALS_BLOCK": 1024}),
}
