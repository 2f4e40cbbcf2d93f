"""Shared pieces of the residual-block and training benchmarks (test_block.py, test_train.py).

Not a test module and not a conftest: test files import it by name (pytest puts
``benchmarks/`` on ``sys.path``), as they would any helper module.

* ``cudnn_benchmark``: an autouse fixture (import it into the test module) that
  turns ``torch.backends.cudnn.benchmark`` on for every row and restores it.
* ``amp(device, dtype)``: ``torch.autocast(bfloat16)`` for ``"bf16"`` rows, nothing for ``"fp32"``.
* ``compiled_step(group, variant, build)``: torch.compile variants are compiled
  once per benchmark group and reused by the timing pass and by their own row
  (``Bench.compare`` calls each factory twice); dynamo's caches are reset when a
  new group starts, so no group runs into the recompile limit or into automatic
  dynamic shapes left by another. A compile that fails skips the row with the error.
  ``release_compiled()`` drops them (test modules call it when they finish).
* ``with_launch_count(step, tensor)``: warms a fastres step up and records its
  Triton launches per step and the backend in the row's extra_info.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest
import torch

try:
    import fastres
    from fastres.reference import nn as ref

    FASTRES_SKIP = ""
except Exception as exc:  # fastres not installed
    fastres = ref = None  # type: ignore[assignment]
    FASTRES_SKIP = f"fastres is not importable ({type(exc).__name__}: {exc}); install with pip install -e ."

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_CPU_SKIP = ("torch.compile rows run on CUDA only (an inductor compile for the CPU takes minutes, "
                    "too long for a CPU smoke row)")


def require_fastres() -> None:
    if FASTRES_SKIP:
        pytest.skip(FASTRES_SKIP)


@pytest.fixture(autouse=True)
def cudnn_benchmark():
    """cuDNN autotuning on for every row (eager and torch.compile's aten convs), restored afterwards."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def precision_info(device: str, dtype: str) -> dict:
    """What decides the arithmetic of the convs: autocast dtype, TF32 switches, cuDNN autotuning."""
    return {
        "dtype": dtype,
        "amp": "autocast(bfloat16), fp32 params" if dtype == "bf16" else "none (fp32)",
        "cudnn_benchmark": True,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def amp(device: str, dtype: str):
    """The autocast context of a row: bf16 autocast (fp32 params), or none for fp32."""
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- torch.compile

_COMPILED: dict[str, Any] = {"group": None, "steps": {}}


def compiled_step(group: str, variant: str, build: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
    """The step of torch.compile ``variant`` of ``group``, built (and compiled, by ``build``) once per group.

    ``build`` must return a warmed-up step: its first calls compile. An exception
    from it skips the variant's row with the error as the reason.
    """
    if _COMPILED["group"] != group:
        _COMPILED["steps"].clear()  # drop the previous group's compiled modules and CUDA-graph pools
        _COMPILED["group"] = group
        torch._dynamo.reset()
    steps = _COMPILED["steps"]
    if variant not in steps:
        try:
            steps[variant] = build()
        except pytest.skip.Exception:
            raise
        except Exception as exc:
            message = str(exc).strip().splitlines()
            steps[variant] = (f"{variant} failed to compile or run in torch {torch.__version__}: "
                              f"{type(exc).__name__}: {message[0] if message else ''}"[:500])
    step = steps[variant]
    if isinstance(step, str):
        pytest.skip(step)
    return step


def release_compiled() -> None:
    """Drop the cached compiled steps (and their CUDA-graph pools) and dynamo's caches."""
    if _COMPILED["group"] is not None:
        _COMPILED["steps"].clear()
        _COMPILED["group"] = None
        torch._dynamo.reset()


def warm(step: Callable[[], Any], times: int = 3) -> Callable[[], Any]:
    """Run ``step`` a few times (compilation; CUDA-graph trees warm up, record, then replay)."""
    for _ in range(times):
        step()
    return step


# --------------------------------------------------------------------------- fastres info


def with_launch_count(step: Callable[[], Any], tensor: torch.Tensor) -> Callable[[], Any]:
    """Warm ``step`` up (kernel compilation), then count its fastres launches once; info lands in extra_info."""
    step()
    from fastres.testing import count_launches

    with count_launches() as launches:
        step()
    step.extra_info = {"launches_per_call": sum(launches.values()), "backend": fastres.backend_for(tensor).name}
    return step
