"""Launchers of the conv + BatchNorm + ReLU kernels (``kernels/conv.py``).

Tensors are logical NCHW with any strides; outputs follow the input's memory
format (channels_last in, channels_last out, as ``nn.Conv2d`` does). Per-channel
vectors (scale, shift, mean, invstd, coefficients) are fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton

from ..kernels import conv as kernels
from .core import launch

PRO_NONE, PRO_BN_RELU, PRO_BN_GRAD = kernels.PRO_NONE, kernels.PRO_BN_RELU, kernels.PRO_BN_GRAD
EPI_NONE, EPI_STATS, EPI_RELU_GRAD = kernels.EPI_NONE, kernels.EPI_STATS, kernels.EPI_RELU_GRAD
RES_NONE, RES_TENSOR, RES_BN = kernels.RES_NONE, kernels.RES_TENSOR, kernels.RES_BN

CONV_BLOCK_M = 64
WGRAD_BLOCK_P = 64
SPLITS_BLOCK = 1024
FINALIZE_ELEMENTS = 4096  # per loop iteration of a finalize program: BLOCK_T x BLOCK_C
NUM_WARPS = 4


class Affine(NamedTuple):
    """Per-channel ``v * scale + shift`` (and ``yscale`` for the BN-gradient prologue)."""

    scale: torch.Tensor
    shift: torch.Tensor
    yscale: Optional[torch.Tensor] = None


class BatchStats(NamedTuple):
    """What BatchNorm's forward leaves for the rest of the block: fp32 [C] each."""

    scale: torch.Tensor  # weight * invstd
    shift: torch.Tensor  # bias - mean * scale
    mean: torch.Tensor
    invstd: torch.Tensor


class BackwardCoefs(NamedTuple):
    """BatchNorm backward: ``dy = g * coef_g + y * coef_y + coef_c``, and its parameter grads."""

    coef_g: torch.Tensor
    coef_y: torch.Tensor
    coef_c: torch.Tensor
    dweight: torch.Tensor
    dbias: torch.Tensor

    def prologue(self) -> Affine:
        return Affine(self.coef_g, self.coef_c, self.coef_y)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the channels of a pixel are contiguous, else contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def check_same_layout(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """Kernels address ``t`` with ``like``'s strides: they must agree wherever a
    dimension has more than one element (a size-1 dimension's stride is never used)."""
    if t.shape != like.shape or any(a != b for a, b, n in zip(t.stride(), like.stride(), t.shape) if n > 1):
        raise ValueError(f"{name} has shape {tuple(t.shape)} and strides {t.stride()}, "
                         f"expected {tuple(like.shape)} with strides {like.stride()}")


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 convs use TF32 on the GPU when cuDNN's convs would (torch's default)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """The interpreter's bf16 tl.dot is broken (triton 3.9): multiply the bf16 values in fp32 there."""
    return dtype == torch.bfloat16 and device.type == "cpu"


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


_placeholders: dict[torch.device, torch.Tensor] = {}


def _unused(device: torch.device) -> torch.Tensor:
    """A pointer for arguments a kernel variant never reads."""
    if device not in _placeholders:
        _placeholders[device] = torch.empty(1, dtype=torch.float32, device=device)
    return _placeholders[device]


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv(a: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, *, dtype: torch.dtype,
         transposed: bool = False, out_hw: tuple[int, int] | None = None,
         prologue: int = PRO_NONE, a2: torch.Tensor | None = None, pro: Affine | None = None,
         epilogue: int = EPI_NONE, ey: torch.Tensor | None = None, epi: BatchStats | None = None,
         affine: Affine | None = None, residual: torch.Tensor | None = None, relu: bool = False,
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One implicit-GEMM convolution launch; returns ``(out, part0, part1)``.

    Forward (``transposed=False``): out = conv2d(A', weight) with A' the
    prologue of ``a``. Data gradient (``transposed=True``): ``a`` is dY and out
    is dX of spatial size ``out_hw``. ``affine`` scales and shifts each output
    channel (eval-mode BatchNorm folded into the conv), then ``residual`` is
    added and ``relu`` applied. ``epilogue`` picks the per-tile partials.
    """
    N, CA, HA, WA = a.shape
    K, C, R, S = weight.shape
    CO = C if transposed else K
    if transposed:
        HO, WO = out_hw
    else:
        HO, WO = out_size(HA, R, stride, padding), out_size(WA, S, stride, padding)
    device = a.device
    out = torch.empty((N, CO, HO, WO), dtype=dtype, device=device, memory_format=memory_format_of(a))
    M = N * HO * WO
    n_tiles = triton.cdiv(M, CONV_BLOCK_M)
    part0 = part1 = None
    if epilogue != EPI_NONE:
        part0 = torch.empty((n_tiles, CO), dtype=torch.float32, device=device)
        part1 = torch.empty((n_tiles, CO), dtype=torch.float32, device=device)
    unused = _unused(device)
    a2 = a if a2 is None else a2
    check_same_layout("conv: the prologue's second operand", a2, a)
    ey = out if ey is None else ey
    check_same_layout("conv: the epilogue's BN input", ey, out)
    pro = pro or Affine(unused, unused, unused)
    epi = epi or BatchStats(unused, unused, unused, unused)
    res = residual if residual is not None else out
    sw_o, sw_a = (weight.stride(1), weight.stride(0)) if transposed else (weight.stride(0), weight.stride(1))
    block_n = _block(CO, 16, 64)
    block_k = _block(CA, 16, 64)
    grid = (n_tiles, triton.cdiv(CO, block_n))
    launch(kernels._conv_kernel, grid,
           a, a2, weight, out, res, ey,
           pro.scale, pro.shift, pro.yscale if pro.yscale is not None else unused,
           affine.scale if affine is not None else unused, affine.shift if affine is not None else unused,
           epi.scale, epi.shift, epi.mean, epi.invstd,
           part0 if part0 is not None else unused, part1 if part1 is not None else unused,
           HA, WA, CA, HO, WO, CO, M,
           *a.stride(), *out.stride(), *res.stride(),
           sw_o, sw_a, weight.stride(2), weight.stride(3),
           R=R, S=S, STRIDE=stride, PAD=padding, TRANSPOSED=transposed,
           PROLOGUE=prologue, EPILOGUE=epilogue,
           HAS_AFFINE=affine is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
           DOT_PRECISION=dot_precision(dtype, device), UPCAST_DOT=upcast_dot(dtype, device),
           BLOCK_M=CONV_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS)
    return out, part0, part1


def _finalize_blocks(C: int, n_tiles: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C): a finalize program walks all tiles for its channels,
    so few channels get many tiles per iteration (16 channels: 256 tiles)."""
    block_c = _block(C, 16, 128)
    return _block(n_tiles, 16, FINALIZE_ELEMENTS // block_c), block_c


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewer, larger programs are faster


def conv_wgrad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, *,
               dy2: torch.Tensor | None = None, dy_pro: Affine | None = None,
               x_pro: Affine | None = None) -> torch.Tensor:
    """dW of ``conv2d(x', weight)`` for output gradient dY' (both after their
    prologues): two launches, the split GEMM and the deterministic sum of splits."""
    N, K, P, Q = dy.shape
    _, C, H, W = x.shape
    R, S = weight.shape[2:]
    device = dy.device
    unused = _unused(device)
    M = N * P * Q
    block_k = _block(K, 16, 64)
    block_c = _block(C, 16, 64)
    tiles = R * S * triton.cdiv(K, block_k) * triton.cdiv(C, block_c)
    splits = max(1, min(triton.cdiv(4 * _num_sms(device), tiles), triton.cdiv(M, WGRAD_BLOCK_P)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), WGRAD_BLOCK_P) * WGRAD_BLOCK_P
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty((splits, K, C, R, S), dtype=torch.float32, device=device)
    dy2 = dy if dy2 is None else dy2
    check_same_layout("conv_wgrad: dy2", dy2, dy)
    dy_pro_args = dy_pro or Affine(unused, unused, unused)
    x_pro_args = x_pro or Affine(unused, unused)
    launch(kernels._conv_wgrad_kernel, (tiles, splits),
           dy, dy2, x, part,
           dy_pro_args.scale, dy_pro_args.shift, dy_pro_args.yscale if dy_pro_args.yscale is not None else unused,
           x_pro_args.scale, x_pro_args.shift,
           H, W, C, P, Q, K, M, rows_per_split,
           *dy.stride(), *x.stride(),
           R=R, S=S, STRIDE=stride, PAD=padding,
           DY_PROLOGUE=PRO_BN_GRAD if dy_pro is not None else PRO_NONE,
           X_PROLOGUE=PRO_BN_RELU if x_pro is not None else PRO_NONE,
           DOT_PRECISION=dot_precision(x.dtype, device), UPCAST_DOT=upcast_dot(x.dtype, device),
           BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_P=WGRAD_BLOCK_P, num_warps=NUM_WARPS)
    grad = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    numel = grad.numel()
    launch(kernels._sum_splits_kernel, (triton.cdiv(numel, SPLITS_BLOCK),),
           part, grad, splits, numel, BLOCK=SPLITS_BLOCK, num_warps=NUM_WARPS)
    return grad


def bn_forward_finalize(part_mean: torch.Tensor, part_m2: torch.Tensor, M: int, bn_weight: torch.Tensor,
                        bn_bias: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        num_batches_tracked: torch.Tensor | None, momentum: float | None, eps: float) -> BatchStats:
    """Batch statistics from the conv's partials; updates the running statistics in place."""
    C = part_mean.shape[1]
    device = part_mean.device
    stats = BatchStats(*torch.empty((4, C), dtype=torch.float32, device=device).unbind(0))
    track = running_mean is not None
    cumulative = track and momentum is None
    block_t, block_c = _finalize_blocks(C, part_mean.shape[0])
    grid = (1,) if cumulative else (triton.cdiv(C, block_c),)
    unused = _unused(device)
    launch(kernels._bn_forward_finalize_kernel, grid,
           part_mean, part_m2, bn_weight, bn_bias,
           running_mean if track else unused, running_var if track else unused,
           num_batches_tracked if track else unused,
           *stats, part_mean.shape[0], M, C, 0.0 if momentum is None else float(momentum), float(eps),
           TILE_M=CONV_BLOCK_M, TRACK=track, CUMULATIVE=cumulative,
           BLOCK_T=block_t, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return stats


def bn_eval_affine(bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, eps: float) -> Affine:
    """Eval-mode BatchNorm as a per-channel affine map, for the conv's epilogue."""
    C = bn_weight.shape[0]
    scale, shift = torch.empty((2, C), dtype=torch.float32, device=bn_weight.device).unbind(0)
    block_c = _block(C, 16, 128)
    launch(kernels._bn_eval_affine_kernel, (triton.cdiv(C, block_c),),
           bn_weight, bn_bias, running_mean, running_var, scale, shift, C, float(eps),
           BLOCK_C=block_c, num_warps=NUM_WARPS)
    return Affine(scale, shift)


def bn_backward_finalize(part_g: torch.Tensor, part_gx: torch.Tensor, M: int, bn_weight: torch.Tensor,
                         stats: BatchStats) -> BackwardCoefs:
    C = part_g.shape[1]
    device = part_g.device
    coef_g, coef_y, coef_c = torch.empty((3, C), dtype=torch.float32, device=device).unbind(0)
    dweight = torch.empty(C, dtype=bn_weight.dtype, device=device)
    dbias = torch.empty(C, dtype=bn_weight.dtype, device=device)
    block_t, block_c = _finalize_blocks(C, part_g.shape[0])
    launch(kernels._bn_backward_finalize_kernel, (triton.cdiv(C, block_c),),
           part_g, part_gx, bn_weight, stats.mean, stats.invstd, dweight, dbias, coef_g, coef_y, coef_c,
           part_g.shape[0], M, C, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return BackwardCoefs(coef_g, coef_y, coef_c, dweight, dbias)


def _elementwise_blocks(C: int) -> tuple[int, int]:
    block_c = _block(C, 1, 64)
    return max(16, min(256, 4096 // block_c)), block_c


def bn_relu_apply(y: torch.Tensor, stats: BatchStats, residual: torch.Tensor | None = None,
                  residual_bn: BatchStats | None = None) -> torch.Tensor:
    """relu(y * scale + shift + residual), the residual through its own BN if given."""
    N, C, H, W = y.shape
    out = torch.empty_like(y)
    block_m, block_c = _elementwise_blocks(C)
    res = residual if residual is not None else y
    mode = RES_NONE if residual is None else (RES_BN if residual_bn is not None else RES_TENSOR)
    unused = _unused(y.device)
    rbn = residual_bn or BatchStats(unused, unused, unused, unused)
    launch(kernels._bn_relu_apply_kernel, (triton.cdiv(N * H * W, block_m), triton.cdiv(C, block_c)),
           y, res, out, stats.scale, stats.shift, rbn.scale, rbn.shift, N, H, W, C,
           *y.stride(), *res.stride(),
           RESIDUAL=mode, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return out


def bn_relu_backward(dout: torch.Tensor, y: torch.Tensor, stats: BatchStats, residual: torch.Tensor | None = None,
                     residual_bn: BatchStats | None = None):
    """g = dout * relu'(pre-activation) and BatchNorm's per-tile backward sums.

    Returns ``(g, part_g, part_gx, part_gx_residual)`` (the last None unless
    the residual has its own BatchNorm).
    """
    N, C, H, W = y.shape
    block_m, block_c = _elementwise_blocks(C)
    n_tiles = triton.cdiv(N * H * W, block_m)
    device = y.device
    g = torch.empty_like(y)
    parts = torch.empty((3 if residual_bn is not None else 2, n_tiles, C), dtype=torch.float32, device=device)
    res = residual if residual is not None else y
    mode = RES_NONE if residual is None else (RES_BN if residual_bn is not None else RES_TENSOR)
    unused = _unused(device)
    rbn = residual_bn or BatchStats(unused, unused, unused, unused)
    launch(kernels._bn_relu_backward_kernel, (n_tiles, triton.cdiv(C, block_c)),
           dout, y, res, g, *stats, *rbn, parts[0], parts[1], parts[2] if residual_bn is not None else unused,
           N, H, W, C, *dout.stride(), *y.stride(), *res.stride(),
           RESIDUAL=mode, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return g, parts[0], parts[1], (parts[2] if residual_bn is not None else None)
