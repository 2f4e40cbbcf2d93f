"""Kernel launching, the launch counter and launch observers.

Every Triton launch in fastres goes through :func:`launch`, so tests and tools
can count launches (:func:`fastres.testing.count_launches`), watch their
arguments (:func:`observe_launches`) or skip the kernel bodies to time the host
side alone (:func:`stub_launches`) without touching Triton.

:func:`launch` also keeps each compiled kernel it has launched, keyed by what
Triton specialises on, and calls it directly the next time: Triton's JIT path
(binding and specialising every argument, hashing the cache key, checking
globals) costs about 29 us of Python per launch on the 2-core dev VM, this path
about 13 us (``benchmarks/host_time.py --launch-path triton|kept``).

Triton launches on the *current* CUDA device and its current stream, whatever
device the tensors are on. Every entry point that launches (the operators in
``fastres.ops``, the optimizers' buckets, ``clip_grad_norm_``) therefore runs
under :func:`on_device_of`/:func:`device_guarded`, which make the tensors'
device current (a ``torch.cuda.device`` block only when it is not already), so
the launch, its stream and the workspaces keyed on that stream agree.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import operator
from typing import Any, Callable, Iterator, NamedTuple

import torch

# Called as observer(kernel, grid, args, meta) before each launch.
Observer = Callable[[Any, tuple, tuple, dict], None]
_observers: list[Observer] = []
_stubbed = 0
_triton_path = 0  # > 0: every launch takes Triton's own JIT path (for A/B timing)

# Per JIT kernel, by id (JITFunction's own hash digests its source on every call) with the kernel
# itself, which keeps the id from being reused: specialisation key -> _Compiled (see _specialisation_key).
_compiled: dict[int, tuple[Any, dict[tuple, "_Compiled"]]] = {}


class _Compiled(NamedTuple):
    kernel: Any  # triton.compiler.CompiledKernel
    tail: tuple  # values of the parameters after the positional arguments (constexprs, defaults)


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)  # Autotuner/Heuristics wrap a JITFunction
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", repr(fn))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch ``kernel[grid](*args, **meta)``; active observers see it first.

    A JIT kernel launched before with the same specialisation is called
    directly, with the arguments and hooks Triton's own path would pass
    (``tests/test_launch_path.py`` compares the two). Interpreted kernels,
    kernels with pre-run hooks and first launches take Triton's path.
    """
    for observer in _observers:
        observer(kernel, grid, args, meta)
    if _stubbed:
        return
    triton = _triton()
    if _triton_path or type(kernel) is not triton.JITFunction or kernel.pre_run_hooks:
        kernel[grid](*args, **meta)
        return
    driver = triton.driver.active
    # The device and stream Triton's own path takes (JITFunction.run: driver.active.get_current_device()):
    # the current CUDA device, which the entry points' device guard made the tensors' one.
    device = driver.get_current_device()
    key = _specialisation_key(device, args, meta)
    if key is None:  # an argument the key cannot stand for (e.g. a tuple of tensors)
        kernel[grid](*args, **meta)
        return
    _, per_kernel = _compiled.get(id(kernel)) or _compiled.setdefault(id(kernel), (kernel, {}))
    try:
        compiled = per_kernel.get(key)
    except TypeError:  # an unhashable keyword argument
        kernel[grid](*args, **meta)
        return
    if compiled is None:
        compiled = kernel[grid](*args, **meta)
        if compiled is not None:  # None: a JIT cache hook took the launch
            per_kernel[key] = _compiled_launch(kernel, compiled, len(args), meta)
        return
    stream = driver.get_current_stream(device)
    full = (*args, *compiled.tail)
    ck = compiled.kernel
    hooks = triton.knobs.runtime
    ck.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, ck.function,
           ck.packed_metadata, ck.launch_metadata(grid, stream, *full), hooks.launch_enter_hook,
           hooks.launch_exit_hook, *full)


def _specialisation_key(device: int, args: tuple, meta: dict) -> tuple | None:
    """Everything Triton's specialisation can depend on, and more: the arguments' types, each
    tensor's dtype and 16-byte alignment, every int, bool or None by value (floats by type only:
    Triton passes them as fp32 whatever their value), and the keyword arguments (constexprs,
    launch options) by value. Built with C-level maps: it runs on every launch. None when an argument
    is of another type (a tuple, say, whose tensors would make every key new)."""
    types = tuple(map(type, args))
    split = _splits.get(types) or _split(types)
    if split is _UNKEYED:
        return None
    tensors = split.tensors(args)
    pointers = tuple(map(_data_ptr, tensors))
    aligned = not functools.reduce(operator.or_, pointers, 0) & 15  # all 16-byte aligned: the usual case
    # The split stands for the types (one per types tuple): hashed by identity, not per type.
    return (device, tuple(meta.items()), split, split.values(args), tuple(map(_dtype, tensors)),
            aligned or tuple(not p & 15 for p in pointers))


_data_ptr = torch.Tensor.data_ptr
_dtype = operator.attrgetter("dtype")


class _Split:
    """Getters of a call's tensor arguments and of its arguments keyed by value (not tensors, not
    floats). Compared and hashed by identity: one per tuple of argument types."""

    __slots__ = ("tensors", "values")

    def __init__(self, tensors: Callable[[tuple], tuple], values: Callable[[tuple], tuple]):
        self.tensors = tensors
        self.values = values


_splits: dict[tuple, _Split] = {}
_UNKEYED = _Split(lambda args: (), lambda args: ())  # the split of calls that take Triton's path every time
_VALUE_TYPES = (int, float, str, type(None), torch.dtype)  # keyed by value (bool is an int)


def _split(types: tuple) -> _Split:
    """Getters of the tensor and value-keyed arguments of a call with these argument types
    (``_UNKEYED`` when an argument is neither a tensor nor of ``_VALUE_TYPES``)."""
    if not all(issubclass(t, (torch.Tensor, *_VALUE_TYPES)) for t in types):
        _splits[types] = _UNKEYED
        return _UNKEYED

    def getter(positions: list[int]) -> Callable[[tuple], tuple]:
        if len(positions) == 1:
            return lambda args: (args[positions[0]],)
        return operator.itemgetter(*positions) if positions else (lambda args: ())

    tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
    values = [i for i, t in enumerate(types) if not issubclass(t, (torch.Tensor, float))]
    split = _splits[types] = _Split(getter(tensors), getter(values))
    return split


def _compiled_launch(kernel: Any, compiled: Any, n_args: int, meta: dict) -> _Compiled:
    """What a later launch with the same key passes: Triton's compiled kernel, and the values its
    binder gives the parameters after the positional arguments (from ``meta``, else their defaults)."""
    if hasattr(compiled, "result"):  # an asynchronous compile's future
        compiled = compiled.result()
    tail = tuple(meta[p.name] if p.name in meta else p.default for p in kernel.params[n_args:])
    return _Compiled(compiled, tail)


@functools.cache
def _triton() -> Any:
    """Triton's JITFunction, driver configuration and knobs, imported on the first launch (fastres imports
    without triton).

    The kept path calls ``CompiledKernel.run`` as Triton 3.6-3.9 do (every bound argument, constexprs
    included, and ``triton.knobs.runtime``'s hooks; pyproject's floor is triton 3.6). A Triton without
    ``triton.knobs`` (before 3.4) takes Triton's own path for every launch instead of failing on it."""
    global _triton_path
    import triton
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class _Triton(NamedTuple):
        JITFunction: type
        driver: Any
        knobs: Any

    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        _triton_path += 1  # for good: the kept path needs knobs.runtime's launch hooks
    return _Triton(JITFunction, driver, knobs)


# ------------------------------------------------------------------ device and capture state

_tensor_device = torch.Tensor.get_device  # a tensor's CUDA device index; -1 for CPU tensors


def _current_device() -> int:
    return torch.cuda.current_device()


def _device(index: int) -> contextlib.AbstractContextManager:
    return torch.cuda.device(index)


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``t``'s CUDA device is current: ``torch.cuda.device(index)`` when another
    device is current, else a no-op context (CPU tensors, or the device already current: the usual
    case, which costs a device-index read and a comparison)."""
    index = _tensor_device(t)
    if index < 0 or index == _current_device():
        return contextlib.nullcontext()
    return _device(index)


def device_guarded(fn: Callable) -> Callable:
    """``fn(t, ...)`` run with its first argument's CUDA device current (see :func:`on_device_of`)."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        index = _tensor_device(args[0])
        if index < 0 or index == _current_device():
            return fn(*args, **kwargs)
        with _device(index):
            return fn(*args, **kwargs)

    return guarded


def capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph now (the current stream of the
    current device, which the device guard made ``device``'s). False for a CPU tensor's device, whose
    index is None (read instead of ``device.type``, which costs 0.6 us: this runs on every launch that
    takes a workspace); a CPU-only torch has no capture state to ask."""
    return device.index is not None and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def observe_launches(observer: Observer) -> Iterator[None]:
    """Call ``observer(kernel, grid, args, meta)`` before every launch inside the block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Count Triton launches made inside the ``with`` block, by kernel name.

    >>> with count_launches() as launches:
    ...     opt.step()
    >>> sum(launches.values())
    1
    """
    counter: collections.Counter[str] = collections.Counter()

    def count(kernel: Any, grid: tuple, args: tuple, meta: dict) -> None:
        counter[kernel_name(kernel)] += 1

    with observe_launches(count):
        yield counter


@contextlib.contextmanager
def triton_launch_path() -> Iterator[None]:
    """Every launch inside the block takes Triton's own JIT path, not the kept compiled kernels:
    for timing the difference (the lease runner and ``benchmarks/host_time.py`` do)."""
    global _triton_path
    _triton_path += 1
    try:
        yield
    finally:
        _triton_path -= 1


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Skip every kernel body inside the block (observers still see the launches).

    Outputs are left as allocated (uninitialised): this is for timing the host
    side (validation, planning, allocation, autograd) and counting, never for
    results.
    """
    global _stubbed
    _stubbed += 1
    try:
        yield
    finally:
        _stubbed -= 1
