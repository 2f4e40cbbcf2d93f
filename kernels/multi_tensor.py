"""Device helpers for kernels that update many tensors in one launch.

The host describes a list of tensors with two int64 tables:

* the tensor table, one row of ``ROW`` entries per tensor: the addresses of the
  param, its grad and up to three state tensors, the address of its ``step``
  (a float32 scalar on the device), its number of elements, and a flag that is
  1 on the tensor's first step;
* the chunk table, one (tensor index, chunk index) pair per program: tensor
  ``t`` is cut into ``cdiv(numel, CHUNK)`` chunks, at least one.

Every tensor of one launch has the dtype of ``param_ref_ptr``'s element type
(grads and state share the param's dtype, as in torch.optim).
"""

import triton
import triton.language as tl

# Columns of the tensor table (the host reads these values too).
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
STATE0 = tl.constexpr(2)
STATE1 = tl.constexpr(3)
STATE2 = tl.constexpr(4)
STEP = tl.constexpr(5)
NUMEL = tl.constexpr(6)
FIRST_STEP = tl.constexpr(7)
ROW = tl.constexpr(8)


@triton.jit
def tensor_ptr(row_ptr, column, element_ty, ALIGNED: tl.constexpr):
    """Typed pointer to the tensor whose address is in ``column`` of a row.

    ``ALIGNED``: the host found every address of the launch 16-byte aligned,
    which lets the compiler vectorise the full blocks.
    """
    pointer = tl.load(row_ptr + column).to(tl.pointer_type(element_ty))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def chunk_of_program(tensor_table_ptr, chunk_table_ptr, CHUNK: tl.constexpr):
    """(tensor row pointer, tensor index, chunk start, chunk end, chunk count) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(chunk_table_ptr + 2 * pid)
    chunk = tl.load(chunk_table_ptr + 2 * pid + 1)
    row_ptr = tensor_table_ptr + tensor * ROW
    numel = tl.load(row_ptr + NUMEL)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, numel)
    n_chunks = tl.maximum(tl.cdiv(numel, CHUNK), 1)
    return row_ptr, tensor, start, end, n_chunks


@triton.jit
def advance_step(row_ptr, counter_ptr, tensor, n_chunks):
    """Return the tensor's step + 1 and store it once all its programs have read it.

    Every program of the tensor reads the old step; the last one to finish
    reading (counted with an atomic per tensor, reset to 0 for the next launch)
    writes the new value. This keeps the whole update, step count included, in
    one launch and deterministic.
    """
    step_ptr = tl.load(row_ptr + STEP).to(tl.pointer_type(tl.float32))
    new_step = tl.load(step_ptr) + 1.0
    # Every thread loaded the step; the store and the atomic below run on thread 0 alone. Without a CTA
    # barrier a lagging warp could read the new value (triton 3.9 puts one before atomics itself, 3.6 does
    # not, and neither before a store): tests/ptx_hazards.py checks the compiled code for this.
    tl.debug_barrier()
    if n_chunks == 1:
        tl.store(step_ptr, new_step)
    else:
        # acq_rel, after the barrier: every thread's load above happens before this program is counted.
        readers_before = tl.atomic_add(counter_ptr + tensor, 1)
        if readers_before == n_chunks - 1:
            tl.store(step_ptr, new_step)
            tl.atomic_xchg(counter_ptr + tensor, 0)
    return new_step


@triton.jit
def power_of(log2_base_hi, log2_base_lo, exponent):
    """``base ** exponent`` in float64, with ``log2(base)`` given as an fp32 hi/lo pair.

    Scalar kernel arguments arrive as fp32; splitting log2(base) keeps ~48 bits,
    so bias corrections such as ``1 - 0.999 ** step`` match torch's float64
    host arithmetic instead of losing five digits to fp32 cancellation.
    """
    log2_base = tl.cast(log2_base_hi, tl.float64) + tl.cast(log2_base_lo, tl.float64)
    return tl.exp2(tl.cast(exponent, tl.float64) * log2_base)


@triton.jit
def load_grad(row_ptr, offsets, mask, grad_scale, element_ty, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
              MAXIMIZE: tl.constexpr):
    """The gradient in fp32, unscaled by GradScaler's scale and negated for ``maximize``."""
    grad = tl.load(tensor_ptr(row_ptr, GRAD, element_ty, ALIGNED) + offsets, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = tl.div_rn(grad, grad_scale)
    if MAXIMIZE:
        grad = -grad
    return grad


@triton.jit
def to_storage(x, element_ty: tl.constexpr):
    """Round fp32 ``x`` to the param dtype, to nearest-even.

    Triton's interpreter truncates fp32 -> bf16 casts; the explicit rounding
    gives the GPU's (and torch's) bf16 result everywhere for a few integer ops
    in a memory-bound kernel.
    """
    if element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(element_ty)


@triton.jit
def lerp(start, end, weight):
    """``torch.lerp(start, end, weight)`` with torch's two formulas (exact at both ends)."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def update_skipped(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """True when GradScaler found an inf/NaN: the whole update, step included, is skipped."""
    if HAS_FOUND_INF:
        return tl.load(found_inf_ptr) != 0.0
    else:
        return False


# Called from the kernels in optim.py; compiled as part of them.
DEVICE_FUNCTIONS = (
    "tensor_ptr", "chunk_of_program", "advance_step", "power_of", "load_grad", "to_storage", "lerp", "update_skipped",
)
