"""Fused ``conv -> BatchNorm2d -> ReLU`` and the fused residual block.

Functional forms take the plain modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
the block) so parameters, buffers and their semantics are exactly PyTorch's:
``conv_bn_relu(x, conv, bn)`` and ``residual_block(x, block)``.

How BatchNorm is split across launches (training; see ``kernels/conv.py``).
A reduction across programs (BatchNorm's statistics, a weight gradient's
splits) is finished in the same launch by the last program to arrive::

    forward   conv1 (+ BN1 statistics and running statistics)
                [+ the downsample conv and its BN's, in the same launch: x read once]
              conv2 (BN1 + ReLU applied as its operand loads; + BN2 statistics)
              tail: relu(BN2(y2) + residual)                    3 launches
    backward  tail: g = dout * relu', BN2's (and BNd's) backward coefficients and parameter grads
              conv2 data + weight grad, one pass over g (BN2 backward in its operand loads; BN1 + ReLU
                recomputed for the weight grad; ReLU1 mask and BN1's backward in the data grad's epilogue)
              conv1 data + weight grad, one pass (+ the residual's grad in the data grad's epilogue)
                                                                3 launches
              with a downsample (stride 2): conv1's and the projection's data grads summed in one
                launch, their weight grads in one launch each   5 launches

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
import torch.distributed as dist
from torch import nn

from ._backend import KERNEL_DTYPES, uses_kernels
from . import ops  # noqa: F401  (registers torch.ops.fastres.*)
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
                           buffers["num_batches_tracked"] if update else None,
                           None if bn.momentum is None else float(bn.momentum), float(bn.eps))
    return _BN(args, batch_stats, update)


def _sync_group_name(bn: nn.SyncBatchNorm) -> Optional[str]:
    """The process group an ``nn.SyncBatchNorm`` synchronises over now (None: it acts as BatchNorm2d,
    as in eval mode or a group of one rank)."""
    if not (bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else None


def _bn_group(norms) -> tuple[bool, Optional[str]]:
    """(fusable, process group name) of a fused op's BatchNorms: ``nn.BatchNorm2d``, or
    ``nn.SyncBatchNorm`` (fused with its collectives when it synchronises). Other norms, or BatchNorms
    that disagree on the group, take the PyTorch ops."""
    names = set()
    for bn in norms:
        if type(bn) is nn.SyncBatchNorm:
            names.add(_sync_group_name(bn))
        elif type(bn) is nn.BatchNorm2d:
            names.add(None)
        else:
            return False, None
    if len(names) > 1:
        return False, None
    return True, names.pop()


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


def _needs_grad(x: torch.Tensor, *modules: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))


def _prepare(x: torch.Tensor, where: str) -> tuple[torch.Tensor, bool]:
    """Cast to the compute dtype; say whether the kernels take it."""
    _check_input(x, where)
    dtype = _compute_dtype(x)
    if dtype not in KERNEL_DTYPES or not uses_kernels(x):
        return x, False
    return x.to(dtype), True


def _eval_conv(x, conv_weight, stride, padding, bn: _BN, residual=None, relu=False):
    a = bn.args
    return torch.ops.fastres.conv_bn_eval(x, conv_weight, a.weight, a.bias, a.running_mean, a.running_var, a.eps,
                                          stride, padding, residual, relu)


def _bn_op_args(bn: L.BatchNormArgs) -> tuple:
    """A BatchNorm's arguments of the training ops, in schema order."""
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps


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
    fusable, bn_group = _bn_group((bn,))
    if not fusable:
        return torch.relu(bn(conv(x_in)))
    bn_cfg = _bn_config(bn, where)
    _check_devices(where, x, conv, bn)
    if not fused or (not bn_cfg.batch_stats and _needs_grad(x, conv, bn)):
        return torch.relu(bn(conv(x_in)))
    out_hw = (L.out_size(x.shape[2], conv.kernel_size[0], stride, padding),
              L.out_size(x.shape[3], conv.kernel_size[1], stride, padding))
    if not bn_cfg.batch_stats:
        return _eval_conv(x, conv._parameters["weight"], stride, padding, bn_cfg, relu=True)
    _check_batch(bn_cfg, torch.Size((x.shape[0], conv.out_channels, *out_hw)))
    out, _, _ = torch.ops.fastres.conv_bn_relu(x, conv._parameters["weight"], *_bn_op_args(bn_cfg.args),
                                               stride, padding, bn_group)
    return out


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
    fusable, bn_group = _bn_group(norms)
    if not fusable:
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
        h1 = _eval_conv(x, conv1._parameters["weight"], stride, 1, bn1, relu=True)
        residual = x if down is None else _eval_conv(x, down[0]._parameters["weight"], stride, 1, bnd)
        return _eval_conv(h1, conv2._parameters["weight"], 1, 1, bn2, residual=residual, relu=True)
    if not (bn2.batch_stats and (bnd is None or bnd.batch_stats)):
        return _reference_block(block, x_in)
    out_hw = L.out_size(x.shape[2], 3, stride, 1), L.out_size(x.shape[3], 3, stride, 1)
    _check_batch(bn1, torch.Size((x.shape[0], width, *out_hw)))
    down_args = ((down[0]._parameters["weight"], *_bn_op_args(bnd.args)) if down is not None
                 else (None,) * 7 + (0.0,))
    out = torch.ops.fastres.residual_block(x, conv1._parameters["weight"], *_bn_op_args(bn1.args),
                                           conv2._parameters["weight"], *_bn_op_args(bn2.args), *down_args, stride,
                                           bn_group)
    return out[0]


def _reference_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain block's forward (the PyTorch ops), for inputs the kernels do not take."""
    return PlainResidualBlock.forward(block, x)
