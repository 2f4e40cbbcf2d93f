"""The fused ops as PyTorch operators: ``torch.ops.fastres.*``.

Being real operators (not Python functions that autograd calls) is what lets
``torch.compile(..., fullgraph=True)`` trace a fastres model in one graph,
``torch.export`` export it and ``torch.library.opcheck`` check it. Each op has

* a schema that declares the BatchNorm running statistics it updates in place
  (``Tensor(a!)?``), so functionalization (AOTAutograd, export) knows;
* one implementation for CPU and CUDA: the launchers (``fastres.launchers.conv``),
  compiled kernels on CUDA, Triton's interpreter on CPU;
* a fake implementation that allocates exactly what the real one returns
  (shapes, dtypes, strides), from the same layout rule the launchers use;
* for the training ops, an autograd kernel: a ``torch.autograd.Function`` that
  runs the op below autograd, saves the activations it returns and calls the
  backward op; under ``create_graph=True`` (double backward, gradient
  penalties) its backward differentiates the forward recomputed in PyTorch's
  ops instead, so the gradients carry a graph and second-order gradients are
  torch's.

Why ``torch.library.Library`` rather than ``custom_op``/``triton_op``: an op
that mutates its inputs (the running statistics) cannot take
``register_autograd``, and the kernels finish their reductions through a
persistent per-stream workspace whose counters the launches themselves reset,
which Inductor's functionalization of ``wrap_triton`` kernels would not keep.
Inductor sees each op as one opaque call and compiles everything around it.

Training ops return the activations their backward needs next to the output
(``y``: raw conv outputs, ``stats``: packed ``[4, C]`` BatchNorm rows), marked
non-differentiable. Absent optional outputs (no downsample, no input gradient)
are empty tensors: an operator returns tensors, never None.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _sync_bn as S
from .launchers import conv as L
from .launchers.core import device_guarded

__all__ = ["conv_bn_relu", "conv_bn_relu_backward", "conv_bn_relu_conv", "conv_bn_relu_conv_backward",
           "preact_block", "preact_block_backward", "bn_relu", "bn_relu_backward",
           "residual_block", "residual_block_backward", "conv_bn_eval"]

_lib = torch.library.Library("fastres", "DEF")

_BN_ARGS = "Tensor {p}weight, Tensor {p}bias, Tensor(a{i}!)? {p}running_mean, Tensor(b{i}!)? {p}running_var, " \
           "Tensor(c{i}!)? {p}num_batches_tracked, float? {p}momentum, float {p}eps"

_lib.define("conv_bn_relu(Tensor x, Tensor weight, " + _BN_ARGS.format(p="bn_", i="") +
            ", int stride, int padding, str? bn_group=None, int pool=0, bool relu=True) "
            "-> (Tensor out, Tensor y, Tensor stats)")
_lib.define("conv_bn_relu_backward(Tensor dout, Tensor x, Tensor weight, Tensor bn_weight, Tensor y, Tensor stats, "
            "int stride, int padding, bool input_grad, str? bn_group=None, int pool=0, bool relu=True) "
            "-> (Tensor dx, Tensor dweight, Tensor dbn_weight, Tensor dbn_bias)")
_lib.define("conv_bn_relu_conv(Tensor x, Tensor weight, " + _BN_ARGS.format(p="bn_", i="") +
            ", Tensor conv2_weight, int stride, int padding, int padding2, str? bn_group=None, Tensor? residual=None) "
            "-> (Tensor out, Tensor y, Tensor stats)")
_lib.define("conv_bn_relu_conv_backward(Tensor dout, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
            "float bn_eps, Tensor y, Tensor stats, Tensor conv2_weight, int stride, int padding, int padding2, "
            "bool input_grad, str? bn_group=None) "
            "-> (Tensor dx, Tensor dweight, Tensor dbn_weight, Tensor dbn_bias, Tensor dconv2_weight)")
_lib.define("bn_relu(Tensor x, " + _BN_ARGS.format(p="bn_", i="") + ", str? bn_group=None) "
            "-> (Tensor out, Tensor stats)")
_lib.define("bn_relu_backward(Tensor dout, Tensor x, Tensor bn_weight, Tensor stats, str? bn_group=None) "
            "-> (Tensor dx, Tensor dbn_weight, Tensor dbn_bias)")
_lib.define("preact_block(Tensor x, " + _BN_ARGS.format(p="bn0_", i="0") + ", Tensor conv1_weight, " +
            _BN_ARGS.format(p="bn1_", i="1") + ", Tensor conv2_weight, Tensor? down_weight, int stride, int padding1, "
            "int padding2, int down_padding, str? bn_group=None) -> (Tensor out, Tensor stats0, Tensor y1, "
            "Tensor stats1)")
_lib.define("preact_block_backward(Tensor dout, Tensor x, Tensor bn0_weight, Tensor bn0_bias, float bn0_eps, "
            "Tensor stats0, Tensor conv1_weight, Tensor bn1_weight, Tensor bn1_bias, float bn1_eps, Tensor y1, "
            "Tensor stats1, Tensor conv2_weight, Tensor? down_weight, int stride, int padding1, int padding2, "
            "int down_padding, bool input_grad, str? bn_group=None) -> (Tensor dx, Tensor dbn0_weight, "
            "Tensor dbn0_bias, Tensor dconv1_weight, Tensor dbn1_weight, Tensor dbn1_bias, Tensor dconv2_weight, "
            "Tensor ddown_weight)")
_lib.define("residual_block(Tensor x, Tensor conv1_weight, " + _BN_ARGS.format(p="bn1_", i="1") +
            ", Tensor conv2_weight, " + _BN_ARGS.format(p="bn2_", i="2") +
            ", Tensor? down_weight, Tensor? bnd_weight, Tensor? bnd_bias, Tensor(a3!)? bnd_running_mean, "
            "Tensor(b3!)? bnd_running_var, Tensor(c3!)? bnd_num_batches_tracked, float? bnd_momentum, float bnd_eps, "
            "int stride, str? bn_group=None, int padding1=1, int padding2=1, int down_padding=1, "
            "Tensor? residual=None, Tensor? down_input=None, bool after_relu=False) -> (Tensor out, Tensor y1, Tensor stats1, Tensor y2, Tensor stats2, Tensor yd, "
            "Tensor statsd)")
_lib.define("residual_block_backward(Tensor dout, Tensor x, Tensor conv1_weight, Tensor bn1_weight, "
            "Tensor bn1_bias, float bn1_eps, Tensor y1, Tensor stats1, Tensor conv2_weight, Tensor bn2_weight, "
            "Tensor y2, Tensor stats2, Tensor? down_weight, Tensor? bnd_weight, Tensor? yd, Tensor? statsd, "
            "int stride, bool input_grad, str? bn_group=None, int padding1=1, int padding2=1, int down_padding=1, "
            "Tensor? residual=None, Tensor? down_input=None, bool after_relu=False) -> (Tensor dx, Tensor dconv1_weight, Tensor dbn1_weight, Tensor dbn1_bias, "
            "Tensor dconv2_weight, Tensor dbn2_weight, Tensor dbn2_bias, Tensor ddown_weight, Tensor dbnd_weight, "
            "Tensor dbnd_bias, Tensor dresidual, Tensor ddown_input)")
_lib.define("conv_bn_eval(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor bn_running_mean, "
            "Tensor bn_running_var, float bn_eps, int stride, int padding, Tensor? residual, bool relu) -> Tensor")


def _impl(name: str):
    """Register the decorated function as op ``name``'s CPU and CUDA implementation, run with its first
    tensor's CUDA device current (Triton launches on the current device; the dispatcher sets no device
    for Python kernels, and the autograd kernels call the implementations directly)."""
    def register(fn):
        fn = device_guarded(fn)
        for key in ("CPU", "CUDA"):
            _lib.impl(name, fn, key)
        return fn
    return register


def _is_plain_eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` is plain eager work: a real tensor, no tracing, no fake, functional or
    functorch-wrapped tensor, no dispatch mode. The autograd kernels then call the implementations
    directly: the dispatcher's boxed call of a Python op with up to 26 arguments costs about 30 us of
    host time, as much as the launches it wraps. Anything else goes through the op, so that tracers
    and modes see it."""
    return (type(x) is torch.Tensor and _get_current_dispatch_mode() is None
            and not torch._is_functional_tensor(x) and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch.compiler.is_compiling())


def _forward(impl: Callable, op: Any, args: tuple) -> Any:
    """An autograd Function's forward: ``impl(*args)`` for plain eager work on ``args[0]``, else the op
    below autograd (tracers and modes see it)."""
    if _is_plain_eager(args[0]):
        return impl(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _absent(like: torch.Tensor) -> torch.Tensor:
    """An absent optional output (an op returns tensors, never None)."""
    return like.new_empty(0)


def _empty_conv_output(a: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, *, dtype: torch.dtype,
                       a_stride: Optional[tuple] = None, transposed: bool = False, out_hw=None) -> torch.Tensor:
    shape, strides = L.conv_output_layout(tuple(a.shape), a.stride() if a_stride is None else a_stride,
                                          tuple(weight.shape), stride, padding, transposed, out_hw)
    return a.new_empty_strided(shape, strides, dtype=dtype)


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s layout (a copy only when it has another): the elementwise kernels read a
    channels_last activation's 8 channels per 128-bit access, which an NCHW gradient (what pooling's
    backward gives) would turn into strided 2-byte loads."""
    if L.same_layout(t, like):
        return t
    return torch.empty_like(like).copy_(t)


def _stats_like(y: torch.Tensor) -> torch.Tensor:
    return y.new_empty((4, y.shape[1]), dtype=torch.float32)


# ------------------------------------------------------------------ conv + BN + ReLU

@_impl("conv_bn_relu")
def conv_bn_relu(x, weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                 bn_momentum, bn_eps, stride, padding, bn_group=None, pool=0, relu=True):
    """Training-mode ``relu(batch_norm(conv2d(x, weight)))``, with ``pool`` 2 its ``max_pool2d(., 2)`` (the
    conv's output height and width even), ``relu`` False without the ReLU (a conv -> BN outside a residual
    join): (out, y, stats). ``bn_group``: the name of the process group a synchronised BatchNorm spans
    (``fastres._sync_bn``)."""
    _check_pool(pool, x, weight, stride, padding, relu)
    group = S.group_named(bn_group)
    bn = L.BatchNormArgs(bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                         bn_momentum, bn_eps)
    y, stats = L.conv(x, weight, stride, padding, dtype=x.dtype, epilogue=L.EPI_STATS, bn=S.local_args(bn, group))
    stats = S.maybe_sync_stats(y, stats, bn, group)
    return L.bn_relu_apply(y, stats, pool=pool, relu=relu), y, stats


def pool_fuses(out_h: int, out_w: int) -> bool:
    """Whether a 2x2 stride-2 max-pool fuses into a conv -> BN -> ReLU whose output is ``out_h`` x ``out_w``:
    every pixel in a window (floor mode drops an odd last row or column, which the kernels do not)."""
    return out_h % 2 == 0 and out_w % 2 == 0 and out_h > 0 and out_w > 0


def _check_pool(pool, x, weight, stride, padding, relu=True):
    if pool == 0:
        return
    if not relu:
        raise ValueError("fastres.conv_bn_relu: pool=2 needs relu=True (the max-pool runs in the BN-ReLU pass)")
    out_hw = [L.out_size(n, k, stride, padding) for n, k in zip(x.shape[2:], weight.shape[2:])]
    if pool != 2 or not pool_fuses(*out_hw):
        raise ValueError(f"fastres.conv_bn_relu: pool must be 0 or 2 (a 2x2 stride-2 max-pool) over an even "
                         f"output height and width; got pool={pool} over {out_hw[0]}x{out_hw[1]}")


@torch.library.register_fake("fastres::conv_bn_relu")
def _conv_bn_relu_fake(x, weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                       bn_momentum, bn_eps, stride, padding, bn_group=None, pool=0, relu=True):
    _check_pool(pool, x, weight, stride, padding, relu)
    y = _empty_conv_output(x, weight, stride, padding, dtype=x.dtype)
    if pool:
        n, c, h, w = y.shape
        out = torch.empty((n, c, h // 2, w // 2), dtype=y.dtype, device=y.device,
                          memory_format=L.memory_format_of(y))
    else:
        out = torch.empty_like(y)
    return out, y, _stats_like(y)


@_impl("conv_bn_relu_backward")
def conv_bn_relu_backward(dout, x, weight, bn_weight, y, stats, stride, padding, input_grad, bn_group=None, pool=0,
                          relu=True):
    group = S.group_named(bn_group)
    if pool:  # the pooled gradient in y's memory format (pooling's backward gives a contiguous one)
        dout = dout.contiguous(memory_format=L.memory_format_of(y))
    else:
        dout = _in_layout_of(dout, y)
    g, coefs, _ = L.bn_relu_backward(dout, y, stats, bn_weight, pool=pool, relu=relu)
    coefs = S.maybe_sync_coefs(coefs, stats, bn_weight, y, group)
    if input_grad and L.grads_fusable(weight, stride, padding):
        dx, _, dweight = L.conv_grads(g, weight, x, dy2=y, dy_pro=coefs.packed)
        return dx, dweight, coefs.dweight, coefs.dbias
    dx = _absent(x)
    if input_grad:
        dx, _ = L.conv(g, weight, stride, padding, dtype=x.dtype, transposed=True, out_hw=tuple(x.shape[2:]),
                       prologue=L.PRO_BN_GRAD, a2=y, pro=coefs.packed)
    dweight = L.conv_wgrad(g, x, weight, stride, padding, dy2=y, dy_pro=coefs.packed)
    return dx, dweight, coefs.dweight, coefs.dbias


@torch.library.register_fake("fastres::conv_bn_relu_backward")
def _conv_bn_relu_backward_fake(dout, x, weight, bn_weight, y, stats, stride, padding, input_grad, bn_group=None,
                                pool=0, relu=True):
    dx = _absent(x)
    if input_grad:  # dx is conv's (transposed) output of g, which has y's layout
        dx = _empty_conv_output(y, weight, stride, padding, dtype=x.dtype, transposed=True,
                                out_hw=tuple(x.shape[2:]))
    return dx, torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_weight)


class _ConvBNReLUAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, stride, padding, bn_group=None, pool=0, relu=True):
        args = (x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                stride, padding, bn_group, pool, relu)
        out, y, stats = _forward(conv_bn_relu, torch.ops.fastres.conv_bn_relu, args)
        ctx.save_for_backward(x, weight, bn_weight, y, stats, bn_bias)
        ctx.conv = (stride, padding)
        ctx.eps = eps
        ctx.bn_group = bn_group
        ctx.pool = pool
        ctx.relu = relu
        ctx.mark_non_differentiable(y, stats)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of y and stats
        return out, y, stats

    @staticmethod
    def backward(ctx, dout, _dy, _dstats):
        x, weight, bn_weight, y, stats, bn_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable in turn
            return _differentiable_grads(
                ctx, dout, (x, weight, bn_weight, bn_bias),
                lambda x, weight, bn_weight, bn_bias: _pooled(_relu_if(_plain_conv_bn(
                    x, weight, bn_weight, bn_bias, ctx.eps, *ctx.conv), ctx.relu), ctx.pool))
        input_grad = ctx.needs_input_grad[0]
        backward = conv_bn_relu_backward if _is_plain_eager(dout) else torch.ops.fastres.conv_bn_relu_backward
        dx, dweight, dbn_weight, dbn_bias = backward(dout, x, weight, bn_weight, y, stats, *ctx.conv, input_grad,
                                                    ctx.bn_group, ctx.pool, ctx.relu)
        return ((dx if input_grad else None), dweight, dbn_weight, dbn_bias,
                *(None,) * 10)[:len(ctx.needs_input_grad)]


def _relu_if(out: torch.Tensor, relu: bool) -> torch.Tensor:
    return out.relu() if relu else out


def _pooled(out: torch.Tensor, pool: int) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(out, pool) if pool else out


_lib.impl("conv_bn_relu", _ConvBNReLUAutograd.apply, "Autograd")


# ------------------------------------------------------------------ conv + BN + ReLU + conv (+ residual)

@_impl("conv_bn_relu_conv")
def conv_bn_relu_conv(x, weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                      bn_momentum, bn_eps, conv2_weight, stride, padding, padding2, bn_group=None, residual=None):
    """Training-mode ``conv2d(relu(batch_norm(conv2d(x, weight))), conv2_weight) [+ residual]``, the second
    conv with stride 1 and no BatchNorm after it (a pre-activation block's conv1 -> BN -> ReLU -> conv2, the
    residual sum added in conv2's epilogue): (out, y, stats). The ReLU's output is never written: conv2
    applies BN + ReLU to y as it loads it."""
    group = S.group_named(bn_group)
    bn = L.BatchNormArgs(bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                         bn_momentum, bn_eps)
    y, stats = L.conv(x, weight, stride, padding, dtype=x.dtype, epilogue=L.EPI_STATS, bn=S.local_args(bn, group))
    stats = S.maybe_sync_stats(y, stats, bn, group)
    if residual is not None:
        residual = _in_conv_output_layout(residual, y, conv2_weight, padding2)
    out, _ = L.conv(y, conv2_weight, 1, padding2, dtype=x.dtype, prologue=L.PRO_BN_RELU, pro=stats,
                    residual=residual)
    return out, y, stats


def _in_conv_output_layout(t: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``t`` with the strides of ``conv2d(a, weight)``'s output (the epilogue reads it with them): a copy
    only when it has others."""
    shape, strides = L.conv_output_layout(tuple(a.shape), a.stride(), tuple(weight.shape), 1, padding)
    if any(x != y for x, y, n in zip(t.stride(), strides, shape) if n > 1):
        return torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device).copy_(t)
    return t


@torch.library.register_fake("fastres::conv_bn_relu_conv")
def _conv_bn_relu_conv_fake(x, weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked,
                            bn_momentum, bn_eps, conv2_weight, stride, padding, padding2, bn_group=None,
                            residual=None):
    y = _empty_conv_output(x, weight, stride, padding, dtype=x.dtype)
    return _empty_conv_output(y, conv2_weight, 1, padding2, dtype=x.dtype), y, _stats_like(y)


@_impl("conv_bn_relu_conv_backward")
def conv_bn_relu_conv_backward(dout, x, weight, bn_weight, bn_bias, bn_eps, y, stats, conv2_weight, stride, padding,
                               padding2, input_grad, bn_group=None):
    """The gradients of :func:`conv_bn_relu_conv` but the residual's (which is ``dout`` itself)."""
    group = S.group_named(bn_group)
    dout = _in_conv_output_layout(dout, y, conv2_weight, padding2)
    bn = L.BatchNormArgs(bn_weight, bn_bias, None, None, None, None, bn_eps)
    # dL/dy through conv2: the ReLU mask and the BN's backward sums in the data gradient's epilogue.
    g_masked, coefs = L.conv(dout, conv2_weight, 1, padding2, dtype=x.dtype, transposed=True,
                             out_hw=tuple(y.shape[2:]), epilogue=L.EPI_RELU_GRAD, ey=y, bn=bn, stats=stats)
    dw2 = L.conv_wgrad(dout, y, conv2_weight, 1, padding2, x_pro=stats)
    coefs = S.maybe_sync_coefs(coefs, stats, bn_weight, y, group)
    if input_grad and L.grads_fusable(weight, stride, padding) and L.same_layout(g_masked, y):
        dx, _, dweight = L.conv_grads(g_masked, weight, x, dy2=y, dy_pro=coefs.packed)
        return dx, dweight, coefs.dweight, coefs.dbias, dw2
    dx = _absent(x)
    if input_grad:
        dx, _ = L.conv(g_masked, weight, stride, padding, dtype=x.dtype, transposed=True, out_hw=tuple(x.shape[2:]),
                       prologue=L.PRO_BN_GRAD, a2=y, pro=coefs.packed)
    dweight = L.conv_wgrad(g_masked, x, weight, stride, padding, dy2=y, dy_pro=coefs.packed)
    return dx, dweight, coefs.dweight, coefs.dbias, dw2


@torch.library.register_fake("fastres::conv_bn_relu_conv_backward")
def _conv_bn_relu_conv_backward_fake(dout, x, weight, bn_weight, bn_bias, bn_eps, y, stats, conv2_weight, stride,
                                     padding, padding2, input_grad, bn_group=None):
    dx = _absent(x)
    if input_grad:  # conv's transposed output of g_masked, which has y's layout
        dx = _empty_conv_output(y, weight, stride, padding, dtype=x.dtype, transposed=True,
                                out_hw=tuple(x.shape[2:]))
    return (dx, torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_weight),
            torch.empty_like(conv2_weight))


class _ConvBNReLUConvAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                conv2_weight, stride, padding, padding2, bn_group=None, residual=None):
        args = (x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                conv2_weight, stride, padding, padding2, bn_group, residual)
        out, y, stats = _forward(conv_bn_relu_conv, torch.ops.fastres.conv_bn_relu_conv, args)
        # Not the residual: its gradient is dout, whatever its value (saving it would keep it alive).
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, y, stats, conv2_weight)
        ctx.has_residual = residual is not None
        ctx.conv = (stride, padding, padding2)
        ctx.eps = eps
        ctx.bn_group = bn_group
        ctx.mark_non_differentiable(y, stats)
        ctx.set_materialize_grads(False)
        return out, y, stats

    @staticmethod
    def backward(ctx, dout, _dy, _dstats):
        x, weight, bn_weight, bn_bias, y, stats, conv2_weight = ctx.saved_tensors
        stride, padding, padding2 = ctx.conv
        dres = dout if ctx.has_residual else None
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable in turn
            def forward(x, weight, bn_weight, bn_bias, conv2_weight):
                h = _plain_conv_bn(x, weight, bn_weight, bn_bias, ctx.eps, stride, padding).relu()
                return torch.nn.functional.conv2d(h, conv2_weight.to(h.dtype), padding=padding2)

            grads = _differentiable_grads(ctx, dout, (x, weight, bn_weight, bn_bias, conv2_weight), forward,
                                          (0, 1, 2, 3, 9))
            return (grads[:14] + (dres,))[:len(ctx.needs_input_grad)]
        input_grad = ctx.needs_input_grad[0]
        backward = (conv_bn_relu_conv_backward if _is_plain_eager(dout)
                    else torch.ops.fastres.conv_bn_relu_conv_backward)
        dx, dweight, dbn_weight, dbn_bias, dw2 = backward(dout, x, weight, bn_weight, bn_bias, ctx.eps, y, stats,
                                                          conv2_weight, stride, padding, padding2, input_grad,
                                                          ctx.bn_group)
        # The residual's gradient is dout itself: no copy (an op's outputs may not alias its inputs, but an
        # autograd Function's gradients may).
        return ((dx if input_grad else None), dweight, dbn_weight, dbn_bias, *(None,) * 5, dw2, None, None, None, None,
                dres)[:len(ctx.needs_input_grad)]


_lib.impl("conv_bn_relu_conv", _ConvBNReLUConvAutograd.apply, "Autograd")


# ------------------------------------------------------------------ BN + ReLU of any tensor

@_impl("bn_relu")
def bn_relu(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked, bn_momentum, bn_eps,
            bn_group=None):
    """Training-mode ``relu(batch_norm(x))`` of a tensor no fused conv produced (a pre-activation network's
    last residual sum): its statistics in one pass, then one pass that applies them: (out, stats)."""
    group = S.group_named(bn_group)
    bn = L.BatchNormArgs(bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked, bn_momentum,
                         bn_eps)
    stats = S.maybe_sync_stats(x, L.bn_stats(x, S.local_args(bn, group)), bn, group)
    return L.bn_relu_apply(x, stats), stats


@torch.library.register_fake("fastres::bn_relu")
def _bn_relu_fake(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_num_batches_tracked, bn_momentum,
                  bn_eps, bn_group=None):
    return torch.empty_like(x), _stats_like(x)


@_impl("bn_relu_backward")
def bn_relu_backward(dout, x, bn_weight, stats, bn_group=None):
    group = S.group_named(bn_group)
    g, coefs, _ = L.bn_relu_backward(_in_layout_of(dout, x), x, stats, bn_weight)
    coefs = S.maybe_sync_coefs(coefs, stats, bn_weight, x, group)
    return L.bn_grad_apply(g, x, coefs.packed), coefs.dweight, coefs.dbias


@torch.library.register_fake("fastres::bn_relu_backward")
def _bn_relu_backward_fake(dout, x, bn_weight, stats, bn_group=None):
    return torch.empty_like(x), torch.empty_like(bn_weight), torch.empty_like(bn_weight)


class _BNReLUAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                bn_group=None):
        args = (x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, bn_group)
        out, stats = _forward(bn_relu, torch.ops.fastres.bn_relu, args)
        ctx.save_for_backward(x, bn_weight, bn_bias, stats)
        ctx.eps = eps
        ctx.bn_group = bn_group
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return out, stats

    @staticmethod
    def backward(ctx, dout, _dstats):
        x, bn_weight, bn_bias, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable in turn
            return _differentiable_grads(
                ctx, dout, (x, bn_weight, bn_bias),
                lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=ctx.eps).relu())
        backward = bn_relu_backward if _is_plain_eager(dout) else torch.ops.fastres.bn_relu_backward
        dx, dweight, dbias = backward(dout, x, bn_weight, stats, ctx.bn_group)
        return ((dx if ctx.needs_input_grad[0] else None), dweight, dbias,
                *(None,) * 6)[:len(ctx.needs_input_grad)]


_lib.impl("bn_relu", _BNReLUAutograd.apply, "Autograd")


# ------------------------------------------------------------------ pre-activation block

@_impl("preact_block")
def preact_block(x, bn0_weight, bn0_bias, bn0_running_mean, bn0_running_var, bn0_num_batches_tracked, bn0_momentum,
                 bn0_eps, conv1_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                 bn1_num_batches_tracked, bn1_momentum, bn1_eps, conv2_weight, down_weight, stride, padding1, padding2,
                 down_padding, bn_group=None):
    """Training-mode pre-activation block: ``a = relu(bn0(x))``, ``conv2(relu(bn1(conv1(a)))) + shortcut``, the
    shortcut ``conv2d(a, down_weight)`` (stride ``stride``) when given, else ``x``: (out, stats0, y1, stats1).
    Neither ReLU's output is written: bn0's statistics come from one pass over x (``bn_stats``), and conv1,
    the projection and conv2 apply BN + ReLU to x and y1 as they load them; the sum is conv2's epilogue."""
    group = S.group_named(bn_group)
    bn0 = L.BatchNormArgs(bn0_weight, bn0_bias, bn0_running_mean, bn0_running_var, bn0_num_batches_tracked,
                          bn0_momentum, bn0_eps)
    bn1 = L.BatchNormArgs(bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, bn1_num_batches_tracked,
                          bn1_momentum, bn1_eps)
    stats0 = S.maybe_sync_stats(x, L.bn_stats(x, S.local_args(bn0, group)), bn0, group)
    y1, stats1 = L.conv(x, conv1_weight, stride, padding1, dtype=x.dtype, prologue=L.PRO_BN_RELU, pro=stats0,
                        epilogue=L.EPI_STATS, bn=S.local_args(bn1, group))
    stats1 = S.maybe_sync_stats(y1, stats1, bn1, group)
    if down_weight is not None:
        shortcut, _ = L.conv(x, down_weight, stride, down_padding, dtype=x.dtype, prologue=L.PRO_BN_RELU, pro=stats0)
    else:
        shortcut = x
    shortcut = _in_conv_output_layout(shortcut, y1, conv2_weight, padding2)
    out, _ = L.conv(y1, conv2_weight, 1, padding2, dtype=x.dtype, prologue=L.PRO_BN_RELU, pro=stats1,
                    residual=shortcut)
    return out, stats0, y1, stats1


@torch.library.register_fake("fastres::preact_block")
def _preact_block_fake(x, bn0_weight, bn0_bias, bn0_running_mean, bn0_running_var, bn0_num_batches_tracked,
                       bn0_momentum, bn0_eps, conv1_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                       bn1_num_batches_tracked, bn1_momentum, bn1_eps, conv2_weight, down_weight, stride, padding1,
                       padding2, down_padding, bn_group=None):
    y1 = _empty_conv_output(x, conv1_weight, stride, padding1, dtype=x.dtype)
    out = _empty_conv_output(y1, conv2_weight, 1, padding2, dtype=x.dtype)
    return out, _stats_like(x), y1, _stats_like(y1)


@_impl("preact_block_backward")
def preact_block_backward(dout, x, bn0_weight, bn0_bias, bn0_eps, stats0, conv1_weight, bn1_weight, bn1_bias,
                          bn1_eps, y1, stats1, conv2_weight, down_weight, stride, padding1, padding2, down_padding,
                          input_grad, bn_group=None):
    """The gradients of :func:`preact_block` (``ddown_weight`` empty without a projection)."""
    group = S.group_named(bn_group)
    dtype = x.dtype
    dout = _in_conv_output_layout(dout, y1, conv2_weight, padding2)
    bn0 = L.BatchNormArgs(bn0_weight, bn0_bias, None, None, None, None, bn0_eps)
    bn1 = L.BatchNormArgs(bn1_weight, bn1_bias, None, None, None, None, bn1_eps)
    # Through conv2: ReLU1's mask and BN1's backward sums in the data gradient's epilogue.
    g1, coefs1 = L.conv(dout, conv2_weight, 1, padding2, dtype=dtype, transposed=True, out_hw=tuple(y1.shape[2:]),
                        epilogue=L.EPI_RELU_GRAD, ey=y1, bn=bn1, stats=stats1)
    dw2 = L.conv_wgrad(dout, y1, conv2_weight, 1, padding2, x_pro=stats1)
    coefs1 = S.maybe_sync_coefs(coefs1, stats1, bn1_weight, y1, group)
    # Through conv1 (and the projection, whose data gradient joins before ReLU0's mask): BN0's sums.
    projected, dwd = None, _absent(x)
    if down_weight is not None:
        projected, _ = L.conv(dout, down_weight, stride, down_padding, dtype=dtype, transposed=True,
                              out_hw=tuple(x.shape[2:]))
        dwd = L.conv_wgrad(dout, x, down_weight, stride, down_padding, x_pro=stats0)
    if projected is None and L.grads_fusable(conv1_weight, stride, padding1) and L.same_layout(g1, y1):
        ga, coefs0, dw1 = L.conv_grads(g1, conv1_weight, x, dy2=y1, dy_pro=coefs1.packed, x_pro=stats0,
                                       epilogue=L.EPI_RELU_GRAD, ey=x, bn=bn0, stats=stats0)
    else:
        ga, coefs0 = L.conv(g1, conv1_weight, stride, padding1, dtype=dtype, transposed=True,
                            out_hw=tuple(x.shape[2:]), prologue=L.PRO_BN_GRAD, a2=y1, pro=coefs1.packed,
                            epilogue=L.EPI_RELU_GRAD, ey=x, bn=bn0, stats=stats0, residual=projected)
        dw1 = L.conv_wgrad(g1, x, conv1_weight, stride, padding1, dy2=y1, dy_pro=coefs1.packed, x_pro=stats0)
    coefs0 = S.maybe_sync_coefs(coefs0, stats0, bn0_weight, x, group)
    dx = _absent(x)
    if input_grad:  # BN0's input gradient, the identity shortcut's (dout) joining it
        dx = L.bn_grad_apply(ga, x, coefs0.packed, None if down_weight is not None else _in_layout_of(dout, x))
    return dx, coefs0.dweight, coefs0.dbias, dw1, coefs1.dweight, coefs1.dbias, dw2, dwd


@torch.library.register_fake("fastres::preact_block_backward")
def _preact_block_backward_fake(dout, x, bn0_weight, bn0_bias, bn0_eps, stats0, conv1_weight, bn1_weight, bn1_bias,
                                bn1_eps, y1, stats1, conv2_weight, down_weight, stride, padding1, padding2,
                                down_padding, input_grad, bn_group=None):
    return (torch.empty_like(x) if input_grad else _absent(x), torch.empty_like(bn0_weight),
            torch.empty_like(bn0_weight), torch.empty_like(conv1_weight), torch.empty_like(bn1_weight),
            torch.empty_like(bn1_weight), torch.empty_like(conv2_weight),
            torch.empty_like(down_weight) if down_weight is not None else _absent(x))


class _PreactBlockAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        outputs = _forward(preact_block, torch.ops.fastres.preact_block, args)
        x, g0, b0, eps0, w1, g1, b1, eps1, w2, wd = (args[0], args[1], args[2], args[7], args[8], args[9], args[10],
                                                    args[15], args[16], args[17])
        ctx.conv = tuple(args[18:22])  # stride, padding1, padding2, down_padding
        ctx.bn_group = args[22] if len(args) > 22 else None
        ctx.eps = (eps0, eps1)
        _, stats0, y1, stats1 = outputs
        ctx.save_for_backward(x, g0, b0, stats0, w1, g1, b1, y1, stats1, w2, wd)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, dout, *_saved_grads):
        x, g0, b0, stats0, w1, g1, b1, y1, stats1, w2, wd = ctx.saved_tensors
        stride, padding1, padding2, down_padding = ctx.conv
        eps0, eps1 = ctx.eps
        has_down = wd is not None
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable in turn
            def block(x, g0, b0, w1, g1, b1, w2, *rest):
                a = torch.nn.functional.batch_norm(x, None, None, g0, b0, training=True, eps=eps0).relu()
                h = _plain_conv_bn(a, w1, g1, b1, eps1, stride, padding1).relu()
                out = torch.nn.functional.conv2d(h, w2.to(h.dtype), padding=padding2)
                if has_down:
                    return out + torch.nn.functional.conv2d(a, rest[0].to(a.dtype), stride=stride, padding=down_padding)
                return out + x

            index = (0, 1, 2, 8, 9, 10, 16) + ((17,) if has_down else ())
            inputs = (x, g0, b0, w1, g1, b1, w2) + ((wd,) if has_down else ())
            return _differentiable_grads(ctx, dout, inputs, block, index)
        input_grad = ctx.needs_input_grad[0]
        backward = preact_block_backward if _is_plain_eager(dout) else torch.ops.fastres.preact_block_backward
        dx, dg0, db0, dw1, dg1, db1, dw2, dwd = backward(dout, x, g0, b0, eps0, stats0, w1, g1, b1, eps1, y1, stats1,
                                                         w2, wd, stride, padding1, padding2, down_padding, input_grad,
                                                         ctx.bn_group)
        none5 = (None,) * 5  # running statistics, num_batches_tracked, momentum, eps
        return ((dx if input_grad else None), dg0, db0, *none5, dw1, dg1, db1, *none5, dw2,
                dwd if has_down else None, None, None, None, None, None)[:len(ctx.needs_input_grad)]


_lib.impl("preact_block", _PreactBlockAutograd.apply, "Autograd")


# ------------------------------------------------------------------ residual block

@_impl("residual_block")
def residual_block(x, conv1_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, bn1_num_batches_tracked,
                   bn1_momentum, bn1_eps, conv2_weight, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var,
                   bn2_num_batches_tracked, bn2_momentum, bn2_eps, down_weight, bnd_weight, bnd_bias,
                   bnd_running_mean, bnd_running_var, bnd_num_batches_tracked, bnd_momentum, bnd_eps, stride,
                   bn_group=None, padding1=1, padding2=1, down_padding=1, residual=None, down_input=None,
                   after_relu=False):
    """Training-mode ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)`` (``after_relu``:
    ``relu(bn2(...)) + shortcut``, the residual added after the ReLU, as ResNet-9): the shortcut ``bnd(down(x))`` with
    a downsample (``bnd(down(down_input))`` when ``down_input`` is given: a bottleneck's projection of the
    block's input), else the tensor ``residual`` when given, else ``x``. conv1 has ``stride`` and ``padding1``,
    conv2 stride 1 and ``padding2``, the downsample ``stride`` and ``down_padding`` (any kernel sizes the
    conv kernel takes). Returns (out, y1, stats1, y2, stats2, yd, statsd), the last two empty without a
    downsample."""
    _check_after_relu(after_relu, down_weight)
    dtype = x.dtype
    bn1 = L.BatchNormArgs(bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, bn1_num_batches_tracked,
                          bn1_momentum, bn1_eps)
    bn2 = L.BatchNormArgs(bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, bn2_num_batches_tracked,
                          bn2_momentum, bn2_eps)
    group = S.group_named(bn_group)
    bnd = None
    if down_weight is not None:
        bnd = L.BatchNormArgs(bnd_weight, bnd_bias, bnd_running_mean, bnd_running_var, bnd_num_batches_tracked,
                              bnd_momentum, bnd_eps)
    if (bnd is not None and down_input is None and _pairs(conv1_weight, down_weight, padding1, down_padding)
            and L.pair_bn_flags_match(S.local_args(bn1, group), S.local_args(bnd, group))):
        # conv1 and the projection read x once, in one launch.
        y1, s1, yd, sd = L.conv_pair(x, conv1_weight, down_weight, stride, padding1, dtype=dtype,
                                     bn=S.local_args(bn1, group), bn2=S.local_args(bnd, group))
        sd = S.maybe_sync_stats(yd, sd, bnd, group)
    else:
        y1, s1 = L.conv(x, conv1_weight, stride, padding1, dtype=dtype, epilogue=L.EPI_STATS,
                        bn=S.local_args(bn1, group))
        if bnd is not None:
            yd, sd = L.conv(x if down_input is None else down_input, down_weight, stride, down_padding, dtype=dtype,
                            epilogue=L.EPI_STATS, bn=S.local_args(bnd, group))
            sd = S.maybe_sync_stats(yd, sd, bnd, group)
    s1 = S.maybe_sync_stats(y1, s1, bn1, group)
    y2, s2 = L.conv(y1, conv2_weight, 1, padding2, dtype=dtype, prologue=L.PRO_BN_RELU, pro=s1, epilogue=L.EPI_STATS,
                    bn=S.local_args(bn2, group))
    s2 = S.maybe_sync_stats(y2, s2, bn2, group)
    if down_weight is None:
        out = L.bn_relu_apply(y2, s2, x if residual is None else residual, after_relu=after_relu)
        return out, y1, s1, y2, s2, _absent(x), _absent(s1)
    return L.bn_relu_apply(y2, s2, yd, sd), y1, s1, y2, s2, yd, sd


def _check_after_relu(after_relu: bool, down_weight) -> None:
    if after_relu and down_weight is not None:
        raise ValueError("fastres.residual_block: after_relu=True takes a tensor or identity shortcut, not a "
                         "projection (down_weight was given)")


def _pairs(conv1_weight: torch.Tensor, down_weight: torch.Tensor, padding1: int, down_padding: int) -> bool:
    """Whether conv1 and the downsample conv can share launches (``conv_pair`` forward, ``PAIR_OPERANDS``
    data gradients): the same weight shape, strides, dtype and padding."""
    return (down_weight.shape == conv1_weight.shape and down_weight.stride() == conv1_weight.stride()
            and down_weight.dtype == conv1_weight.dtype and down_padding == padding1)


@torch.library.register_fake("fastres::residual_block")
def _residual_block_fake(x, conv1_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                         bn1_num_batches_tracked, bn1_momentum, bn1_eps, conv2_weight, bn2_weight, bn2_bias,
                         bn2_running_mean, bn2_running_var, bn2_num_batches_tracked, bn2_momentum, bn2_eps, down_weight,
                         bnd_weight, bnd_bias, bnd_running_mean, bnd_running_var, bnd_num_batches_tracked, bnd_momentum,
                         bnd_eps, stride, bn_group=None, padding1=1, padding2=1, down_padding=1, residual=None,
                         down_input=None, after_relu=False):
    _check_after_relu(after_relu, down_weight)
    y1 = _empty_conv_output(x, conv1_weight, stride, padding1, dtype=x.dtype)
    y2 = _empty_conv_output(y1, conv2_weight, 1, padding2, dtype=x.dtype)
    s1, s2 = _stats_like(y1), _stats_like(y2)
    if down_weight is None:
        yd, sd = _absent(x), _absent(s1)
    else:
        yd = _empty_conv_output(x if down_input is None else down_input, down_weight, stride, down_padding,
                                dtype=x.dtype)
        sd = _stats_like(yd)
    return torch.empty_like(y2), y1, s1, y2, s2, yd, sd


@_impl("residual_block_backward")
def residual_block_backward(dout, x, conv1_weight, bn1_weight, bn1_bias, bn1_eps, y1, stats1, conv2_weight,
                            bn2_weight, y2, stats2, down_weight, bnd_weight, yd, statsd, stride, input_grad,
                            bn_group=None, padding1=1, padding2=1, down_padding=1, residual=None, down_input=None,
                            after_relu=False):
    """The gradients of :func:`residual_block`; ``dresidual`` (the tail's masked gradient g) is empty unless
    the shortcut was the tensor ``residual`` added before the ReLU (after it, its gradient is ``dout`` itself,
    which the autograd Function returns: an op's outputs may not alias its inputs), ``ddown_input`` unless
    ``down_input`` was given."""
    dtype = x.dtype
    group = S.group_named(bn_group)
    has_down = down_weight is not None
    dout = _in_layout_of(dout, y2)
    if has_down:
        g, coefs2, coefs_d = L.bn_relu_backward(dout, y2, stats2, bn2_weight, yd, statsd, bnd_weight)
        coefs_d = S.maybe_sync_coefs(coefs_d, statsd, bnd_weight, yd, group)
    elif after_relu:  # the ReLU saw the BN's output alone; the shortcut's gradient is dout, unmasked
        g, coefs2, _ = L.bn_relu_backward(dout, y2, stats2, bn2_weight)
    else:
        g, coefs2, _ = L.bn_relu_backward(dout, y2, stats2, bn2_weight, x if residual is None else residual)
    shortcut_grad = dout if after_relu else g
    coefs2 = S.maybe_sync_coefs(coefs2, stats2, bn2_weight, y2, group)
    # dL/d(y1) through conv2: BN2 backward on load, ReLU1 mask and BN1's backward in the epilogue.
    bn1 = L.BatchNormArgs(bn1_weight, bn1_bias, None, None, None, None, bn1_eps)
    if L.grads_fusable(conv2_weight, 1, padding2):
        # conv2's weight gradient in the same launch: g, y2 and y1 are read once.
        g1_masked, coefs1, dw2 = L.conv_grads(g, conv2_weight, y1, dy2=y2, dy_pro=coefs2.packed, x_pro=stats1,
                                              epilogue=L.EPI_RELU_GRAD, ey=y1, bn=bn1, stats=stats1)
    else:
        g1_masked, coefs1 = L.conv(g, conv2_weight, 1, padding2, dtype=dtype, transposed=True,
                                   out_hw=tuple(y1.shape[2:]), prologue=L.PRO_BN_GRAD, a2=y2, pro=coefs2.packed,
                                   epilogue=L.EPI_RELU_GRAD, ey=y1, bn=bn1, stats=stats1)
        dw2 = L.conv_wgrad(g, y1, conv2_weight, 1, padding2, dy2=y2, dy_pro=coefs2.packed, x_pro=stats1)
    coefs1 = S.maybe_sync_coefs(coefs1, stats1, bn1_weight, y1, group)
    dwd, dgd, dbd = _absent(x), _absent(stats1), _absent(stats1)
    separate = has_down and down_input is not None  # the projection reads another tensor than x
    ddown = _absent(x)
    if has_down:
        dwd = L.conv_wgrad(g, down_input if separate else x, down_weight, stride, down_padding, dy2=yd,
                           dy_pro=coefs_d.packed)
        dgd, dbd = coefs_d.dweight, coefs_d.dbias
    if separate:
        ddown, _ = L.conv(g, down_weight, stride, down_padding, dtype=dtype, transposed=True,
                          out_hw=tuple(down_input.shape[2:]), prologue=L.PRO_BN_GRAD, a2=yd, pro=coefs_d.packed)
    identity = not has_down and residual is None
    dresidual = g if residual is not None and not after_relu else _absent(x)
    grads = (coefs1.dweight, coefs1.dbias, dw2, coefs2.dweight, coefs2.dbias, dwd, dgd, dbd, dresidual, ddown)
    dx = _absent(x)
    if (input_grad and (not has_down or separate) and L.grads_fusable(conv1_weight, stride, padding1)
            and L.same_layout(g, g1_masked)):
        # Both of conv1's gradients in one launch, an identity residual's gradient added to dx.
        dx, _, dw1 = L.conv_grads(g1_masked, conv1_weight, x, dy2=y1, dy_pro=coefs1.packed,
                                  residual=shortcut_grad if identity else None)
        return (dx, dw1, *grads)
    if (input_grad and has_down and not separate and _pairs(conv1_weight, down_weight, padding1, down_padding)
            and L.same_layout(g, g1_masked) and L.same_layout(yd, g1_masked)):
        # Both data gradients in one launch: conv1's and the projection's.
        dx, _ = L.conv(g1_masked, conv1_weight, stride, padding1, dtype=dtype, transposed=True,
                       out_hw=tuple(x.shape[2:]), prologue=L.PRO_BN_GRAD, a2=y1, pro=coefs1.packed,
                       b=g, b2=yd, pro_b=coefs_d.packed, weight_b=down_weight)
    elif input_grad:
        residual_grad = shortcut_grad if identity else None
        if has_down and not separate:
            residual_grad, _ = L.conv(g, down_weight, stride, down_padding, dtype=dtype, transposed=True,
                                      out_hw=tuple(x.shape[2:]), prologue=L.PRO_BN_GRAD, a2=yd, pro=coefs_d.packed)
        dx, _ = L.conv(g1_masked, conv1_weight, stride, padding1, dtype=dtype, transposed=True,
                       out_hw=tuple(x.shape[2:]), prologue=L.PRO_BN_GRAD, a2=y1, pro=coefs1.packed,
                       residual=residual_grad)
    dw1 = L.conv_wgrad(g1_masked, x, conv1_weight, stride, padding1, dy2=y1, dy_pro=coefs1.packed)
    return (dx, dw1, *grads)


@torch.library.register_fake("fastres::residual_block_backward")
def _residual_block_backward_fake(dout, x, conv1_weight, bn1_weight, bn1_bias, bn1_eps, y1, stats1, conv2_weight,
                                  bn2_weight, y2, stats2, down_weight, bnd_weight, yd, statsd, stride, input_grad,
                                  bn_group=None, padding1=1, padding2=1, down_padding=1, residual=None,
                                  down_input=None, after_relu=False):
    dx = _absent(x)
    if input_grad:  # g has y2's layout; g1_masked is conv2's transposed output of it; dx conv1's of that
        g1_masked = _empty_conv_output(y2, conv2_weight, 1, padding2, dtype=x.dtype, transposed=True,
                                       out_hw=tuple(y1.shape[2:]))
        dx = _empty_conv_output(g1_masked, conv1_weight, stride, padding1, dtype=x.dtype, transposed=True,
                                out_hw=tuple(x.shape[2:]))
    dwd, dgd, dbd = _absent(x), _absent(stats1), _absent(stats1)
    if down_weight is not None:
        dwd, dgd, dbd = torch.empty_like(down_weight), torch.empty_like(bnd_weight), torch.empty_like(bnd_weight)
    dresidual = torch.empty_like(y2) if residual is not None and not after_relu else _absent(x)
    ddown = _absent(x)
    if down_input is not None and down_weight is not None:  # g (y2.s layout) through the projection transposed
        ddown = _empty_conv_output(y2, down_weight, stride, down_padding, dtype=x.dtype, transposed=True,
                                   out_hw=tuple(down_input.shape[2:]))
    return (dx, torch.empty_like(conv1_weight), torch.empty_like(bn1_weight), torch.empty_like(bn1_weight),
            torch.empty_like(conv2_weight), torch.empty_like(bn2_weight), torch.empty_like(bn2_weight), dwd, dgd, dbd,
            dresidual, ddown)


class _ResidualBlockAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        outputs = _forward(residual_block, torch.ops.fastres.residual_block, args)
        x, w1, g1, b1, eps1, w2, g2, b2 = args[0], args[1], args[2], args[3], args[8], args[9], args[10], args[11]
        wd, gd, bd, stride = args[17], args[18], args[19], args[25]
        ctx.bn_group = args[26] if len(args) > 26 else None
        # padding1, padding2, down_padding, residual (the schema's defaults when not given)
        ctx.paddings = tuple(args[27:30]) + (1, 1, 1)[len(args[27:30]):]
        residual = args[30] if len(args) > 30 else None
        down_input = args[31] if len(args) > 31 else None
        ctx.after_relu = args[32] if len(args) > 32 else False
        _, y1, s1, y2, s2, yd, sd = outputs
        ctx.save_for_backward(x, w1, g1, b1, y1, s1, w2, g2, y2, s2, wd, gd, yd, sd, b2, bd, residual, down_input)
        ctx.eps1, ctx.stride = eps1, stride
        ctx.eps2, ctx.epsd = args[16], args[24]
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of the saved activations
        return outputs

    @staticmethod
    def backward(ctx, dout, *_saved_grads):
        x, w1, g1, b1, y1, s1, w2, g2, y2, s2, wd, gd, yd, sd, b2, bd, residual, down_input = ctx.saved_tensors
        has_down = wd is not None
        padding1, padding2, down_padding = ctx.paddings
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable in turn
            def block(x, w1, g1, b1, w2, g2, b2, *rest):
                stride = ctx.stride
                h = _plain_conv_bn(x, w1, g1, b1, ctx.eps1, stride, padding1).relu()
                if has_down:
                    shortcut = _plain_conv_bn(x if down_input is None else rest[3], rest[0], rest[1], rest[2],
                                              ctx.epsd, stride, down_padding)
                else:
                    shortcut = rest[0] if residual is not None else x
                if ctx.after_relu:
                    return _plain_conv_bn(h, w2, g2, b2, ctx.eps2, 1, padding2).relu() + shortcut
                return (_plain_conv_bn(h, w2, g2, b2, ctx.eps2, 1, padding2) + shortcut).relu()

            # Positions of the op's differentiable arguments (x, conv1_weight, bn1_weight, ...) in its schema.
            index = (0, 1, 2, 3, 9, 10, 11) + ((17, 18, 19) if has_down else (30,) if residual is not None else ())
            inputs = (x, w1, g1, b1, w2, g2, b2) + ((wd, gd, bd) if has_down else
                                                    (residual,) if residual is not None else ())
            if has_down and down_input is not None:
                index, inputs = index + (31,), inputs + (down_input,)
            return _differentiable_grads(ctx, dout, inputs, block, index)
        input_grad = ctx.needs_input_grad[0]
        backward = residual_block_backward if _is_plain_eager(dout) else torch.ops.fastres.residual_block_backward
        dx, dw1, dg1, db1, dw2, dg2, db2, dwd, dgd, dbd, dres, ddown = backward(
            dout, x, w1, g1, b1, ctx.eps1, y1, s1, w2, g2, y2, s2, wd, gd,
            yd if has_down else None, sd if has_down else None, ctx.stride, input_grad, ctx.bn_group,
            padding1, padding2, down_padding, residual, down_input, ctx.after_relu)
        if not has_down:
            dwd = dgd = dbd = None
        none4 = (None,) * 4  # running statistics, num_batches_tracked, momentum, eps
        return ((dx if input_grad else None), dw1, dg1, db1, *none4, None, dw2, dg2, db2, *none4, None,
                dwd, dgd, dbd, *none4, None, None, None, None, None, None,
                (dout if ctx.after_relu else dres) if residual is not None else None,
                ddown if down_input is not None else None, None)[:len(ctx.needs_input_grad)]


_lib.impl("residual_block", _ResidualBlockAutograd.apply, "Autograd")


# ------------------------------------------------------------------ double backward

def _plain_conv_bn(x, weight, bn_weight, bn_bias, eps, stride, padding):
    """Training-mode ``batch_norm(conv2d(x, weight))`` (batch statistics, no running statistics) in
    PyTorch's differentiable ops; the weight in x's dtype, as autocast runs the fused ops."""
    y = torch.nn.functional.conv2d(x, weight.to(x.dtype), stride=stride, padding=padding)
    return torch.nn.functional.batch_norm(y, None, None, bn_weight, bn_bias, training=True, eps=eps)


def _differentiable_grads(ctx, dout, inputs, forward, index=None):
    """The gradients of a fused training op for ``create_graph=True`` (gradient penalties, double
    backward): its forward recomputed from the saved inputs in PyTorch's ops, then differentiated
    with a graph, so second-order gradients are PyTorch's. ``inputs``: the op's differentiable
    arguments, at ``index`` in its argument list (default: the first ones); the statistics come from
    this batch as in the forward, and nothing is updated."""
    if ctx.bn_group is not None:
        raise RuntimeError("fastres: double backward (create_graph=True) through a fused op whose BatchNorms "
                           "synchronise across processes is not supported; use torch.nn modules for it")
    index = tuple(range(len(inputs))) if index is None else index
    wanted = [i for i, position in enumerate(index) if ctx.needs_input_grad[position]]
    grads = [None] * len(ctx.needs_input_grad)
    if not wanted or dout is None:
        return tuple(grads)
    with torch.enable_grad():
        out = forward(*inputs)
        found = torch.autograd.grad(out, [inputs[i] for i in wanted], dout, create_graph=True, allow_unused=True)
    for i, g in zip(wanted, found):
        grads[index[i]] = g
    return tuple(grads)


# ------------------------------------------------------------------ eval mode

@_impl("conv_bn_eval")
def conv_bn_eval(x, weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, stride, padding,
                 residual, relu):
    """Eval-mode ``conv2d -> BatchNorm2d (running statistics)`` [``+ residual``] [``-> ReLU``], one launch."""
    affine = L.BatchNormArgs(bn_weight, bn_bias, bn_running_mean, bn_running_var, None, None, bn_eps)
    out, _ = L.conv(x, weight, stride, padding, dtype=x.dtype, affine=affine, residual=residual, relu=relu)
    return out


@torch.library.register_fake("fastres::conv_bn_eval")
def _conv_bn_eval_fake(x, weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_eps, stride, padding,
                       residual, relu):
    return _empty_conv_output(x, weight, stride, padding, dtype=x.dtype)
