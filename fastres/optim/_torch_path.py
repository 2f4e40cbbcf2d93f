"""torch.optim's own implementations, for the tensors the kernels do not take.

CPU tensors without the interpreter, float64 params and anything else that
:func:`fastres.backend_for` sends to ``"torch"`` step through torch.optim's
functional entry points (``torch.optim.adam.adam`` and its siblings), with
the implementation torch runs fastest for that device, so a fastres optimizer
costs what the best torch.optim variant costs and gives its numbers. Same
signatures as :mod:`fastres.reference.optim` (the test oracle) and the
launchers; the state tensors are the ones fastres keeps, in torch's layout.

Which implementation (measured with ``benchmarks/test_optim.py``, CPU rows,
ResNet-20 and ResNet-18-CIFAR parameter sets, torch 2.13):

* CPU, SGD / Adam / AdamW / Adagrad: ``fused=True``, one pass over each tensor,
  2-10x faster than foreach or the for-loop.
* CPU, RMSprop / Adadelta (torch has no fused kernel): ``foreach=True`` in
  chunks of at most ``CHUNK_ELEMENTS`` elements. foreach makes one pass per
  math op over its whole tensor list: over a ResNet-18 (50 MB per state) each
  pass goes to memory and foreach is 2x slower than the for-loop, which keeps
  one tensor in cache; over small tensors the for-loop's per-tensor overhead
  loses to foreach. Chunks keep both: a chunk's tensors stay in cache across
  the passes, and small tensors share one call. A tensor larger than a chunk
  goes alone through the for-loop (foreach's intermediate lists of large
  tensors are what makes it slower there).
* CPU, bfloat16 / float16 params: the for-loop (``foreach=False``), torch's
  default on CPU and the one implementation right for them: torch 2.13's fused
  CPU kernels get 16-bit params wrong (SGD leaves the vectorised part of each
  tensor unchanged, 0.5-1.6 off the for-loop after three steps; fused AdamW
  reaches inf in float16), and foreach rounds SGD's momentum, Adagrad and
  RMSprop differently (1 bf16 ulp). ``tests/test_optim_torch_path.py`` holds
  every optimizer in every dtype to the for-loop.
* CUDA (float64 params): ``fused=True`` for SGD, Adam and AdamW; foreach for the
  others. Other devices: torch's own default.

``grad_scale``/``found_inf`` (GradScaler) go to torch's fused kernels; for the
other implementations the step is skipped on inf (reading the flag: a sync on
a GPU) and the gradients are unscaled out of place, as the kernels do.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.optim import adadelta as _adadelta
from torch.optim import adagrad as _adagrad
from torch.optim import adam as _adam
from torch.optim import rmsprop as _rmsprop
from torch.optim import sgd as _sgd

Scalar = Union[float, torch.Tensor]
Tensors = Sequence[torch.Tensor]

# Elements per foreach call on CPU (RMSprop, Adadelta): 1 MB per fp32 tensor, so
# the 4-5 tensor lists one update touches stay in a (shared) L3 cache.
CHUNK_ELEMENTS = 1 << 18

_FUSED = {"cpu": frozenset({"sgd", "adam", "adagrad"}), "cuda": frozenset({"sgd", "adam"})}


# Dtypes for which torch's fused and foreach CPU implementations are not the for-loop's update.
_FOR_LOOP_ONLY = {"cpu": frozenset({torch.float16, torch.bfloat16})}


def implementation(rule: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``"fused"``, ``"foreach"`` (whole list), ``"foreach-chunks"``, ``"for-loop"`` or ``"default"``
    (torch decides) for params of ``dtype`` on ``device``."""
    if dtype in _FOR_LOOP_ONLY.get(device.type, ()):
        return "for-loop"
    if rule in _FUSED.get(device.type, ()):
        return "fused"
    if device.type == "cpu":
        return "foreach-chunks"
    if device.type == "cuda":
        return "foreach"
    return "default"


def _chunks(params: Tensors) -> Iterator[slice]:
    """Index ranges of consecutive tensors holding at most CHUNK_ELEMENTS elements (a larger tensor alone)."""
    start, size = 0, 0
    for i, p in enumerate(params):
        n = p.numel()
        if size and size + n > CHUNK_ELEMENTS:
            yield slice(start, i)
            start, size = i, 0
        size += n
    if start < len(params):
        yield slice(start, len(params))


def _flags(implementation_: str) -> dict[str, Optional[bool]]:
    if implementation_ == "fused":
        return dict(fused=True)
    if implementation_ == "default":
        return dict(foreach=None)
    if implementation_ == "for-loop":
        return dict(foreach=False)
    return dict(foreach=True)


def _unscaled(
    grads: Tensors, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]
) -> Optional[list[torch.Tensor]]:
    """The gradients to use without torch's fused kernels, or None when GradScaler found inf/NaN (skip)."""
    if found_inf is not None and bool(found_inf.item() != 0):
        return None
    if grad_scale is None:
        return list(grads)
    return torch._foreach_div(list(grads), grad_scale.to(grads[0].device))


def _step(
    rule: str,
    functional: Callable[..., None],
    columns: Sequence[Tensors],
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    **kwargs: Any,
) -> None:
    """Call torch's functional ``rule`` on ``columns``: params, grads, then state lists ([] when unused)."""
    params = columns[0]
    if not params:
        return
    how = implementation(rule, params[0].device, params[0].dtype)
    columns = list(columns)  # the lists themselves: torch's SGD writes new momentum buffers into its list
    if how == "fused":  # torch's fused kernels unscale and skip on inf themselves
        kwargs.update(grad_scale=grad_scale, found_inf=found_inf)
    else:
        grads = _unscaled(columns[1], grad_scale, found_inf)
        if grads is None:
            return
        columns[1] = grads
    if how != "foreach-chunks":
        functional(*columns, **_flags(how), **kwargs)
        return
    for part in _chunks(params):
        # A tensor larger than a chunk goes alone through torch's for-loop: foreach's
        # intermediate lists of large tensors make it the slower one there.
        large = part.stop - part.start == 1 and params[part.start].numel() > CHUNK_ELEMENTS
        functional(*(c[part] for c in columns), **(dict(foreach=False) if large else _flags(how)), **kwargs)


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
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize)
    if momentum_buffers is None:
        _step("sgd", _sgd.sgd, [params, grads, []], grad_scale, found_inf, **hyper)
        return
    # torch starts a momentum buffer from the first gradient (given None for it)
    # and returns the new buffers in the list: they are copied into fastres'
    # state tensors, which keep their identity. Params on their first step and
    # the others step in separate calls, as torch's fused SGD requires.
    if not any(first_step):  # every step after the first: the lists as they are
        _step("sgd", _sgd.sgd, [params, grads, momentum_buffers], grad_scale, found_inf, **hyper)
        return
    for first in (True, False):
        index = [i for i, f in enumerate(first_step) if f == first]
        if not index:
            continue
        buffers: list[Optional[torch.Tensor]] = [None if first else momentum_buffers[i] for i in index]
        columns = [[params[i] for i in index], [grads[i] for i in index], buffers]
        _step("sgd", _sgd.sgd, columns, grad_scale, found_inf, **hyper)
        if first:
            for i, new in zip(index, buffers):
                if new is not None:  # None: GradScaler skipped the step
                    momentum_buffers[i].copy_(new)


def adam(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Tensors],
    steps: Tensors,
    *,
    lr: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    columns = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], steps]
    _step(
        "adam", _adam.adam, columns, grad_scale, found_inf, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
    )


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
    columns = [params, grads, square_avgs, grad_avgs or [], momentum_buffers or [], steps]
    _step(
        "rmsprop", _rmsprop.rmsprop, columns, grad_scale, found_inf, lr=lr, alpha=alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
    )


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
    _step(
        "adagrad", _adagrad.adagrad, [params, grads, state_sums, steps], grad_scale, found_inf,
        lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
    )


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
    _step(
        "adadelta", _adadelta.adadelta, [params, grads, square_avgs, acc_deltas, steps], grad_scale, found_inf,
        lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
    )
