"""Timing and environment helpers shared by the benchmark suite (conftest.py) and the lease runner (lease.py).

Not a test module: both import it by name (``benchmarks/`` is on ``sys.path``
for pytest's conftest and for scripts run from this folder).

* ``median_ms(fn, device)``: on CUDA the median of ``triton.testing.do_bench``
  (CUDA events, warm-up first, L2 flushed before every run); on CPU the median
  of ``time.perf_counter`` runs after one warm-up run.
* ``gbps(bytes, ms)``, ``synchronize(device)``, ``device_name(device)``.
* ``environment(device)``: device name, library versions and the date (UTC ISO).
* ``ceilings(device)``: measured copy GB/s and bf16 matmul TFLOP/s, the denominators of GB/s and TFLOP/s.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import torch

HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------- environment


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores)"


def environment(device: Optional[str] = None) -> dict:
    """Device name, library versions and the date (UTC ISO) for a benchmark row."""
    from importlib import metadata

    versions = {}
    for name in ("triton", "fastres"):  # installed versions: nothing imported (the lease's stage 1 stays quick)
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None if name == "triton" else "not installed"
    triton_version, fastres_version = versions["triton"], versions["fastres"]
    if device is None:
        device = "cuda" if HAS_CUDA else "cpu"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fastres": fastres_version,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: str, min_runs: int = 5, warmed: bool = False) -> float:
    """Median time of ``fn`` in ms: do_bench on CUDA, perf_counter on CPU (both after warm-up).

    ``min_runs``: the fewest timed CPU runs; ``warmed``: the caller already ran ``fn`` once, so the CPU
    warm-up run is skipped (the lease's dry run times interpreted kernels, seconds a call).
    """
    if device.startswith("cuda"):
        import triton.testing

        fn()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        once_ms = (time.perf_counter() - t0) * 1e3
        # ~100 ms of runs, but at least ~10 runs for slow variants (capped at 3 s).
        rep = min(max(100.0, 10 * once_ms), 3000.0)
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))
    if not warmed:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < 50 and time.perf_counter() - start < 0.1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def gbps(bytes_moved: Optional[float], ms: Optional[float]) -> Optional[float]:
    if not bytes_moved or not ms:
        return None
    return bytes_moved / (ms * 1e-3) / 1e9


def ceilings(device: str, small: bool = False) -> dict:
    """Device-to-device copy GB/s (``dst.copy_(src)``, 2 x numel x 4 bytes) and bf16 matmul TFLOP/s.

    GPU: 1 GiB fp32 buffers (beyond the caches) and 8192^3; ``small`` (a CPU dry run): 16 MiB and 256^3.
    """
    numel = 2**22 if small else 2**28
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, 1 if small else 5)
    del src, dst
    n = 256 if small else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_ms = median_ms(lambda: a @ b, device, 1 if small else 5)
    return {"copy_gbps": gbps(2 * numel * 4, copy_ms), "copy_bytes": 2 * numel * 4, "copy_ms": copy_ms,
            "matmul_bf16_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12, "matmul_n": n, "matmul_ms": matmul_ms}
