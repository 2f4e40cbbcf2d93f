"""Kernel launching, the launch counter and launch observers.

Every Triton launch in fastres goes through :func:`launch`, so tests and tools
can count launches (:func:`fastres.testing.count_launches`), watch their
arguments (:func:`observe_launches`) or skip the kernel bodies to time the host
side alone (:func:`stub_launches`) without touching Triton.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Iterator

# Called as observer(kernel, grid, args, meta) before each launch.
Observer = Callable[[Any, tuple, tuple, dict], None]
_observers: list[Observer] = []
_stubbed = 0


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)  # Autotuner/Heuristics wrap a JITFunction
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", repr(fn))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch ``kernel[grid](*args, **meta)``; active observers see it first."""
    for observer in _observers:
        observer(kernel, grid, args, meta)
    if not _stubbed:
        kernel[grid](*args, **meta)


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
