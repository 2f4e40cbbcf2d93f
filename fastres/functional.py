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

The rule: the fused path gives PyTorch's answer, or it does not run. Every
call checks, before any kernel touches memory, that the kernels compute what
the plain modules would: children of the exact classes fused (``nn.Conv2d``,
``nn.BatchNorm2d``/``nn.SyncBatchNorm``, ``nn.ReLU``, the downsample's
``nn.Sequential``) with no hooks (module or global; pruning and the old
weight/spectral norm are hooks) and no parametrisations (they change the
class), configurations the kernels take (3x3 convs, zero padding, no bias,
affine BatchNorms whose every per-channel tensor has the conv's output
channels, ...), and inputs they take (channels, sizes, dtypes as torch would
accept them). Otherwise the plain forward runs (hooks fire, parametrisations
apply, torch raises its own errors); a module whose structure keeps it off
the kernels says why once (:class:`fastres.FusionWarning`). These checks are
a few dozen attribute reads per call, no allocation.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules import module as _module_globals

from ._backend import KERNEL_DTYPES, FusionWarning, uses_kernels
from . import ops  # noqa: F401  (registers torch.ops.fastres.*)
from .launchers import conv as L
from .reference.nn import ResidualBlock as PlainResidualBlock

__all__ = ["conv_bn_relu", "residual_block"]


class _BN(NamedTuple):
    """How a BatchNorm2d takes part: its kernel arguments and mode."""

    args: L.BatchNormArgs
    batch_stats: bool  # training, or no running statistics to use
    update: bool  # training and tracking: update the running statistics


def _bn_config(bn: nn.BatchNorm2d, where: str = "") -> _BN:
    """The kernel arguments of a BatchNorm that :func:`_bn_problem` passed."""
    # Read the dicts behind nn.Module.__getattr__ directly: this runs on every call.
    params, buffers = bn._parameters, bn._buffers
    update = bn.training and bn.track_running_stats
    running_mean = buffers.get("running_mean")
    batch_stats = bn.training or running_mean is None
    keep_running = update or not batch_stats
    args = L.BatchNormArgs(params["weight"], params["bias"], running_mean if keep_running else None,
                           buffers["running_var"] if keep_running else None,
                           buffers.get("num_batches_tracked") if update else None,
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
    """(one group, its name) of a fused op's BatchNorms (classes checked by :func:`_bn_problem`):
    ``nn.SyncBatchNorm`` synchronises over its group when it synchronises (fused with its collectives),
    ``nn.BatchNorm2d`` over none. BatchNorms that disagree on the group take the PyTorch ops."""
    for bn in norms:
        if type(bn) is nn.SyncBatchNorm:
            break
    else:
        return True, None  # the usual case, cheaply
    names = {_sync_group_name(bn) if type(bn) is nn.SyncBatchNorm else None for bn in norms}
    if len(names) > 1:
        return False, None
    return True, names.pop()


# ------------------------------------------------------------------ whether the kernels stand in
#
# Two passes. The fast one (every call) reads what decides, builds no strings and returns the kernels'
# arguments or None: the children's exact classes and hooks, the convs' settings, every tensor the
# kernels read or write (length, contiguity, dtype, device), the input's channels and size. Only when it
# says no does the slow one (``_block_problem``, ``_stem_problem``) find what a user should be told: a
# structural reason is warned once per module, a device mismatch raised, and anything else (an input
# torch refuses or takes differently) left to the plain forward.

_ONE = (1, 1)


def _hooked(module: nn.Module) -> bool:
    """Module hooks that the plain forward would fire (pruning masks and the old ``weight_norm`` and
    ``spectral_norm`` are forward pre-hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` and
    its siblings): they fire on the children only in the plain forward."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _conv_weight(conv: object, device: torch.device, dtype: torch.dtype, autocast: bool) -> Optional[torch.Tensor]:
    """The weight of a plain ``nn.Conv2d`` the kernels take (groups 1, no dilation, square stride and
    zero padding, no bias, no hooks), on ``device`` in a dtype torch takes with ``dtype`` activations
    (under autocast any floating dtype but float64, which autocast casts); else None."""
    if (type(conv) is not nn.Conv2d or _hooked(conv) or conv.groups != 1 or conv.dilation != _ONE
            or conv.padding_mode != "zeros" or conv._parameters.get("bias") is not None):
        return None
    padding, stride = conv.padding, conv.stride
    if type(padding) is not tuple or padding[0] != padding[1] or stride[0] != stride[1]:
        return None
    weight = conv._parameters.get("weight")
    if (weight is None or weight.dim() != 4 or weight.device != device
            or (weight.dtype != dtype and not (autocast and weight.dtype in KERNEL_DTYPES))):
        return None
    return weight


def _bn_takes(bn: object, channels: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels stand in for ``bn`` (an exact ``nn.BatchNorm2d``/``nn.SyncBatchNorm`` without
    hooks, affine) after a conv with ``channels`` outputs: every per-channel tensor they read or write has
    ``channels`` contiguous elements (torch checks the count too) on ``device``, all in one dtype torch
    takes with ``dtype`` activations (``dtype`` or float32); eps > 0 in training (torch raises)."""
    if (type(bn) is not nn.BatchNorm2d and type(bn) is not nn.SyncBatchNorm) or _hooked(bn):
        return False
    params, buffers = bn._parameters, bn._buffers
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or bias is None:
        return False
    t = weight.dtype
    if t != dtype and t != torch.float32:
        return False
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    for v in (weight, bias) if running_mean is None else (weight, bias, running_mean, running_var):
        if v is None or v.numel() != channels or not v.is_contiguous() or v.dtype != t or v.device != device:
            return False
    if running_mean is None and running_var is not None:
        return False
    if bn.training:
        if not bn.eps > 0:
            return False
        if bn.track_running_stats:
            count = buffers.get("num_batches_tracked")
            if running_mean is None:  # torch counts the batch without statistics to update: the kernels do not
                return count is None
            if count is None or count.numel() != 1 or count.device != device:
                return False
    return True


def _kernel_dtype(x: object) -> Optional[torch.dtype]:
    """The dtype the kernels would compute ``x`` in, or None when they do not take it: not a kernel
    tensor (:func:`fastres.backend_for`), not a 4-D non-empty floating-point tensor (PyTorch's ops then
    give PyTorch's answer or error)."""
    if not isinstance(x, torch.Tensor) or not uses_kernels(x) or x.dim() != 4 or x.numel() == 0:
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):  # autocast casts every floating input but float64 (as cuDNN convs run)
        return torch.get_autocast_dtype(device)
    return x.dtype


# The slow pass: what to tell the user.

def _class_problem(module: object, name: str, expected: str) -> str:
    if isinstance(module, nn.Module) and torch.nn.utils.parametrize.is_parametrized(module):
        return f"{name} has parametrizations ({', '.join(module.parametrizations)})"
    return f"{name} is a {type(module).__module__}.{type(module).__qualname__}, not an {expected}"


def _module_problem(module: object, name: str, cls: type, expected: str) -> Optional[str]:
    if type(module) is not cls:
        return _class_problem(module, name, expected)
    if _hooked(module):
        return f"{name} has hooks"
    return None


def _conv_problem(conv: object, name: str, kernel: Optional[tuple] = None, stride: Optional[int] = None
                  ) -> Optional[str]:
    """Why the conv kernels cannot stand in for ``conv`` whatever the input (None: they can).
    ``kernel``/``stride``: what the fused op needs."""
    problem = _module_problem(conv, name, nn.Conv2d, "nn.Conv2d")
    if problem is not None:
        return problem
    weight = conv._parameters.get("weight")
    if weight is None or weight.dim() != 4:
        return f"{name}.weight is not a 4-D parameter"
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if conv.dilation != _ONE:
        problems.append(f"dilation={conv.dilation}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        problems.append(f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    elif conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        problems.append(f"stride={conv.stride}, padding={conv.padding} (different for height and width)")
    if conv._parameters.get("bias") is not None:
        problems.append("bias=True")
    if kernel is not None and (tuple(weight.shape[2:]) != kernel or conv.padding != _ONE):
        problems.append(f"kernel size {tuple(weight.shape[2:])}, padding {conv.padding} (the fused block: 3x3, "
                        f"padding 1)")
    if stride is not None and conv.stride != (stride, stride):
        problems.append(f"stride {conv.stride} (needs {stride})")
    if problems:
        return f"{name} has " + ", ".join(problems)
    return None


def _bn_problem(bn: object, name: str, channels: int) -> Optional[str]:
    """Why the kernels cannot stand in for ``bn`` after a conv with ``channels`` outputs whatever the
    input (None: they can)."""
    if type(bn) is not nn.BatchNorm2d and type(bn) is not nn.SyncBatchNorm:
        return _class_problem(bn, name, "nn.BatchNorm2d")
    if _hooked(bn):
        return f"{name} has hooks"
    params, buffers = bn._parameters, bn._buffers
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or bias is None:
        return f"{name} has no affine weight and bias (affine=False)"
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    for label, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                     ("running_var", running_var)):
        if t is not None and (t.numel() != channels or not t.is_contiguous()):
            return (f"{name}.{label} has shape {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}, "
                    f"but its conv has {channels} output channels")
    if (running_mean is None) != (running_var is None):
        return f"{name} has only one of running_mean and running_var"
    if bn.training:
        if not bn.eps > 0:
            return f"{name}.eps={bn.eps} (batch_norm needs eps > 0 in training)"
        if bn.track_running_stats:
            count = buffers.get("num_batches_tracked")
            if running_mean is None and count is not None:
                return f"{name} counts batches (num_batches_tracked) but has no running statistics"
            if running_mean is not None and (count is None or count.numel() != 1):
                return f"{name}.num_batches_tracked is not a one-element tensor"
    return None


def _block_problem(block: nn.Module) -> Optional[str]:
    """Why a residual block's children keep it off the kernels whatever the input (None: they do not)."""
    children = block._modules
    down = children.get("downsample")
    if down is not None:
        down = _downsample_parts(down)
        if down is None:
            return "downsample is not a plain nn.Sequential(nn.Conv2d, nn.BatchNorm2d)"
    return _join_problem(children.get("conv1"), children.get("bn1"), children.get("relu"), children.get("conv2"),
                         children.get("bn2"), down, None, BLOCK_NAMES)


def _downsample_parts(down: nn.Module) -> Optional[tuple]:
    """A block's ``downsample`` as (conv, BN), or None when it is not a plain two-module nn.Sequential."""
    parts = tuple(down._modules.values()) if type(down) is nn.Sequential else ()
    return parts if len(parts) == 2 and not _hooked(down) else None


# How the slow pass names a block's children: the notes' block's attribute names (the graph pass gives paths).
BLOCK_NAMES = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample.0", "downsample.1")


def _join_problem(conv1: object, bn1: object, relu: object, conv2: object, bn2: object, down: Optional[tuple],
                  residual: Optional[torch.Tensor], names: tuple, down_reads_other: bool = False) -> Optional[str]:
    """Why ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)`` keeps off the kernels whatever the input
    (None: it does not); ``down``: the shortcut's (conv, BN), ``residual``: a tensor shortcut;
    ``down_reads_other``: the projection reads another tensor than x (its channels are checked per call)."""
    problem = (_conv_problem(conv1, names[0]) or _conv_problem(conv2, names[3], stride=1)
               or _module_problem(relu, names[2], nn.ReLU, "nn.ReLU"))
    if problem is not None:
        return problem
    w1, w2 = conv1._parameters["weight"], conv2._parameters["weight"]
    width, out_channels = w1.shape[0], w2.shape[0]
    if w2.shape[1] != width:
        return f"{names[3]} takes {w2.shape[1]} channels, {names[0]} gives {width}"
    problem = _bn_problem(bn1, names[1], width) or _bn_problem(bn2, names[4], out_channels)
    if problem is not None:
        return problem
    stride = conv1.stride[0]
    norms = [bn1, bn2]
    if down is not None:
        problem = _conv_problem(down[0], names[5], stride=stride)
        if problem is not None:
            return problem
        wd = down[0]._parameters["weight"]
        if wd.shape[0] != out_channels or (wd.shape[1] != w1.shape[1] and not down_reads_other):
            return (f"{names[5]}'s weight has shape {tuple(wd.shape)}, {names[0]}'s {tuple(w1.shape)}, {names[3]}'s "
                    f"{tuple(w2.shape)}")
        problem = _bn_problem(down[1], names[6], out_channels)
        if problem is not None:
            return problem
        norms.append(down[1])
    elif residual is None and (stride != 1 or out_channels != w1.shape[1]):
        return (f"an identity residual needs {names[0]}'s stride 1 and {names[3]}'s {out_channels} output channels "
                f"to equal {names[0]}'s {w1.shape[1]} input channels")
    if _global_hooks():
        return "global module hooks are registered"
    if not _bn_group(norms)[0]:
        return "its BatchNorms synchronise over different process groups"
    return None


def _stem_problem(conv: object, bn: object, relu: object) -> Optional[str]:
    """Why a conv -> BatchNorm -> ReLU keeps off the kernels whatever the input (None: it does not)."""
    problem = _conv_problem(conv, "conv")
    if problem is None:
        problem = _bn_problem(bn, "bn", conv._parameters["weight"].shape[0])
    if problem is None and relu is not None:
        problem = _module_problem(relu, "relu", nn.ReLU, "nn.ReLU")
    if problem is None and _global_hooks():
        problem = "global module hooks are registered"
    if problem is None and not _bn_group((bn,))[0]:
        problem = "its BatchNorm synchronises over another group"
    return problem


def _step_aside(owner: nn.Module, problem: Optional[str], x: torch.Tensor, modules) -> None:
    """The fast pass said no: warn once about a structural ``problem``; raise if a tensor is on another
    device than ``x`` (the kernels would address it as x's); else the input is one torch refuses or takes
    otherwise (channels, sizes, dtypes), which the plain forward shows."""
    if problem is not None:
        _fall_back(owner, problem)
        return
    _check_devices(type(owner).__name__, x, *(m for m in modules if isinstance(m, nn.Module)))


def _fall_back(owner: nn.Module, reason: str) -> None:
    """Say once per module (and reason) that it runs the PyTorch ops, and why (in eager mode: dynamo
    traces no warning, and a compiled model's eager calls say it)."""
    if torch.compiler.is_compiling() or owner.__dict__.get("_fastres_fallback") == reason:
        return
    owner.__dict__["_fastres_fallback"] = reason
    name = owner.__dict__.get("_fastres_name")
    warnings.warn(f"fastres: {type(owner).__name__}{f' {name!r}' if name else ''} runs PyTorch's ops instead of the "
                  f"fused kernels: {reason}", FusionWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside fastres and torch (the user's call of the module)."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


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


def _needs_grad(x: torch.Tensor, *modules: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))


def _eval_conv(x, conv_weight, stride, padding, bn: _BN, residual=None, relu=False):
    a = bn.args
    return torch.ops.fastres.conv_bn_eval(x, conv_weight, a.weight, a.bias, a.running_mean, a.running_var, a.eps,
                                          stride, padding, residual, relu)


def _bn_op_args(bn: L.BatchNormArgs) -> tuple:
    """A BatchNorm's arguments of the training ops, in schema order."""
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps


# ------------------------------------------------------------------ conv + BN + ReLU

def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(bn(conv(x)))``, fused; exactly ``nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU``
    (outputs, gradients, running statistics) in training and eval mode.

    Tensors that take no kernel (see :func:`fastres.backend_for`), eval-mode calls that need gradients,
    and modules or inputs the kernels do not take run the PyTorch ops (see the module docstring).
    """
    return _conv_bn_relu(x, conv, bn, _RELU, conv, lambda: torch.relu(bn(conv(x))))


_RELU = nn.ReLU()  # the functional form's ReLU


def _conv_bn_relu(x: torch.Tensor, conv: nn.Module, bn: nn.Module, relu: Optional[nn.Module], owner: nn.Module,
                  plain: Callable[[], torch.Tensor],
                  pool: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """:func:`conv_bn_relu` for ``owner`` (warned once when it falls back) whose ReLU is ``relu`` (None: a
    conv -> BN with no ReLU after it); ``plain()`` is its plain forward. ``pool``: a 2x2 stride-2 max-pool
    after the ReLU (``plain()`` includes it), fused in training mode where the ReLU's output height and
    width are even."""
    dtype = _kernel_dtype(x)
    if dtype is None:
        return plain()
    device = x.device
    weight = _conv_weight(conv, device, dtype, torch.is_autocast_enabled(device.type))
    bn_group = None
    takes = (weight is not None and (relu is None or type(relu) is nn.ReLU and not _hooked(relu))
             and not _global_hooks() and not (isinstance(pool, nn.Module) and _hooked(pool)))
    if takes:
        n, channels, h, w = x.shape
        out_channels, in_channels, kh, kw = weight.shape
        stride, padding = conv.stride[0], conv.padding[0]
        out_h, out_w = L.out_size(h, kh, stride, padding), L.out_size(w, kw, stride, padding)
        takes = (channels == in_channels and out_h > 0 and out_w > 0 and _bn_takes(bn, out_channels, dtype, device)
                 and not ((bn.training or bn._buffers.get("running_mean") is None) and n * out_h * out_w == 1))
        if takes:
            takes, bn_group = _bn_group((bn,))
    if not takes:
        _step_aside(owner, _stem_problem(conv, bn, relu), x, (conv, bn))
        return plain()
    bn_cfg = _bn_config(bn)
    if not bn_cfg.batch_stats and _needs_grad(x, conv, bn):
        return plain()
    x = x.to(dtype)
    if not bn_cfg.batch_stats:
        out = _eval_conv(x, weight, stride, padding, bn_cfg, relu=relu is not None)
        return out if pool is None else pool(out)
    fused_pool = pool is not None and relu is not None and ops.pool_fuses(out_h, out_w)
    out, _, _ = torch.ops.fastres.conv_bn_relu(x, weight, *_bn_op_args(bn_cfg.args), stride, padding, bn_group,
                                               2 if fused_pool else 0, relu is not None)
    return out if pool is None or fused_pool else pool(out)


def _chain_sizes(x: torch.Tensor, conv1: nn.Module, w1: torch.Tensor, conv2: nn.Module,
                 w2: torch.Tensor) -> Optional[tuple[int, int, int, int]]:
    """``(out_h, out_w, out_h2, out_w2)`` of ``conv2(conv1(x))`` (weights ``w1``, ``w2``; conv2 at stride 1)
    when x's channels feed conv1 and conv1's feed conv2 and no output is empty, else None."""
    _, channels, h, w = x.shape
    stride, padding1, padding2 = conv1.stride[0], conv1.padding[0], conv2.padding[0]
    out_h, out_w = L.out_size(h, w1.shape[2], stride, padding1), L.out_size(w, w1.shape[3], stride, padding1)
    out_h2, out_w2 = L.out_size(out_h, w2.shape[2], 1, padding2), L.out_size(out_w, w2.shape[3], 1, padding2)
    if channels != w1.shape[1] or w2.shape[1] != w1.shape[0] or min(out_h, out_w, out_h2, out_w2) <= 0:
        return None
    return out_h, out_w, out_h2, out_w2


def _conv_bn_relu_conv(x: torch.Tensor, conv: nn.Module, bn: nn.Module, relu: nn.Module, conv2: nn.Module,
                       residual: Optional[torch.Tensor], owner: nn.Module,
                       plain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``conv2(relu(bn(conv(x)))) [+ residual]`` fused (a pre-activation block's conv1 -> BN -> ReLU -> conv2
    and its residual sum: ``fastres.ops.conv_bn_relu_conv``), conv2 without a BatchNorm after it, stride 1;
    ``owner`` is warned once when it falls back, ``plain()`` is its plain forward. Eval mode fuses the
    chain and runs conv2 (and the add) in PyTorch."""
    dtype = _kernel_dtype(x)
    if dtype is None:
        return plain()
    device = x.device
    autocast = torch.is_autocast_enabled(device.type)
    weight = _conv_weight(conv, device, dtype, autocast)
    weight2 = _conv_weight(conv2, device, dtype, autocast)
    bn_group = None
    takes = (weight is not None and weight2 is not None and type(relu) is nn.ReLU and not _hooked(relu)
             and not _global_hooks() and conv2.stride == _ONE)
    if takes:
        n, out_channels = x.shape[0], weight.shape[0]
        stride, padding, padding2 = conv.stride[0], conv.padding[0], conv2.padding[0]
        sizes = _chain_sizes(x, conv, weight, conv2, weight2)
        takes = sizes is not None and _bn_takes(bn, out_channels, dtype, device)
    if takes:
        out_h, out_w, out_h2, out_w2 = sizes
        takes = not ((bn.training or bn._buffers.get("running_mean") is None) and n * out_h * out_w == 1)
        if takes and residual is not None:
            # The epilogue reads the residual as the output's elements: no broadcasting, the compute dtype.
            takes = (isinstance(residual, torch.Tensor) and residual.device == device and residual.dtype == dtype
                     and residual.shape == (n, weight2.shape[0], out_h2, out_w2))
        if takes:
            takes, bn_group = _bn_group((bn,))
    if not takes:
        _step_aside(owner, _stem_problem(conv, bn, relu) or _conv_problem(conv2, "conv2", stride=1), x,
                    (conv, bn, conv2))
        return plain()
    bn_cfg = _bn_config(bn)
    if not bn_cfg.batch_stats and (_needs_grad(x, conv, bn, conv2) or torch.is_grad_enabled() and residual is not None
                                   and residual.requires_grad):
        return plain()
    x = x.to(dtype)
    if not bn_cfg.batch_stats:
        out = torch.nn.functional.conv2d(_eval_conv(x, weight, stride, padding, bn_cfg, relu=True), weight2,
                                         padding=padding2)
        return out if residual is None else out + residual
    out, _, _ = torch.ops.fastres.conv_bn_relu_conv(x, weight, *_bn_op_args(bn_cfg.args), weight2, stride, padding,
                                                    padding2, bn_group, residual)
    return out


def _bn_relu(x: torch.Tensor, bn: nn.Module, relu: nn.Module, owner: nn.Module,
             plain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``relu(bn(x))`` of any tensor fused in training mode (``fastres.ops.bn_relu``); eval mode and what the
    kernels do not take run ``plain()`` (``owner`` warned once)."""
    dtype = _kernel_dtype(x)
    if dtype is None:
        return plain()
    takes = (type(relu) is nn.ReLU and not _hooked(relu) and not _global_hooks() and x.dim() == 4
             and x.dtype == dtype and x.is_contiguous(memory_format=L.memory_format_of(x))
             and _bn_takes(bn, x.shape[1], dtype, x.device) and x.shape[0] * x.shape[2] * x.shape[3] > 1)
    bn_group = None
    if takes:
        takes, bn_group = _bn_group((bn,))
    if not takes:
        problem = _module_problem(relu, "relu", nn.ReLU, "nn.ReLU")
        if problem is None and _global_hooks():
            problem = "global module hooks are registered"
        _step_aside(owner, problem, x, (bn,))
        return plain()
    cfg = _bn_config(bn)
    if not cfg.batch_stats:
        return plain()
    out, _ = torch.ops.fastres.bn_relu(x, *_bn_op_args(cfg.args), bn_group)
    return out


def _preact_block(x: torch.Tensor, bn0: nn.Module, relu0: nn.Module, conv1: nn.Module, bn1: nn.Module,
                  relu1: nn.Module, conv2: nn.Module, down: Optional[nn.Module], owner: nn.Module,
                  plain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A pre-activation block fused: ``a = relu0(bn0(x))``, ``conv2(relu1(bn1(conv1(a)))) + shortcut``, the
    shortcut ``down(a)`` (a conv without BN) or ``x`` (``fastres.ops.preact_block``); ``owner`` is warned once
    when it falls back, ``plain()`` is its plain forward. Eval mode runs ``plain()``."""
    dtype = _kernel_dtype(x)
    if dtype is None:
        return plain()
    device = x.device
    autocast = torch.is_autocast_enabled(device.type)
    w1 = _conv_weight(conv1, device, dtype, autocast)
    w2 = _conv_weight(conv2, device, dtype, autocast)
    wd = _conv_weight(down, device, dtype, autocast) if down is not None else None
    bn_group = None
    takes = (w1 is not None and w2 is not None and (down is None or wd is not None) and not _global_hooks()
             and all(type(r) is nn.ReLU and not _hooked(r) for r in (relu0, relu1)) and conv2.stride == _ONE
             and x.dim() == 4 and x.dtype == dtype and x.is_contiguous(memory_format=L.memory_format_of(x)))
    if takes:  # (x in the compute dtype already: bn0's statistics are of x as torch sees it)
        n, channels, h, w = x.shape
        width, out_channels = w1.shape[0], w2.shape[0]
        stride, padding1, padding2 = conv1.stride[0], conv1.padding[0], conv2.padding[0]
        sizes = _chain_sizes(x, conv1, w1, conv2, w2)
        takes = sizes is not None and _bn_takes(bn0, channels, dtype, device) and _bn_takes(bn1, width, dtype, device)
    if takes:
        out_h, out_w, out_h2, out_w2 = sizes
        takes = n * h * w > 1 and n * out_h * out_w > 1
        down_padding = 0
        if takes and down is not None:
            down_padding = down.padding[0]
            takes = (down.stride == conv1.stride and wd.shape[:2] == (out_channels, channels)
                     and (L.out_size(h, wd.shape[2], stride, down_padding),
                          L.out_size(w, wd.shape[3], stride, down_padding)) == (out_h2, out_w2))
        elif takes:
            takes = out_channels == channels and (out_h2, out_w2) == (h, w)
        if takes:
            takes, bn_group = _bn_group((bn0, bn1))
    if not takes:
        problem = (_stem_problem(conv1, bn1, relu1) or _conv_problem(conv2, "conv2", stride=1)
                   or _module_problem(relu0, "relu0", nn.ReLU, "nn.ReLU")
                   or (_conv_problem(down, "shortcut", stride=conv1.stride[0]) if down is not None else None))
        _step_aside(owner, problem, x, (bn0, conv1, bn1, conv2) + ((down,) if down is not None else ()))
        return plain()
    cfg0, cfg1 = _bn_config(bn0), _bn_config(bn1)
    if not (cfg0.batch_stats and cfg1.batch_stats):
        return plain()  # eval mode (or BatchNorms in different modes): PyTorch's ops
    x = x.to(dtype)
    out = torch.ops.fastres.preact_block(x, *_bn_op_args(cfg0.args), w1, *_bn_op_args(cfg1.args), w2, wd, stride,
                                         padding1, padding2, down_padding, bn_group)
    return out[0]


# ------------------------------------------------------------------ residual block

def residual_block(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """The notes' residual block (``fastres.nn.ResidualBlock`` or the reference
    one), fused: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + residual)``."""
    if _kernel_dtype(x) is None:
        return _reference_block(block, x)
    children = block._modules  # not nn.Module.__getattr__: this runs on every call
    down = children.get("downsample")
    if down is not None:
        down = _downsample_parts(down)
        if down is None:
            _step_aside(block, _block_problem(block), x, ())
            return _reference_block(block, x)
    return _residual_join(x, children.get("conv1"), children.get("bn1"), children.get("relu"), children.get("conv2"),
                          children.get("bn2"), down, None, block, BLOCK_NAMES, lambda: _reference_block(block, x))


def _residual_join(x: torch.Tensor, conv1: object, bn1m: object, relu: object, conv2: object, bn2m: object,
                   down: Optional[tuple], residual: Optional[torch.Tensor], owner: nn.Module, names: tuple,
                   plain: Callable[[], torch.Tensor], down_input: Optional[torch.Tensor] = None,
                   after_relu: bool = False) -> torch.Tensor:
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)`` (``after_relu``: ``relu(bn2(...)) + shortcut``,
    ``relu`` applied twice: ResNet-9's residual) fused, the shortcut ``bnd(convd(x))`` with
    ``down = (convd, bnd)`` (``bnd(convd(down_input))`` when given: a bottleneck's projection of the block
    input), else the tensor ``residual``, else ``x``: a residual block however its code is
    written (``owner`` is warned once when it falls back, its children named by ``names``; ``plain()`` is
    its plain forward). conv1 may have any kernel size, stride and padding the conv kernel takes, conv2
    any with stride 1, the downsample conv1's stride."""
    dtype = _kernel_dtype(x)
    if dtype is None:
        return plain()
    device = x.device
    autocast = torch.is_autocast_enabled(device.type)
    w1 = _conv_weight(conv1, device, dtype, autocast)
    w2 = _conv_weight(conv2, device, dtype, autocast)
    wd = None
    takes = (w1 is not None and w2 is not None and type(relu) is nn.ReLU and not _hooked(relu)
             and conv2.stride == _ONE and not (after_relu and down is not None))
    if takes:
        n, in_channels, h, w = x.shape
        width, out_channels = w1.shape[0], w2.shape[0]
        stride, padding1, padding2 = conv1.stride[0], conv1.padding[0], conv2.padding[0]
        sizes = _chain_sizes(x, conv1, w1, conv2, w2)
        takes = (sizes is not None and _bn_takes(bn1m, width, dtype, device)
                 and _bn_takes(bn2m, out_channels, dtype, device))
    down_padding = 1
    if takes:
        out_h, out_w, out_h2, out_w2 = sizes
        norms = (bn1m, bn2m)
        if down is not None:
            conv_d, bnd_m = down
            wd = _conv_weight(conv_d, device, dtype, autocast)
            xd = x if down_input is None else down_input
            takes = (wd is not None and conv_d.stride == conv1.stride and isinstance(xd, torch.Tensor)
                     and xd.dim() == 4 and xd.device == device and xd.dtype == x.dtype
                     and wd.shape[:2] == (out_channels, xd.shape[1]))
            if takes:
                down_padding = conv_d.padding[0]
                shape_d = (xd.shape[0], L.out_size(xd.shape[2], wd.shape[2], stride, down_padding),
                           L.out_size(xd.shape[3], wd.shape[3], stride, down_padding))
                takes = shape_d == (n, out_h2, out_w2) and _bn_takes(bnd_m, out_channels, dtype, device)
                norms = (bn1m, bn2m, bnd_m)
        elif residual is not None:
            # The kernels read the residual as the output's elements: no broadcasting, the compute dtype.
            takes = (isinstance(residual, torch.Tensor) and residual.shape == (n, out_channels, out_h2, out_w2)
                     and residual.dtype == dtype and residual.device == device)
        else:
            takes = stride == 1 and out_channels == in_channels and (out_h2, out_w2) == (h, w)
    if takes:
        takes = not _global_hooks() and not (
            (bn1m.training or bn1m._buffers.get("running_mean") is None) and n * out_h * out_w == 1)
    if takes:
        takes, bn_group = _bn_group(norms)
    if not takes:
        _step_aside(owner, _join_problem(conv1, bn1m, relu, conv2, bn2m, down, residual, names,
                                         down_input is not None), x,
                    (conv1, bn1m, conv2, bn2m, relu, *(down or ())))
        return plain()
    bn1, bn2 = _bn_config(bn1m), _bn_config(bn2m)
    bnd = _bn_config(down[1]) if down is not None else None
    batch_stats = bn1.batch_stats
    if bn2.batch_stats != batch_stats or (bnd is not None and bnd.batch_stats != batch_stats):
        return plain()  # BatchNorms in different modes
    if not batch_stats and (_needs_grad(x, conv1, bn1m, conv2, bn2m, *(down or ())) or torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (down_input, residual))):
        return plain()  # eval-mode kernels have no backward
    x = x.to(dtype)
    if down_input is not None:
        down_input = down_input.to(dtype)
    if not batch_stats:
        h1 = _eval_conv(x, w1, stride, padding1, bn1, relu=True)
        if down is not None:
            shortcut = _eval_conv(x if down_input is None else down_input, wd, stride, down_padding, bnd)
        else:
            shortcut = x if residual is None else residual
            # The residual is read with the output's strides: a view with other strides (a slice, a
            # permutation) is copied into that layout, one activation.
            shape, strides = L.conv_output_layout(tuple(h1.shape), h1.stride(), tuple(w2.shape), 1, padding2)
            if any(a != b for a, b, size in zip(shortcut.stride(), strides, shape) if size > 1):
                shortcut = shortcut.contiguous(memory_format=L.memory_format_of(h1))
        if after_relu:
            return _eval_conv(h1, w2, 1, padding2, bn2, relu=True) + shortcut
        return _eval_conv(h1, w2, 1, padding2, bn2, residual=shortcut, relu=True)
    if residual is not None and down is None:
        # Read as the output's elements: copied once into the output's memory format when it has another
        # (the option-A shortcut's F.pad gives NCHW), so the kernels' loads stay coalesced.
        layout = L.memory_format_of(x)
        if not residual.is_contiguous(memory_format=layout):
            residual = residual.contiguous(memory_format=layout)
    down_args = (wd, *_bn_op_args(bnd.args)) if down is not None else (None,) * 7 + (0.0,)
    out = torch.ops.fastres.residual_block(x, w1, *_bn_op_args(bn1.args), w2, *_bn_op_args(bn2.args), *down_args,
                                           stride, bn_group, padding1, padding2, down_padding,
                                           residual if down is None else None,
                                           down_input if down is not None else None, after_relu)
    return out[0]


def _reference_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain block's forward (the PyTorch ops), for inputs the kernels do not take."""
    return PlainResidualBlock.forward(block, x)
