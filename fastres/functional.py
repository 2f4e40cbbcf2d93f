"""Fused ``conv -> BatchNorm2d -> ReLU`` and the fused residual block.

Functional forms take the plain modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
the block) so parameters, buffers and their semantics are exactly PyTorch's:
``conv_bn_relu(x, conv, bn)`` and ``residual_block(x, block)``.

How BatchNorm is split across launches (training; see ``kernels/conv.py``).
A reduction across programs (BatchNorm's statistics, a weight gradient's
splits) is finished in the same launch by the last program to arrive::

    forward   conv1 (+ BN1 statistics and running statistics)
              conv2 (BN1 + ReLU applied as its operand loads; + BN2 statistics)
              [downsample conv (+ its BN's statistics)]
              tail: relu(BN2(y2) + residual)                    3 launches (4 with downsample)
    backward  tail: g = dout * relu', BN2's (and BNd's) backward coefficients and parameter grads
              conv2 data grad (BN2 backward in its operand loads; ReLU1 mask and BN1's backward in its epilogue)
              conv2 weight grad (BN2 backward and BN1 + ReLU recomputed in its operand loads)
              conv1 data grad (+ residual grad in its epilogue); conv1 weight grad
                                                                5 launches (7 with downsample)

Saved for backward: the block input, the raw conv outputs y1, y2 (and the
downsample's) and per-channel vectors; the normalised activations and the
block output are recomputed where needed. Weight gradients are written in the
weight's own memory format, so autograd never copies them.

Eval mode folds BatchNorm into each conv's epilogue (scale and shift per
output channel computed inside the conv from the current running statistics,
so nothing can go stale when an optimizer writes weights in place), with
residual and ReLU in the last conv's epilogue. Eval-mode calls that need
gradients run the reference ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ._backend import KERNEL_DTYPES, uses_kernels
from .launchers import conv as L
from .reference.nn import ResidualBlock as PlainResidualBlock

__all__ = ["conv_bn_relu", "residual_block"]


class _BN(NamedTuple):
    """How a BatchNorm2d takes part: its kernel arguments and mode."""

    args: L.BatchNormArgs
    batch_stats: bool  # training, or no running statistics to use
    update: bool  # training and tracking: update the running statistics


def _bn_config(bn: nn.BatchNorm2d, where: str) -> _BN:
    if not bn.affine:
        raise ValueError(f"{where}: BatchNorm2d(affine=False) is not supported by the fused op")
    # Read the dicts behind nn.Module.__getattr__ directly: this runs on every call.
    params, buffers = bn._parameters, bn._buffers
    update = bn.training and bn.track_running_stats
    running_mean = buffers.get("running_mean")
    if update and buffers.get("num_batches_tracked") is None:
        raise ValueError(f"{where}: a BatchNorm2d that tracks running statistics needs num_batches_tracked")
    batch_stats = bn.training or running_mean is None
    keep_running = update or not batch_stats
    args = L.BatchNormArgs(params["weight"], params["bias"], running_mean if keep_running else None,
                           buffers["running_var"] if keep_running else None,
                           buffers["num_batches_tracked"] if update else None, bn.momentum, bn.eps)
    return _BN(args, batch_stats, update)


def _conv_config(conv: nn.Conv2d, in_channels: int, where: str) -> tuple[int, int]:
    """(stride, padding) of a conv the kernels take; a clear error otherwise."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{where}: expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.in_channels != in_channels:
        raise ValueError(f"{where}: the input has {in_channels} channels but the conv expects {conv.in_channels}")
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (needs 1)")
    if conv.dilation != (1, 1):
        problems.append(f"dilation={conv.dilation} (needs 1)")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        problems.append(f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r} (needs integer zero padding)")
    if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        problems.append(f"stride={conv.stride}, padding={conv.padding} (needs the same value for height and width)")
    if conv._parameters.get("bias") is not None:
        problems.append("bias=True (BatchNorm cancels a conv bias; build the conv with bias=False)")
    if problems:
        raise ValueError(f"{where}: unsupported conv: " + "; ".join(problems))
    return conv.stride[0], conv.padding[0]


def _check_input(x: torch.Tensor, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{where}: got an empty input of shape {tuple(x.shape)}")


def _check_devices(where: str, x: torch.Tensor, *modules: nn.Module) -> None:
    """Every parameter and buffer the kernels read is on x's device (a clear error otherwise)."""
    device = x.device
    for module in modules:
        for name, t in module._parameters.items():
            if t is not None and t.device != device:
                raise RuntimeError(f"{where}: input is on {device} but {type(module).__name__}.{name} is on {t.device}")
        for name, t in module._buffers.items():
            if t is not None and t.device != device:
                raise RuntimeError(f"{where}: input is on {device} but {type(module).__name__}.{name} is on {t.device}")


def _check_batch(bn: _BN, y_shape: torch.Size) -> None:
    """The error nn.BatchNorm2d gives when a channel has one value in training."""
    if bn.batch_stats and y_shape[0] * y_shape[2] * y_shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y_shape}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The activation dtype: autocast's when it is on (as cuDNN convs would run), else x's."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class ConvBNReLUFunction(torch.autograd.Function):
    """Training-mode ``relu(batch_norm(conv2d(x, weight)))`` with batch statistics."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, stride: int, padding: int, bn: L.BatchNormArgs):
        y, stats = L.conv(x, weight, stride, padding, dtype=x.dtype, epilogue=L.EPI_STATS, bn=bn)
        out = L.bn_relu_apply(y, stats)
        ctx.save_for_backward(x, weight, bn_weight, y, stats)
        ctx.conv = (stride, padding)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bn_weight, y, stats = ctx.saved_tensors
        stride, padding = ctx.conv
        g, coefs, _ = L.bn_relu_backward(dout, y, stats, bn_weight)
        dx = None
        if ctx.needs_input_grad[0]:
            dx, _ = L.conv(g, weight, stride, padding, dtype=x.dtype, transposed=True, out_hw=tuple(x.shape[2:]),
                           prologue=L.PRO_BN_GRAD, a2=y, pro=coefs.packed)
        dweight = L.conv_wgrad(g, x, weight, stride, padding, dy2=y, dy_pro=coefs.packed)
        return dx, dweight, coefs.dweight, coefs.dbias, None, None, None


class ResidualBlockFunction(torch.autograd.Function):
    """Training-mode residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + residual)``.

    ``residual`` is ``x`` or ``bnd(convd(x))`` when the downsample weights are given.
    """

    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, wd, gd, bd, stride: int,
                bns: tuple[L.BatchNormArgs, L.BatchNormArgs, Optional[L.BatchNormArgs]]):
        dtype = x.dtype
        bn1, bn2, bnd = bns
        y1, s1 = L.conv(x, w1, stride, 1, dtype=dtype, epilogue=L.EPI_STATS, bn=bn1)
        y2, s2 = L.conv(y1, w2, 1, 1, dtype=dtype, prologue=L.PRO_BN_RELU, pro=s1, epilogue=L.EPI_STATS, bn=bn2)
        if wd is not None:
            yd, sd = L.conv(x, wd, stride, 1, dtype=dtype, epilogue=L.EPI_STATS, bn=bnd)
            out = L.bn_relu_apply(y2, s2, yd, sd)
            ctx.save_for_backward(x, w1, g1, y1, s1, w2, g2, y2, s2, wd, gd, yd, sd)
        else:
            out = L.bn_relu_apply(y2, s2, x)
            ctx.save_for_backward(x, w1, g1, y1, s1, w2, g2, y2, s2)
        ctx.stride = stride
        ctx.bn1 = bn1
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        x, w1, g1, y1, s1, w2, g2, y2, s2 = saved[:9]
        has_down = len(saved) > 9
        stride = ctx.stride
        dtype = x.dtype
        if has_down:
            wd, gd, yd, sd = saved[9:]
            g, coefs2, coefs_d = L.bn_relu_backward(dout, y2, s2, g2, yd, sd, gd)
        else:
            g, coefs2, _ = L.bn_relu_backward(dout, y2, s2, g2, x)
        # dL/d(y1) through conv2: BN2 backward on load, ReLU1 mask and BN1's backward in the epilogue.
        g1_masked, coefs1 = L.conv(g, w2, 1, 1, dtype=dtype, transposed=True, out_hw=tuple(y1.shape[2:]),
                                   prologue=L.PRO_BN_GRAD, a2=y2, pro=coefs2.packed, epilogue=L.EPI_RELU_GRAD,
                                   ey=y1, bn=ctx.bn1, stats=s1)
        dw2 = L.conv_wgrad(g, y1, w2, 1, 1, dy2=y2, dy_pro=coefs2.packed, x_pro=s1)
        dwd = dgd = dbd = None
        residual_grad = g
        if has_down:
            dwd = L.conv_wgrad(g, x, wd, stride, 1, dy2=yd, dy_pro=coefs_d.packed)
            dgd, dbd = coefs_d.dweight, coefs_d.dbias
            residual_grad = None
            if ctx.needs_input_grad[0]:
                residual_grad, _ = L.conv(g, wd, stride, 1, dtype=dtype, transposed=True, out_hw=tuple(x.shape[2:]),
                                          prologue=L.PRO_BN_GRAD, a2=yd, pro=coefs_d.packed)
        dx = None
        if ctx.needs_input_grad[0]:
            dx, _ = L.conv(g1_masked, w1, stride, 1, dtype=dtype, transposed=True, out_hw=tuple(x.shape[2:]),
                           prologue=L.PRO_BN_GRAD, a2=y1, pro=coefs1.packed, residual=residual_grad)
        dw1 = L.conv_wgrad(g1_masked, x, w1, stride, 1, dy2=y1, dy_pro=coefs1.packed)
        return (dx, dw1, coefs1.dweight, coefs1.dbias, dw2, coefs2.dweight, coefs2.dbias, dwd, dgd, dbd,
                None, None)


def _needs_grad(x: torch.Tensor, *modules: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))


def _prepare(x: torch.Tensor, where: str) -> tuple[torch.Tensor, bool]:
    """Cast to the compute dtype; say whether the kernels take it."""
    _check_input(x, where)
    dtype = _compute_dtype(x)
    if dtype not in KERNEL_DTYPES or not uses_kernels(x):
        return x, False
    return x.to(dtype), True


def _eval_conv(x, conv_weight, stride, padding, bn: _BN, dtype, **epilogue):
    out, _ = L.conv(x, conv_weight, stride, padding, dtype=dtype, affine=bn.args, **epilogue)
    return out


# torch.compile runs the fused ops as they are (a graph break around each), so
# compiled models get the same kernels and numbers as eager ones.
@torch.compiler.disable
def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(bn(conv(x)))``, fused; exactly ``nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU``
    (outputs, gradients, running statistics) in training and eval mode.

    Tensors that take no kernel (see :func:`fastres.backend_for`), and eval-mode
    calls that need gradients, run the PyTorch ops.
    """
    where = "conv_bn_relu"
    x_in = x
    x, fused = _prepare(x, where)
    stride, padding = _conv_config(conv, x.shape[1], where)
    if type(bn) is not nn.BatchNorm2d:  # e.g. SyncBatchNorm: its statistics span processes
        return torch.relu(bn(conv(x_in)))
    bn_cfg = _bn_config(bn, where)
    _check_devices(where, x, conv, bn)
    if not fused or (not bn_cfg.batch_stats and _needs_grad(x, conv, bn)):
        return torch.relu(bn(conv(x_in)))
    out_hw = (L.out_size(x.shape[2], conv.kernel_size[0], stride, padding),
              L.out_size(x.shape[3], conv.kernel_size[1], stride, padding))
    if not bn_cfg.batch_stats:
        return _eval_conv(x, conv.weight, stride, padding, bn_cfg, x.dtype, relu=True)
    _check_batch(bn_cfg, torch.Size((x.shape[0], conv.out_channels, *out_hw)))
    return ConvBNReLUFunction.apply(x, conv.weight, bn.weight, bn.bias, stride, padding, bn_cfg.args)


@torch.compiler.disable
def residual_block(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """The notes' residual block (``fastres.nn.ResidualBlock`` or the reference
    one), fused: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + residual)``."""
    where = f"{type(block).__name__}"
    x_in = x
    x, fused = _prepare(x, where)
    children = block._modules  # not nn.Module.__getattr__: this runs on every call
    conv1, bn1_module, conv2, bn2_module = children["conv1"], children["bn1"], children["conv2"], children["bn2"]
    down = children.get("downsample")
    norms = [bn1_module, bn2_module] + ([down[1]] if isinstance(down, nn.Sequential) and len(down) == 2 else [])
    if any(type(bn) is not nn.BatchNorm2d for bn in norms):  # e.g. SyncBatchNorm: statistics span processes
        return _reference_block(block, x_in)
    if down is not None and not (isinstance(down, nn.Sequential) and len(down) == 2):
        raise ValueError(f"{where}: downsample must be nn.Sequential(conv, BatchNorm2d), got {down!r}")
    stride, padding = _conv_config(conv1, x.shape[1], f"{where}.conv1")
    width = conv1.out_channels
    stride2, padding2 = _conv_config(conv2, width, f"{where}.conv2")
    bn1, bn2 = _bn_config(bn1_module, f"{where}.bn1"), _bn_config(bn2_module, f"{where}.bn2")
    bnd = None
    if down is not None:
        if _conv_config(down[0], x.shape[1], f"{where}.downsample.0") != (stride, padding):
            raise ValueError(f"{where}: the downsample conv must have conv1's stride and padding")
        bnd = _bn_config(down[1], f"{where}.downsample.1")
    shapes = (conv1.kernel_size, conv2.kernel_size, padding, padding2, stride2)
    if shapes != ((3, 3), (3, 3), 1, 1, 1) or (down is not None and down[0].kernel_size != (3, 3)):
        raise ValueError(f"{where}: the fused block needs 3x3 convs with padding 1 (conv2 stride 1), got kernel sizes "
                         f"{conv1.kernel_size}, {conv2.kernel_size}, paddings {padding}, {padding2}, "
                         f"conv2 stride {stride2}")
    if down is None and (stride != 1 or x.shape[1] != width):
        raise ValueError(f"{where}: an identity residual needs stride 1 and {width} input channels, "
                         f"got stride {stride} and input shape {tuple(x.shape)}")
    _check_devices(where, x, conv1, bn1_module, conv2, bn2_module, *(down if down is not None else ()))
    if not fused or (not bn1.batch_stats and _needs_grad(x, block)):
        return _reference_block(block, x_in)
    if not bn1.batch_stats:
        if not (bn1.batch_stats == bn2.batch_stats == (bnd.batch_stats if bnd else bn1.batch_stats)):
            return _reference_block(block, x_in)
        dtype = x.dtype
        h1 = _eval_conv(x, conv1._parameters["weight"], stride, 1, bn1, dtype, relu=True)
        residual = x if down is None else _eval_conv(x, down[0]._parameters["weight"], stride, 1, bnd, dtype)
        return _eval_conv(h1, conv2._parameters["weight"], 1, 1, bn2, dtype, residual=residual, relu=True)
    if not (bn2.batch_stats and (bnd is None or bnd.batch_stats)):
        return _reference_block(block, x_in)
    out_hw = L.out_size(x.shape[2], 3, stride, 1), L.out_size(x.shape[3], 3, stride, 1)
    _check_batch(bn1, torch.Size((x.shape[0], width, *out_hw)))
    wd, gd, bd = ((down[0]._parameters["weight"], bnd.args.weight, bnd.args.bias) if down is not None
                  else (None, None, None))
    bns = (bn1.args, bn2.args, bnd.args if bnd is not None else None)
    return ResidualBlockFunction.apply(x, conv1._parameters["weight"], bn1.args.weight, bn1.args.bias,
                                       conv2._parameters["weight"], bn2.args.weight, bn2.args.bias, wd, gd, bd,
                                       stride, bns)


def _reference_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain block's forward (the PyTorch ops), for inputs the kernels do not take."""
    return PlainResidualBlock.forward(block, x)
