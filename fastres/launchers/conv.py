"""Launchers of the conv + BatchNorm + ReLU kernels (``kernels/conv.py``).

Tensors are logical NCHW with any strides; outputs follow the input's memory
format (channels_last in, channels_last out, as ``nn.Conv2d`` does). Per-channel
vectors are fp32 and packed: BatchNorm statistics ``[4, C]`` (scale, shift,
mean, invstd), backward coefficients ``[3, C]`` (coef_g, coef_c, coef_y).

Everything that depends only on shapes, strides, dtypes and flags (output
strides, grids, block sizes, the kernels' integer arguments) is planned once
per distinct call and cached (``functools.lru_cache``), so a training step
spends its host time on allocating outputs and launching, not on planning.
Reductions across programs (BatchNorm's statistics, the weight gradient's
splits) are finished inside the same launch by the last program to arrive,
which uses a per-stream workspace of fp32 partials and zeroed counters.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, NamedTuple, Optional

import torch

from ..kernels import conv as kernels
from .core import launch
from .workspace import _workspace

PRO_NONE, PRO_BN_RELU, PRO_BN_GRAD = kernels.PRO_NONE, kernels.PRO_BN_RELU, kernels.PRO_BN_GRAD
EPI_NONE, EPI_STATS, EPI_RELU_GRAD = kernels.EPI_NONE, kernels.EPI_STATS, kernels.EPI_RELU_GRAD
RES_NONE, RES_TENSOR, RES_BN, RES_AFTER_RELU = (kernels.RES_NONE, kernels.RES_TENSOR, kernels.RES_BN,
                                                kernels.RES_AFTER_RELU)
PAIR_NONE, PAIR_OUTPUTS, PAIR_OPERANDS = kernels.PAIR_NONE, kernels.PAIR_OUTPUTS, kernels.PAIR_OPERANDS

CONV_BLOCK_M = 64
WGRAD_BLOCK_P = 32  # rows per step: with the BN-grad prologue on dY, 64 needs ~200 registers on sm_90 (16-bit)
# A finalize combines at most BLOCK_T partials of BLOCK_C channels at once, loaded in one go (8 values per
# thread and array at 4 warps; 16 took the forward conv's 64-channel variants from 142 to 185 registers);
# more partials are combined in two levels, groups of BLOCK_T then the groups (kernels/conv.py, _group), so
# one program never walks all of a launch's partials.
FINALIZE_ELEMENTS = 1024
TAIL_ELEMENTS = 4096  # per program of the elementwise tail kernels: BLOCK_M x BLOCK_C
TAIL_STEP_BYTES = 16  # per thread and tensor in a loop step of a tail program: one 128-bit access, few registers
# Row kernels that write per-program partials (the tail backward, the BatchNorm statistics) take row tiles up
# to TAIL_PARTIAL_MAX_M while a launch keeps this many programs per SM: 8 programs of 4 warps at 64 registers
# fill an SM's register file, so fewer but longer programs (a loop of the same 128-bit steps, the same
# registers) still fill the GPU, and write fewer partials for the finalize to read back and walk.
TAIL_PARTIAL_PROGRAMS_PER_SM = 8
TAIL_PARTIAL_MAX_M = 256
# The tail backward's register cap (sm_90, AOT check): within it no variant has a stack frame, while uncapped
# ptxas gives two 16-bit ones an 8-16 B frame. Not for a BatchNorm'd residual, whose three per-channel sums
# of 8 channels per thread would spill under it: uncapped, 80 registers and no frame. Nor for a max-pooled
# one (four window elements a thread): under it a 16-256 B frame; uncapped 72 (fp32) and 125 (bf16), no frame.
TAIL_BACKWARD_MAXNREG = 64
NUM_WARPS = 4
INT32_LIMIT = 2**31  # offsets below this take the kernels' 32-bit path (IDX64=False)


class BatchNormArgs(NamedTuple):
    """What the kernels need of an ``nn.BatchNorm2d`` (running statistics None when not updated)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    momentum: Optional[float]
    eps: float


class BackwardCoefs(NamedTuple):
    """BatchNorm backward: packed ``[3, C]`` (coef_g, coef_c, coef_y) such that
    ``dy = g * coef_g + y * coef_y + coef_c``, and the parameter gradients."""

    packed: torch.Tensor
    dweight: torch.Tensor
    dbias: torch.Tensor


def _param_grads(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm's weight and bias gradients: separate tensors, so autograd takes them as they are."""
    return torch.empty_like(weight), torch.empty_like(weight)


def _empty_coefs(weight: torch.Tensor) -> BackwardCoefs:
    """A BatchNorm's backward coefficients and parameter gradients, for an epilogue to fill."""
    return BackwardCoefs(torch.empty((3, weight.shape[0]), dtype=torch.float32, device=weight.device),
                         *_param_grads(weight))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the channels of a pixel are contiguous, else contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def same_layout(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether kernels can address ``t`` with ``like``'s strides: same shape, and the strides agree
    wherever a dimension has more than one element (a size-1 dimension's stride is never used)."""
    if t.stride() == like.stride() and t.shape == like.shape:  # the usual case, cheaply
        return True
    return t.shape == like.shape and all(a == b for a, b, n in zip(t.stride(), like.stride(), t.shape) if n > 1)


def check_same_layout(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """Kernels address ``t`` with ``like``'s strides: a clear error unless :func:`same_layout`."""
    if not same_layout(t, like):
        raise ValueError(f"{name} has shape {tuple(t.shape)} and strides {t.stride()}, "
                         f"expected {tuple(like.shape)} with strides {like.stride()}")


def cudnn_conv_tf32() -> bool:
    """Whether cuDNN's fp32 convolutions use TF32: torch's per-op switch
    ``torch.backends.cudnn.conv.fp32_precision`` where torch has it (it resolves what it inherits; the
    legacy ``allow_tf32`` raises once the new API has set conv and RNN apart), else ``allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return torch.backends.cudnn.allow_tf32


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 convs use TF32 on the GPU when cuDNN's convs would (torch's default), operands rounded as
    cuDNN rounds them (kernels/conv.py, ``_to_tf32``)."""
    if dtype == torch.float32 and device.type == "cuda" and cudnn_conv_tf32():
        return "tf32"
    return "ieee"


def _upcast_dot(dtype: torch.dtype, device_type: str) -> bool:
    """The interpreter's bf16 tl.dot is broken (triton 3.9): multiply the bf16 values in fp32 there."""
    return dtype == torch.bfloat16 and device_type == "cpu"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(n: int, lo: int, hi: int) -> int:
    """The power of two at or above ``n``, clamped to [lo, hi] (plain Python: triton's helper is slow)."""
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _needs_int64(*layouts: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    """Whether some (shape, strides) reaches an element offset of 2**31 or more: the kernels' ``IDX64``.
    Below that, 32-bit offsets address every element (and the kernels' row and pixel indices fit too)."""
    return any(sum((n - 1) * st for n, st in zip(shape, stride) if n > 0) >= INT32_LIMIT for shape, stride in layouts)


def _strides_like(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    N, C, H, W = shape
    if channels_last:
        return (H * W * C, 1, W * C, C)
    return (C * H * W, H * W, W, 1)


def conv_output_layout(a_shape, a_stride, w_shape, stride: int, padding: int, transposed: bool = False,
                       out_hw: tuple[int, int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, strides) of :func:`conv`'s output: the operand's memory format (channels_last in,
    channels_last out). Plain arithmetic on sizes, so fake (meta) implementations use it too."""
    N, CA, HA, WA = a_shape
    K, C, R, S = w_shape
    CO = C if transposed else K
    HO, WO = out_hw if transposed else (out_size(HA, R, stride, padding), out_size(WA, S, stride, padding))
    channels_last = CA > 1 and a_stride[1] == 1 and tuple(a_stride) != _strides_like(a_shape, False)
    out_shape = (N, CO, HO, WO)
    return out_shape, _strides_like(out_shape, channels_last)


@contextlib.contextmanager
def planned_with(**functions) -> Iterator[None]:
    """Plan launches with some of this module's planning functions replaced, e.g.
    ``planned_with(_num_sms=lambda device: 132)``: for tools that count or compile what another device
    would launch. The plan caches are cleared before and after, so no plan outlives its inputs."""
    missing = [name for name in functions if not callable(globals().get(name))]
    if missing:
        raise AttributeError(f"planned_with: fastres.launchers.conv has no planning function {missing}")
    saved = {name: globals()[name] for name in functions}
    caches = [f for f in globals().values() if hasattr(f, "cache_clear")]
    for f in caches:
        f.cache_clear()
    globals().update(functions)
    try:
        yield
    finally:
        globals().update(saved)
        for f in caches:
            f.cache_clear()


_placeholders: dict[torch.device, torch.Tensor] = {}


def _unused(device: torch.device) -> torch.Tensor:
    """A pointer for arguments a kernel variant never reads."""
    t = _placeholders.get(device)
    if t is None:
        t = _placeholders[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: few programs run fastest, but enough that small test
    # shapes still split the weight gradient (and exercise the in-launch sum).
    return 8


@functools.lru_cache(maxsize=None)
def _compute_capability(device: torch.device) -> int:
    """The device's compute capability x 10 (kernels' per-target register caps); the interpreter plans as
    for sm_90, the GPUs the recorded launch specs stand for."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _finalize_block_t(n_tiles: int, block_c: int) -> int:
    """Partials per finalize group and load (``BLOCK_T``): all of them up to FINALIZE_ELEMENTS / block_c
    (16 channels: 128), else groups of that many, level after level (``_finalize_levels``)."""
    most = FINALIZE_ELEMENTS // block_c
    return _block(n_tiles, min(16, most), most)


def _finalize_levels(n_partials: int, block_t: int, n_cols: int) -> tuple[int, int]:
    """(rows, counters) of a BatchNorm finalize over ``n_partials`` per column (kernels/conv.py,
    ``_group_rows``): the partials, then one row per group of ``block_t`` at each level while more than
    ``block_t`` remain; per column one counter per group of each level and one for the last arrivals."""
    extra, count = 0, n_partials
    while count > block_t:
        count = _cdiv(count, block_t)
        extra += count
    return n_partials + extra, n_cols * (extra + 1)


def _finalize_layout(n_partials: int, block_t: int, n_cols: int) -> tuple[int, int]:
    """(rows, counters) of the fused gradients' two-level sums over ``n_partials`` per column (kernels/conv.py,
    ``_group``):
    partial rows plus, with several groups, one per group; per column one counter per group plus, with
    several, one for the groups' arrivals. (One group adds nothing, so a launch touches all of what it is
    given whatever the count: the traffic model learns one role per kernel variant.)"""
    n_groups = _cdiv(n_partials, block_t)
    extra = n_groups if n_groups > 1 else 0
    return n_partials + extra, n_cols * (extra + 1)


# ------------------------------------------------------------------ convolution

class _ConvPlan(NamedTuple):
    out_shape: tuple[int, ...]
    out_stride: tuple[int, ...]
    grid: tuple[int, int]
    ints: tuple[int, ...]  # HA .. CO, M, the operand, output, residual and weight strides
    meta: dict
    part_numel: int  # the epilogue's partials (per tile and per group, both halves of a pair)
    counter_numel: int


@functools.lru_cache(maxsize=None)
def _plan_conv(a_shape, a_stride, w_shape, w_stride, stride, padding, transposed, out_hw, dtype, device_type,
               tf32, prologue, epilogue, has_affine, has_residual, relu, track, cumulative,
               pair=PAIR_NONE, b_stride=None, w2_stride=None) -> _ConvPlan:
    N, CA, HA, WA = a_shape
    K, C, R, S = w_shape
    out_shape, out_stride = conv_output_layout(a_shape, a_stride, w_shape, stride, padding, transposed, out_hw)
    CO, HO, WO = out_shape[1:]
    M = N * HO * WO
    if transposed:
        # One sub-problem per output phase (h % stride, w % stride); each gets the row tiles of the largest.
        n_tiles = stride * stride * _cdiv(N * _cdiv(HO, stride) * _cdiv(WO, stride), CONV_BLOCK_M)
    else:
        n_tiles = _cdiv(M, CONV_BLOCK_M)
    block_n = _block(CO, 16, 64)
    # A prologue holds its operand tile(s) in fp32 for the BatchNorm math: 32 channels per step keep those
    # variants within 168 registers on sm_90 (with 64: up to 176).
    # Paired outputs select their pointers per program: also 32 (with 64, 183 registers in bf16). Paired
    # operands (two prologue loops): 16 (with 32, 170 registers in bf16 under triton 3.6, 167 under 3.9).
    # TF32 operands are rounded in registers (kernels/conv.py, _to_tf32) like a prologue: also 32 (with 64, up
    # to 215 registers in fp32).
    block_k = _block(CA, 16, 16 if pair == PAIR_OPERANDS else
                     64 if prologue == PRO_NONE and pair != PAIR_OUTPUTS and not tf32 else 32)
    sw_o, sw_a = (w_stride[1], w_stride[0]) if transposed else (w_stride[0], w_stride[1])
    # The residual (checked to have out's layout) is addressed with out's strides.
    w2_stride = w_stride if w2_stride is None else w2_stride
    sw2_o, sw2_a = (w2_stride[1], w2_stride[0]) if transposed else (w2_stride[0], w2_stride[1])
    ints = (HA, WA, CA, HO, WO, CO, M, *a_stride, *out_stride, *out_stride, sw_o, sw_a, w_stride[2], w_stride[3],
            *(a_stride if b_stride is None else b_stride), sw2_o, sw2_a, w2_stride[2], w2_stride[3])
    meta = dict(R=R, S=S, STRIDE=stride, PAD=padding, TRANSPOSED=transposed, PROLOGUE=prologue, EPILOGUE=epilogue,
                HAS_AFFINE=has_affine, HAS_RESIDUAL=has_residual, RELU=relu, TRACK=track, CUMULATIVE=cumulative,
                PAIR=pair,
                DOT_PRECISION="tf32" if tf32 else "ieee", UPCAST_DOT=_upcast_dot(dtype, device_type),
                IDX64=_needs_int64((a_shape, a_stride), (out_shape, out_stride), (w_shape, w_stride)),
                BLOCK_M=CONV_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
                BLOCK_T=_finalize_block_t(n_tiles, block_n), num_warps=NUM_WARPS)
    halves = 2 if pair == PAIR_OUTPUTS else 1
    n_cols = _cdiv(CO, block_n)
    rows, counters = _finalize_levels(n_tiles, meta["BLOCK_T"], n_cols)
    # Per half: [2, rows, CO] partials; counters, then num_batches_tracked's (kernels/conv.py, _bn_forward_finalize).
    return _ConvPlan(out_shape, out_stride, (n_tiles, n_cols * halves), ints, meta,
                     halves * 2 * rows * CO, halves * (counters + 1))


def conv(a: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, *, dtype: torch.dtype,
         transposed: bool = False, out_hw: tuple[int, int] | None = None,
         prologue: int = PRO_NONE, a2: torch.Tensor | None = None, pro: torch.Tensor | None = None,
         epilogue: int = EPI_NONE, ey: torch.Tensor | None = None, bn: BatchNormArgs | None = None,
         stats: torch.Tensor | None = None, affine: BatchNormArgs | None = None,
         residual: torch.Tensor | None = None, relu: bool = False,
         b: torch.Tensor | None = None, b2: torch.Tensor | None = None, pro_b: torch.Tensor | None = None,
         weight_b: torch.Tensor | None = None):
    """One implicit-GEMM convolution launch.

    Forward (``transposed=False``): out = conv2d(A', weight) with A' the
    prologue of ``a`` (``pro``: packed per-channel rows). Data gradient
    (``transposed=True``): ``a`` is dY and out is dX of spatial size ``out_hw``.
    ``affine`` folds an eval-mode BatchNorm into the output, then ``residual``
    is added and ``relu`` applied. With ``b`` (same shape as ``a``, BN input
    ``b2``, prologue rows ``pro_b``) and ``weight_b``, out also gets the
    convolution of B' with ``weight_b`` (``PAIR_OPERANDS``: a downsampling
    block's two data gradients). Epilogues:

    * ``EPI_STATS``: returns ``(out, stats)``, the batch statistics of the
      output through BatchNorm ``bn`` (packed ``[4, CO]``; running statistics
      updated in place).
    * ``EPI_RELU_GRAD``: out is masked by the ReLU of BatchNorm ``bn`` applied
      to ``ey`` with its forward ``stats``; returns ``(out, BackwardCoefs)`` of that BN.
    * otherwise returns ``(out, None)``.
    """
    if a2 is not None:
        check_same_layout("conv: the prologue's second operand", a2, a)
    pair = PAIR_NONE
    if b is not None:
        check_same_layout("conv: the paired operand", b, a)
        if b2 is not None:
            check_same_layout("conv: the paired operand's second operand", b2, a)
        pair = PAIR_OPERANDS
    track, cumulative = _bn_flags(bn) if epilogue == EPI_STATS else (False, False)
    plan = _plan_conv(tuple(a.shape), a.stride(), tuple(weight.shape), weight.stride(), stride, padding, transposed,
                      out_hw, dtype, a.device.type, dot_precision(dtype, a.device) == "tf32", prologue, epilogue,
                      affine is not None, residual is not None, relu, track, cumulative,
                      pair, None, None if weight_b is None else weight_b.stride())
    out, extra, _, _ = _launch_conv(plan, a, weight, dtype, a2, pro, epilogue, ey, bn, stats, affine, residual,
                                    b=b, b2=b2, pro_b=pro_b, weight_b=weight_b)
    return out, extra


def _bn_flags(bn: BatchNormArgs | None) -> tuple[bool, bool]:
    """The statistics epilogue's (TRACK, CUMULATIVE): running statistics to update, momentum=None."""
    track = bn is not None and bn.running_mean is not None
    return track, track and bn.momentum is None


def pair_bn_flags_match(bn: BatchNormArgs, bn2: BatchNormArgs) -> bool:
    """Whether two BatchNorms can share a ``conv_pair`` launch (their kernel variant flags agree)."""
    return _bn_flags(bn) == _bn_flags(bn2)


def conv_pair(a: torch.Tensor, weight: torch.Tensor, weight2: torch.Tensor, stride: int, padding: int, *,
              dtype: torch.dtype, bn: BatchNormArgs, bn2: BatchNormArgs):
    """Two forward convolutions of one operand, each with its BatchNorm statistics (``EPI_STATS``), in one
    launch that reads ``a`` once (``PAIR_OUTPUTS``: a downsampling block's conv1 and projection).
    ``weight2`` has ``weight``'s shape and strides; the BNs must agree on ``pair_bn_flags_match``.
    Returns ``(out, stats, out2, stats2)``."""
    if weight2.shape != weight.shape or weight2.stride() != weight.stride():
        raise ValueError(f"conv_pair: weight2 has shape {tuple(weight2.shape)} and strides {weight2.stride()}, "
                         f"expected weight's {tuple(weight.shape)} and {weight.stride()}")
    plan = _plan_conv(tuple(a.shape), a.stride(), tuple(weight.shape), weight.stride(), stride, padding, False,
                      None, dtype, a.device.type, dot_precision(dtype, a.device) == "tf32", PRO_NONE, EPI_STATS,
                      False, False, False, *_bn_flags(bn), PAIR_OUTPUTS, None, weight2.stride())
    return _launch_conv(plan, a, weight, dtype, None, None, EPI_STATS, None, bn, None, None, None,
                        weight2=weight2, bn2=bn2)


def _planned_output(plan, dtype: torch.dtype, device: torch.device, where: str, ey: torch.Tensor | None,
                    residual: torch.Tensor | None) -> torch.Tensor:
    """A planned launch's output, and the check that the tensors its epilogue addresses with the output's
    strides (the BN input ``ey``, the residual) have them."""
    out = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=dtype, device=device)
    if ey is not None:
        check_same_layout(f"{where}: the epilogue's BN input", ey, out)
    if residual is not None:
        check_same_layout(f"{where}: the residual", residual, out)
    return out


def _launch_conv(plan: _ConvPlan, a, weight, dtype, a2, pro, epilogue, ey, bn, stats, affine, residual, *,
                 b=None, b2=None, pro_b=None, weight_b=None, weight2=None, bn2=None):
    """Allocate the outputs of a planned ``_conv_kernel`` launch and launch it:
    ``(out, extra, out2, stats2)``, the last two for ``PAIR_OUTPUTS`` only."""
    device = a.device
    out = _planned_output(plan, dtype, device, "conv", ey, residual)
    unused = _unused(device)
    CO = plan.out_shape[1]
    paired_outputs = weight2 is not None
    extra = out2 = stats2 = None
    part = counter = stats_arg = coef = dweight = dbias = unused
    norm = bn if bn is not None else affine
    momentum, eps = 0.0, 0.0
    if norm is not None:
        eps = float(norm.eps)
        momentum = 0.0 if norm.momentum is None else float(norm.momentum)
    track = plan.meta["TRACK"]
    if epilogue != EPI_NONE:
        ws = _workspace(device)
        part = ws.partials(plan.part_numel)
        counter = ws.counters(plan.counter_numel)
        if epilogue == EPI_STATS:
            stats_arg = extra = torch.empty((4, CO), dtype=torch.float32, device=device)
        else:
            stats_arg = stats
            extra = _empty_coefs(bn.weight)
            coef, dweight, dbias = extra
    second = (unused,) * 6 + (0.0, 0.0)  # bn2's weight, bias, running mean, var, num_batches, stats; momentum, eps
    if paired_outputs:
        out2 = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=dtype, device=device)
        stats2 = torch.empty((4, CO), dtype=torch.float32, device=device)
        second = (bn2.weight, bn2.bias, bn2.running_mean if track else unused, bn2.running_var if track else unused,
                  bn2.num_batches_tracked if track else unused, stats2,
                  0.0 if bn2.momentum is None else float(bn2.momentum), float(bn2.eps))
    w2 = weight2 if paired_outputs else (weight_b if weight_b is not None else weight)
    launch(kernels._conv_kernel, plan.grid,
           a, a if a2 is None else a2, weight, out, out if residual is None else residual,
           out if ey is None else ey, unused if pro is None else pro,
           norm.weight if norm is not None else unused, norm.bias if norm is not None else unused,
           norm.running_mean if norm is not None and norm.running_mean is not None else unused,
           norm.running_var if norm is not None and norm.running_var is not None else unused,
           norm.num_batches_tracked if track else unused,
           stats_arg, coef, dweight, dbias, part, counter,
           w2, out2 if out2 is not None else out, b if b is not None else a,
           b2 if b2 is not None else (b if b is not None else a), pro_b if pro_b is not None else unused,
           *second[:6],
           *plan.ints, momentum, eps, *second[6:],
           **plan.meta)
    return out, extra, out2, stats2


# ------------------------------------------------------------------ weight gradient

class _WgradPlan(NamedTuple):
    grid: tuple[int, int]
    ints: tuple[int, ...]
    part_numel: int
    counter_numel: int
    meta: dict


@functools.lru_cache(maxsize=None)
def _plan_wgrad(dy_shape, dy_stride, x_shape, x_stride, w_shape, g_stride, stride, padding, dtype, device_type,
                tf32, num_sms, dy_prologue, x_prologue) -> _WgradPlan:
    N, K, P, Q = dy_shape
    _, C, H, W = x_shape
    R, S = w_shape[2:]
    M = N * P * Q
    block_k = _block(K, 16, 64)
    block_c = _block(C, 16, 64)
    tiles = R * S * _cdiv(K, block_k) * _cdiv(C, block_c)
    # Two waves of programs. The splits' slices are summed up a binary tree (kernels/conv.py), so the serial
    # tail grows with log2(splits); the partials' bytes grow with the splits.
    splits = max(1, min(_cdiv(2 * num_sms, tiles), _cdiv(M, WGRAD_BLOCK_P)))
    rows_per_split = _cdiv(_cdiv(M, splits), WGRAD_BLOCK_P) * WGRAD_BLOCK_P
    splits = _cdiv(M, rows_per_split)
    ints = (H, W, C, P, Q, K, M, rows_per_split, *dy_stride, *x_stride, *g_stride)
    meta = dict(R=R, S=S, STRIDE=stride, PAD=padding, DY_PROLOGUE=dy_prologue, X_PROLOGUE=x_prologue,
                DOT_PRECISION="tf32" if tf32 else "ieee", UPCAST_DOT=_upcast_dot(dtype, device_type),
                IDX64=_needs_int64((dy_shape, dy_stride), (x_shape, x_stride), (w_shape, g_stride)),
                SPLIT=splits > 1, BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_P=WGRAD_BLOCK_P, num_warps=NUM_WARPS)
    split = splits > 1
    # Partials: a dense [R, S, K, C] slice per split; counters: per tile one per pair of the tree (< splits).
    return _WgradPlan((tiles, splits), ints, splits * K * C * R * S if split else 0, tiles * splits if split else 0,
                      meta)


def conv_wgrad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, *,
               dy2: torch.Tensor | None = None, dy_pro: torch.Tensor | None = None,
               x_pro: torch.Tensor | None = None) -> torch.Tensor:
    """dW of ``conv2d(x', weight)`` for output gradient dY' (both after their
    prologues, ``dy_pro``: packed backward coefficients, ``x_pro``: packed BN
    statistics), in one launch, in the weight's own memory format."""
    device = dy.device
    if dy2 is not None:
        check_same_layout("conv_wgrad: dy2", dy2, dy)
    grad = torch.empty_like(weight)
    plan = _plan_wgrad(tuple(dy.shape), dy.stride(), tuple(x.shape), x.stride(), tuple(weight.shape), grad.stride(),
                       stride, padding, x.dtype, device.type, dot_precision(x.dtype, device) == "tf32",
                       _num_sms(device), PRO_BN_GRAD if dy_pro is not None else PRO_NONE,
                       PRO_BN_RELU if x_pro is not None else PRO_NONE)
    unused = _unused(device)
    part = counter = unused
    if plan.part_numel:
        ws = _workspace(device)
        part, counter = ws.partials(plan.part_numel), ws.counters(plan.counter_numel)
    launch(kernels._conv_wgrad_kernel, plan.grid,
           dy, dy if dy2 is None else dy2, x, grad, part, counter,
           unused if dy_pro is None else dy_pro, unused if x_pro is None else x_pro,
           *plan.ints, **plan.meta)
    return grad


# ------------------------------------------------------------------ both gradients of a 3x3 conv

GRADS_BLOCK_M = 32  # rows per tile
GRADS_BLOCK_N = 16  # dX/dW channels per program
# dY's channels, one tile padded to 64 for any K <= 64: the nine dW taps are [64, 16] wgmma accumulators on
# sm_90; at 16 or 32 rows the dots fall back to mma.sync and the kernel takes more registers, not fewer.
GRADS_MAX_K = 64
# 8 warps share the taps' 36 KB of fp32 accumulators, one program per SM; their register cap depends on the
# architecture (kernels/conv.py, MAXNREG: 168 on sm_90, 255 on sm_80), with no stack on either (the AOT check).
GRADS_NUM_WARPS = 8
# The final sums run in two levels, groups of about sqrt(P) programs then the groups (on 132 SMs ResNet-20's
# first stage: 9 groups of 16, then the 9; was one program walking all 132), each step a [group, values] load
# of GRADS_FINAL_ELEMENTS (32 per thread at 8 warps): small groups take longer steps, so fewer of them.
GRADS_FINAL_ELEMENTS = 8192


_fused_grads = [True]


@contextlib.contextmanager
def separate_grads() -> Iterator[None]:
    """Inside the block every conv takes separate data- and weight-gradient launches, as before
    :func:`conv_grads` existed: for timing the fused kernel against them (the lease runner does)."""
    _fused_grads.append(False)
    try:
        yield
    finally:
        _fused_grads.pop()


def _grads_shape(weight: torch.Tensor, stride: int, padding: int) -> bool:
    """The convs :func:`conv_grads` computes: 3x3, stride 1, padding 1, at most 64 output channels."""
    return tuple(weight.shape[2:]) == (3, 3) and stride == 1 and padding == 1 and weight.shape[0] <= GRADS_MAX_K


def grads_fusable(weight: torch.Tensor, stride: int, padding: int) -> bool:
    """Whether a conv's gradients take :func:`conv_grads` (its shape, outside :func:`separate_grads`)."""
    return _fused_grads[-1] and _grads_shape(weight, stride, padding)


class _GradsPlan(NamedTuple):
    out_shape: tuple[int, ...]
    out_stride: tuple[int, ...]
    grid: tuple[int, int]
    part_numel: int
    counter_numel: int
    ints: tuple[int, ...]
    meta: dict


def _grads_group(programs: int) -> int:
    """Programs per group of the fused gradients' two-level sums (kernels/conv.py, _conv_grads_kernel): the
    power of two at or above sqrt(programs), which makes both levels about as long, at most 16."""
    return _block(math.isqrt(programs - 1) + 1, 2, 16)


@functools.lru_cache(maxsize=None)
def _plan_grads(dy_shape, dy_stride, x_shape, x_stride, w_shape, w_stride, g_stride, dtype, device_type, tf32,
                num_sms, cc, x_prologue, epilogue, has_residual) -> _GradsPlan:
    N, K, H, W = dy_shape
    itemsize = dtype.itemsize
    C = x_shape[1]
    M = N * H * W
    out_shape, out_stride = conv_output_layout(dy_shape, dy_stride, w_shape, 1, 1, True, (H, W))
    n_cols = _cdiv(C, GRADS_BLOCK_N)
    n_tiles = _cdiv(M, GRADS_BLOCK_M)
    # Persistent programs, at most one per SM (8 warps at 168 registers: one fits an SM's register file).
    # Each keeps its partial dW in registers over its row tiles and writes it once; the last program reads
    # them all back. On small activations (a ResNet's last stage) fewer programs keep those partials within
    # half the activation bytes the launch reads.
    partial_bytes = 2 * 9 * K * GRADS_BLOCK_N * 4  # per program: written, then read back
    budget = M * (K + C) * itemsize // (2 * partial_bytes)
    # At most num_sms programs in all (floor: a second wave of a few programs would double the launch).
    programs = max(1, min(n_tiles, num_sms // n_cols, _cdiv(budget, n_cols)))
    group = _grads_group(programs)
    rows, counter_numel = _finalize_layout(programs, group, n_cols)
    part_numel = n_cols * rows * 9 * K * GRADS_BLOCK_N + (2 * rows * C if epilogue == EPI_RELU_GRAD else 0)
    ints = (H, W, C, K, M, *dy_stride, *x_stride, *out_stride, *w_stride, *g_stride)
    meta = dict(X_PROLOGUE=x_prologue, EPILOGUE=epilogue, HAS_RESIDUAL=has_residual,
                DOT_PRECISION="tf32" if tf32 else "ieee", UPCAST_DOT=_upcast_dot(dtype, device_type),
                IDX64=_needs_int64((dy_shape, dy_stride), (x_shape, x_stride), (out_shape, out_stride)),
                BLOCK_M=GRADS_BLOCK_M, BLOCK_N=GRADS_BLOCK_N, BLOCK_K=16, BLOCK_KW=GRADS_MAX_K,
                BLOCK_T=group, BLOCK_E=GRADS_FINAL_ELEMENTS // group, num_warps=GRADS_NUM_WARPS,
                # Triton's default 3 stages pipeline the data gradient's tap loop (cp.async): one persistent
                # program per SM has no other programs to hide its load latency behind.
                maxnreg=kernels.maxnreg_for("_conv_grads_kernel", cc))
    return _GradsPlan(out_shape, out_stride, (programs, n_cols), part_numel, counter_numel, ints, meta)


def conv_grads(dy: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, *, dy2: torch.Tensor,
               dy_pro: torch.Tensor, x_pro: torch.Tensor | None = None, epilogue: int = EPI_NONE,
               ey: torch.Tensor | None = None, bn: BatchNormArgs | None = None, stats: torch.Tensor | None = None,
               residual: torch.Tensor | None = None):
    """dX and dW of ``conv2d(X', weight)`` (3x3, stride 1, padding 1: see :func:`grads_fusable`) for the
    output gradient dY' = BN backward of ``dy`` (``dy2``: the BN input, ``dy_pro``: its packed backward
    coefficients), in one launch that reads dY once. X' is ``x`` through BatchNorm + ReLU with packed
    statistics ``x_pro`` if given. dX gets :func:`conv`'s transposed epilogue: ``EPI_RELU_GRAD`` (``ey``,
    ``bn``, ``stats``) or ``+ residual``. Returns ``(dx, extra, dweight)``, ``extra`` as :func:`conv`'s;
    dweight is in the weight's own memory format."""
    if not _grads_shape(weight, 1, 1):
        raise ValueError(f"conv_grads: needs a 3x3 weight with at most {GRADS_MAX_K} output channels, got shape "
                         f"{tuple(weight.shape)}")
    if x.shape[0] != dy.shape[0] or x.shape[2:] != dy.shape[2:] or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv_grads: x has shape {tuple(x.shape)}, expected ({dy.shape[0]}, {weight.shape[1]}, "
                         f"{dy.shape[2]}, {dy.shape[3]}) for dy of shape {tuple(dy.shape)}")
    check_same_layout("conv_grads: dy2", dy2, dy)
    device = dy.device
    dtype = x.dtype
    grad = torch.empty_like(weight)
    plan = _plan_grads(tuple(dy.shape), dy.stride(), tuple(x.shape), x.stride(), tuple(weight.shape),
                       weight.stride(), grad.stride(), dtype, device.type, dot_precision(dtype, device) == "tf32",
                       _num_sms(device), _compute_capability(device), PRO_BN_RELU if x_pro is not None else PRO_NONE,
                       epilogue, residual is not None)
    out = _planned_output(plan, dtype, device, "conv_grads", ey, residual)
    unused = _unused(device)
    ws = _workspace(device)
    part, counter = ws.partials(plan.part_numel), ws.counters(plan.counter_numel)
    extra = None
    coef = dweight = dbias = bn_weight = unused
    if epilogue == EPI_RELU_GRAD:
        extra = _empty_coefs(bn.weight)
        (coef, dweight, dbias), bn_weight = extra, bn.weight
    launch(kernels._conv_grads_kernel, plan.grid,
           dy, dy2, dy_pro, weight, x, unused if x_pro is None else x_pro, out, grad,
           out if residual is None else residual, out if ey is None else ey,
           bn_weight, unused if stats is None else stats, coef, dweight, dbias, part, counter,
           *plan.ints, **plan.meta)
    return out, extra, grad


# ------------------------------------------------------------------ elementwise tail

class _TailPlan(NamedTuple):
    grid: tuple[int, int]
    ints: tuple[int, ...]  # N, H, W, C
    meta: dict
    part_numel: int  # the backward's partial sums, per tile and per group
    counter_numel: int


def _tail_tiles(C: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, SUB_M) of the elementwise row kernels: ``TAIL_ELEMENTS`` per program, a loop step
    of one 128-bit access per thread and tensor."""
    block_c = _block(C, 1, 64)
    block_m = max(16, min(256, TAIL_ELEMENTS // block_c))
    return block_m, block_c, max(1, min(block_m, NUM_WARPS * 32 * TAIL_STEP_BYTES // itemsize // block_c))


def _partial_rows(block_m: int, rows: int, n_cols: int, num_sms: int) -> int:
    """The row tile of a row kernel that writes partials: ``block_m`` doubled up to TAIL_PARTIAL_MAX_M while
    the launch keeps TAIL_PARTIAL_PROGRAMS_PER_SM programs per SM (never smaller than ``block_m``)."""
    while (block_m * 2 <= TAIL_PARTIAL_MAX_M
           and _cdiv(rows, block_m * 2) * n_cols >= TAIL_PARTIAL_PROGRAMS_PER_SM * num_sms):
        block_m *= 2
    return block_m


@functools.lru_cache(maxsize=None)
def _plan_tail(shape, itemsize, residual_mode, backward, pool, relu, num_sms, *layouts) -> _TailPlan:
    """``itemsize``: bytes per activation element; ``backward``: plan ``_bn_relu_backward_kernel`` (else the
    apply kernel); ``pool``: 2 for a 2x2 max-pool after the ReLU, else 0; ``num_sms``: the device's (the
    backward's row tiles); ``layouts``: the (shape, strides) of every tensor the kernel addresses."""
    N, C, H, W = shape
    block_m, block_c, sub_m = _tail_tiles(C, itemsize)
    rows = N * H * W
    if pool:  # a row is a pooled pixel, four of y's: a quarter of the rows per tile (each step still loads
        # one 128-bit access per thread and window element)
        block_m, rows = max(16, block_m // 4), N * (H // 2) * (W // 2)
    n_cols = _cdiv(C, block_c)
    if backward:
        block_m = _partial_rows(block_m, rows, n_cols, num_sms)
    n_tiles = _cdiv(rows, block_m)
    meta = dict(RESIDUAL=residual_mode, POOL=pool, RELU=relu, IDX64=_needs_int64(*layouts), BLOCK_M=block_m,
                BLOCK_C=block_c, SUB_M=min(sub_m, block_m), num_warps=NUM_WARPS)
    part_numel = counter_numel = 0
    if backward:
        # A BatchNorm'd residual finalizes three arrays: half the partials per load keeps it at 74-78 registers
        # with no stack frame on sm_90 (with the usual count, 80 and an 8 B frame in two 16-bit variants).
        meta.update(BLOCK_T=_finalize_block_t(n_tiles, block_c * (2 if residual_mode == RES_BN else 1)),
                    maxnreg=None if residual_mode == RES_BN or pool else TAIL_BACKWARD_MAXNREG)
        rows, counter_numel = _finalize_levels(n_tiles, meta["BLOCK_T"], n_cols)
        part_numel = (3 if residual_mode == RES_BN else 2) * rows * C
    return _TailPlan((n_tiles, n_cols), (N, H, W, C), meta, part_numel, counter_numel)


def _residual_mode(residual, residual_stats) -> int:
    return RES_NONE if residual is None else (RES_BN if residual_stats is not None else RES_TENSOR)


def bn_relu_apply(y: torch.Tensor, stats: torch.Tensor, residual: torch.Tensor | None = None,
                  residual_stats: torch.Tensor | None = None, pool: int = 0, after_relu: bool = False,
                  relu: bool = True) -> torch.Tensor:
    """relu(y * scale + shift + residual), the residual through its own BN (packed stats) if given;
    ``after_relu``: relu(y * scale + shift) + residual (a tensor); ``pool`` 2 (no residual; y's height and
    width even): its 2x2 stride-2 max-pool instead, in y's memory format; ``relu`` False (neither): no ReLU."""
    res = y if residual is None else residual
    mode = RES_AFTER_RELU if after_relu else _residual_mode(residual, residual_stats)
    if pool:
        n, c, h, w = y.shape
        out = torch.empty((n, c, h // 2, w // 2), dtype=y.dtype, device=y.device, memory_format=memory_format_of(y))
    else:
        out = torch.empty_like(y)
    plan = _plan_tail(tuple(y.shape), y.element_size(), mode, False, pool, relu, 0,
                      (tuple(y.shape), y.stride()),
                      (tuple(res.shape), res.stride()))
    launch(kernels._bn_relu_apply_kernel, plan.grid,
           y, res, out, stats, _unused(y.device) if residual_stats is None else residual_stats,
           *plan.ints, *y.stride(), *res.stride(), *out.stride(), **plan.meta)
    return out


class _RowsPlan(NamedTuple):
    grid: tuple[int, int]
    ints: tuple[int, ...]  # N, H, W, C
    meta: dict
    part_numel: int
    counter_numel: int


@functools.lru_cache(maxsize=None)
def _plan_rows(shape, itemsize, stats, num_sms, *layouts) -> _RowsPlan:
    """The tail kernels' tiling for the standalone BatchNorm kernels: ``_bn_stats_kernel`` (``stats``: its
    finalize's partials and counters, and num_batches_tracked's counter; row tiles by ``num_sms``) or
    ``_bn_grad_apply_kernel``."""
    N, C, H, W = shape
    block_m, block_c, sub_m = _tail_tiles(C, itemsize)
    n_cols = _cdiv(C, block_c)
    if stats:
        block_m = _partial_rows(block_m, N * H * W, n_cols, num_sms)
    n_tiles = _cdiv(N * H * W, block_m)
    meta = dict(IDX64=_needs_int64(*layouts), BLOCK_M=block_m, BLOCK_C=block_c, SUB_M=sub_m, num_warps=NUM_WARPS)
    part_numel = counter_numel = 0
    if stats:
        meta["BLOCK_T"] = _finalize_block_t(n_tiles, block_c)
        rows, counter_numel = _finalize_levels(n_tiles, meta["BLOCK_T"], n_cols)
        part_numel, counter_numel = 2 * rows * C, counter_numel + 1
    return _RowsPlan((n_tiles, n_cols), (N, H, W, C), meta, part_numel, counter_numel)


def bn_stats(x: torch.Tensor, bn: BatchNormArgs) -> torch.Tensor:
    """Training-mode BatchNorm statistics of ``x`` (packed ``[4, C]``: scale, shift, mean, invstd), the running
    statistics updated in place, in one launch: a BatchNorm whose input no fused conv produced."""
    device = x.device
    plan = _plan_rows(tuple(x.shape), x.element_size(), True, _num_sms(device), (tuple(x.shape), x.stride()))
    track, cumulative = _bn_flags(bn)
    ws = _workspace(device)
    stats = torch.empty((4, x.shape[1]), dtype=torch.float32, device=device)
    unused = _unused(device)
    launch(kernels._bn_stats_kernel, plan.grid,
           x, ws.partials(plan.part_numel), ws.counters(plan.counter_numel), stats, bn.weight, bn.bias,
           bn.running_mean if track else unused, bn.running_var if track else unused,
           bn.num_batches_tracked if track else unused,
           *plan.ints, *x.stride(), 0.0 if bn.momentum is None else float(bn.momentum), float(bn.eps),
           TRACK=track, CUMULATIVE=cumulative, **plan.meta)
    return stats


def bn_grad_apply(g: torch.Tensor, y: torch.Tensor, coefs: torch.Tensor,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm's input gradient ``g * coef_g + y * coef_y + coef_c [+ residual]`` (``coefs``: packed
    ``[3, C]``), in y's layout; ``g`` and the residual must have it."""
    check_same_layout("bn_grad_apply: g", g, y)
    if residual is not None:
        check_same_layout("bn_grad_apply: the residual", residual, y)
    plan = _plan_rows(tuple(y.shape), y.element_size(), False, 0, (tuple(y.shape), y.stride()))
    out = torch.empty_like(y)
    launch(kernels._bn_grad_apply_kernel, plan.grid,
           g, y, y if residual is None else residual, coefs, out, *plan.ints, *y.stride(),
           HAS_RESIDUAL=residual is not None, **plan.meta)
    return out


def bn_relu_backward(dout: torch.Tensor, y: torch.Tensor, stats: torch.Tensor, bn_weight: torch.Tensor,
                     residual: torch.Tensor | None = None, residual_stats: torch.Tensor | None = None,
                     residual_bn_weight: torch.Tensor | None = None, pool: int = 0, relu: bool = True):
    """g = dout * relu'(pre-activation), and the backward of the tail's BatchNorm(s); ``pool`` 2: ``dout``
    is the gradient of :func:`bn_relu_apply`'s pooled output, routed to each window's max.

    Returns ``(g, coefs, residual_coefs)``, ``residual_coefs`` None unless the
    residual has its own BatchNorm.
    """
    device = y.device
    mode = _residual_mode(residual, residual_stats)
    res = y if residual is None else residual
    plan = _plan_tail(tuple(y.shape), y.element_size(), mode, True, pool, relu, _num_sms(device),
                      (tuple(y.shape), y.stride()),
                      (tuple(res.shape), res.stride()),
                      (tuple(dout.shape), dout.stride()))
    C = y.shape[1]
    g = torch.empty_like(y)
    ws = _workspace(device)
    part = ws.partials(plan.part_numel)
    counter = ws.counters(plan.counter_numel)
    n_bn = 2 if mode == RES_BN else 1
    coef = torch.empty((n_bn, 3, C), dtype=torch.float32, device=device)
    coefs = BackwardCoefs(coef[0], *_param_grads(bn_weight))
    res_coefs = BackwardCoefs(coef[1], *_param_grads(residual_bn_weight)) if n_bn == 2 else None
    unused = _unused(device)
    launch(kernels._bn_relu_backward_kernel, plan.grid,
           dout, y, res, g, stats, unused if residual_stats is None else residual_stats,
           bn_weight, coefs.packed, coefs.dweight, coefs.dbias,
           *((residual_bn_weight, *res_coefs) if res_coefs is not None else (unused,) * 4),
           part, counter, *plan.ints, *dout.stride(), *y.stride(), *res.stride(), **plan.meta)
    return g, coefs, res_coefs
