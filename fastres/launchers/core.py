"""Kernel launching and the launch counter.

Every Triton launch in fastres goes through :func:`launch`, so tests can count
launches (:func:`fastres.testing.count_launches`) without touching Triton.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator

_counters: list[collections.Counter[str]] = []


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)  # Autotuner/Heuristics wrap a JITFunction
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", repr(fn))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch ``kernel[grid](*args, **meta)`` and record it in active counters."""
    if _counters:
        name = kernel_name(kernel)
        for counter in _counters:
            counter[name] += 1
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Count Triton launches made inside the ``with`` block, by kernel name.

    >>> with count_launches() as launches:
    ...     opt.step()
    >>> sum(launches.values())
    1
    """
    counter: collections.Counter[str] = collections.Counter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)
