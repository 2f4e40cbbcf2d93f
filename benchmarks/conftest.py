"""Shared harness for the fastres benchmarks.

How to run (from the repository root, with fastres installed: ``pip install -e .[test]``)::

    pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/<device>-<date>.json

for example ``--benchmark-json=benchmarks/results/h100-2025-01-31.json``. Use plain
``pytest``, not ``python -m pytest``; do not set ``TRITON_INTERPRET`` (on a CPU it
would time Triton's interpreter instead of fastres's pure-PyTorch path).
Subsets: ``-m gpu`` (CUDA rows only), ``-m "not gpu"`` (CPU rows only),
``-k "resnet20 and Adam"``; ``--benchmark-disable`` runs every row once as a
smoke test (no ``--benchmark-only`` with it).

What the harness does
---------------------
* Timing (``harness.median_ms``, shared with the lease runner ``lease.py``). On
  CUDA a variant's time is the median of ``triton.testing.do_bench`` (CUDA
  events, warm-up first, L2 flushed before every run). On CPU it is the median
  of ``time.perf_counter`` runs after one warm-up run. pytest-benchmark's
  own statistics come from ``benchmark.pedantic`` on a function that ends with
  ``torch.cuda.synchronize()``, so they include the device work and not only the
  launch.
* Comparison. ``bench.compare(group, variants, variant, ...)`` (the ``bench``
  fixture) times *every* variant of ``group`` (fastres and its baselines) once,
  back to back in this process, and caches the medians; each parametrized row
  then records, in ``benchmark.extra_info``: ``variant``, ``median_ms``,
  ``medians_ms`` (all variants), ``ratio_vs_<baseline>`` (this variant's time
  divided by the baseline's, so < 1 means faster), ``gbps`` (given the bytes a
  step must move), ``goal``/``goal_value``/``goal_met`` where a goal applies,
  and the environment (device, torch, triton, CUDA, fastres, date in UTC ISO).
  The first variant of ``variants`` is the subject (fastres); the others are
  its baselines. A variant factory may call ``pytest.skip(reason)`` (e.g. a
  torch ``fused=True`` that this torch lacks): that row is skipped with the
  reason and the other rows go on without it.
* No GPU. Test files mark CUDA rows ``pytest.mark.gpu``; without a GPU this
  conftest skips them with ``GPU_SKIP_REASON``. CPU rows use small sizes.
* Report. The terminal summary prints the comparison table of the rows that
  ran, and how many GPU rows were skipped and why. The raw numbers, with
  extra_info, are in the ``--benchmark-json`` file.
"""

from __future__ import annotations

import math
import os
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

from harness import HAS_CUDA, environment, gbps, median_ms, synchronize

HERE = Path(__file__).parent
GPU_SKIP_REASON = "no CUDA device: GPU rows skipped; run scripts/gpu_check.sh on a GPU machine"

# A variant factory builds what is timed (optimizer, buffers) and returns a
# zero-argument callable that does one unit of work (e.g. one optimizer step).
# Attributes set on that callable's ``extra_info`` dict land in the row's extra_info.
Factory = Callable[[], Callable[[], Any]]
# A goal maps the medians (ms) of the variants that ran to (text, value, met),
# or to None where it does not apply.
Goal = Callable[[dict], Optional[tuple]]


def pytest_collection_modifyitems(config, items):
    """Rows marked ``gpu`` (the CUDA rows) are skipped with GPU_SKIP_REASON when there is no GPU."""
    if HAS_CUDA:
        return
    for item in items:
        if item.get_closest_marker("gpu") and Path(item.path).is_relative_to(HERE):
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


# --------------------------------------------------------------------------- environment


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    env = environment()
    machine_info.update({k: env[k] for k in ("device", "torch", "triton", "cuda", "fastres")})


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """CPU rows time one thread, fastres and torch alike: an OpenMP pool on a shared
    machine stalls for milliseconds at random, which swamps the differences timed here.
    (CUDA rows are unaffected: the host thread count does not change the GPU's work.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _record_environment(request):
    """Every benchmark row gets the environment in ``extra_info``."""
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(environment())


# --------------------------------------------------------------------------- comparison


@dataclass
class Row:
    group: str
    variant: str
    median_ms: Optional[float]
    ratios: dict
    gbps: Optional[float]
    goal: Optional[tuple] = None  # (text, value, met)


@dataclass
class _State:
    medians: dict = field(default_factory=dict)  # group -> {variant: ms | skip reason (str) | exception}
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (is_gpu_row, reason)


_STATE = _State()  # one pytest session per process


class Bench:
    """The ``bench`` fixture: times fastres and its baselines in one process and records the row.

    Test files use this fixture rather than importing conftest (two conftest.py
    modules in one session would clash).
    """

    gbps = staticmethod(gbps)

    def __init__(self, benchmark):
        self.benchmark = benchmark
        self.state = _STATE

    def measure(self, group: str, variants: dict, device: str) -> dict:
        """Median ms of every variant of ``group`` (cached), or why it could not run.

        Values are a float (ms), a ``str`` (skip reason) or the exception the
        variant raised (re-raised by that variant's own row only).
        """
        if group not in self.state.medians:
            results: dict = {}
            for name, make in variants.items():
                try:
                    fn = make()
                    results[name] = median_ms(fn, device)
                except pytest.skip.Exception as exc:
                    results[name] = str(exc.msg)
                except Exception as exc:  # reported by this variant's row; the others go on
                    traceback.clear_frames(exc.__traceback__)  # do not keep its tensors alive
                    results[name] = exc
                fn = None  # free the optimizer state before the next variant
            self.state.medians[group] = results
        return self.state.medians[group]

    def compare(
        self,
        group: str,
        variants: dict,
        variant: str,
        *,
        device: str,
        bytes_moved: Optional[float] = None,
        goal: Optional[Goal] = None,
        extra: Optional[dict] = None,
    ) -> dict:
        """Time ``variants[variant]`` against the group's other variants; returns the row's extra_info."""
        info = self.benchmark.extra_info
        info.update(environment(device))
        info.update(group=group, variant=variant, device_type=device, bytes_moved=bytes_moved, **(extra or {}))
        self.benchmark.group = group

        if self.benchmark.disabled:  # --benchmark-disable: run once as a smoke test
            fn = variants[variant]()
            self.benchmark.pedantic(lambda: (fn(), synchronize(device)), rounds=1)
            return info

        results = self.measure(group, variants, device)
        mine = results[variant]
        if isinstance(mine, str):
            pytest.skip(mine)
        if isinstance(mine, BaseException):
            raise mine
        ms = {name: v for name, v in results.items() if isinstance(v, float)}
        subject = next(iter(variants))
        ratios = {b: mine / ms[b] for b in ms if b not in (subject, variant)}
        row = Row(group, variant, mine, ratios, gbps(bytes_moved, mine))
        info.update(median_ms=mine, medians_ms=ms, gbps=row.gbps)
        info.update({f"ratio_vs_{b}": r for b, r in ratios.items()})
        if goal is not None and variant == subject:
            row.goal = goal(ms)
            if row.goal is not None:
                text, value, met = row.goal
                info.update(goal=text, goal_value=value, goal_met=bool(met))

        # pytest-benchmark's own statistics: step + synchronize, so device time is included.
        fn = variants[variant]()
        info.update(getattr(fn, "extra_info", {}))
        target_s = 0.5 if device.startswith("cuda") else 0.1
        rounds = max(3, min(100, math.ceil(target_s / (mine * 1e-3))))
        self.benchmark.pedantic(
            lambda: (fn(), synchronize(device)), rounds=rounds, warmup_rounds=3 if device.startswith("cuda") else 1
        )
        self.state.rows.append(row)
        return info


@pytest.fixture
def bench(benchmark) -> Bench:
    return Bench(benchmark)


# --------------------------------------------------------------------------- reporting


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _STATE.skipped.append(("gpu" in report.keywords, reason))


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables, so it is the last thing read
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = _STATE
    write = terminalreporter.write_line
    if os.environ.get("TRITON_INTERPRET") == "1" and state.rows:
        write("warning: TRITON_INTERPRET=1: fastres CPU rows timed Triton's interpreter, not PyTorch", yellow=True)
    if state.rows:
        terminalreporter.write_sep("-", "fastres comparison (median ms; ratio = this variant's time / baseline's)")
        table = [("benchmark", "variant", "median ms", "GB/s", "ratio vs baselines", "goal")]
        for r in state.rows:
            ratios = ", ".join(f"{b} {v:.2f}x" for b, v in r.ratios.items())
            goal = ""
            if r.goal is not None:
                text, value, met = r.goal
                goal = f"{text}: {value:.2f} {'MET' if met else 'NOT MET'}"
            table.append((r.group, r.variant, _fmt(r.median_ms, ".4f"), _fmt(r.gbps, ".1f"), ratios, goal))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    gpu = [reason for is_gpu, reason in state.skipped if is_gpu]
    if gpu or state.skipped:
        terminalreporter.write_sep("-", "fastres benchmark skips")
        counts: dict = {}
        for is_gpu, reason in state.skipped:
            key = ("GPU" if is_gpu else "CPU", reason)
            counts[key] = counts.get(key, 0) + 1
        write(f"{len(gpu)} GPU rows skipped, {len(state.skipped) - len(gpu)} CPU rows skipped:")
        for (kind, reason), n in sorted(counts.items(), key=lambda kv: -kv[1]):
            write(f"  {n:4d} {kind} rows: {reason}")
