"""fastres's kept compiled kernels against Triton's JIT path, on a machine without a GPU.

    python tests/launch_path_check.py   (TRITON_INTERPRET unset; tests/test_launch_path.py runs it)

Compiles for sm_90 what two residual blocks (one with a downsample) and an SGD
step launch, with a driver that records launches instead of running them
(:mod:`fastres.testing.no_gpu`). Then every recorded launch is replayed twice
with the same arguments: through Triton's own path and through
:func:`fastres.launchers.core.launch`'s kept kernels. The launcher must receive
the same compiled kernel, grid, stream, metadata, hooks and arguments both
times, with no call into Triton's JIT on the kept path. A misaligned tensor and
an integer argument of 1 (both change what Triton specialises) must each select
the kernel Triton selects, and Triton must not specialise on a float's value
(the kept path's key leaves it out). Prints ``OK`` and the host time per launch of both
paths.
"""

from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("launch_path_check: run with TRITON_INTERPRET unset (the kernels must be JIT kernels)")

import torch  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402

import fastres  # noqa: E402
from fastres.launchers import core  # noqa: E402
from fastres.testing import observe_launches  # noqa: E402
from fastres.testing.no_gpu import compile_only_driver, kernels_on_cpu  # noqa: E402


def difference(kept, through_triton) -> str | None:
    """Where two launcher calls differ (tensors by identity, other values by equality), or None."""
    for field, x, y in zip(kept._fields, kept, through_triton):
        if field == "args":
            if len(x) != len(y):
                return f"{len(x)} arguments, against {len(y)}"
            for i, (u, v) in enumerate(zip(x, y)):
                if not (u is v or (not isinstance(u, torch.Tensor) and not isinstance(v, torch.Tensor) and u == v)):
                    return f"argument {i}: {_short(u)}, against {_short(v)}"
        elif field == "launch_metadata" and x is not None and y is not None:
            if x.get() != y.get():  # a LazyDict per launch: compare what a launch hook would read
                return f"launch metadata {x.get()}, against {y.get()}"
        elif not (x is y or x == y):
            return f"{field}: {_short(x)}, against {_short(y)}"
    return None


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype} at {value.data_ptr():#x}"
    return repr(value)[:200]


def workload() -> None:
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(fastres.nn.ResidualBlock(4, 8, stride=2, downsample=fastres.nn.downsample(4, 8, 2)),
                                   fastres.nn.ResidualBlock(8, 8))
    blocks = blocks.to(memory_format=torch.channels_last)
    opt = fastres.optim.SGD(blocks.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    blocks(x).sum().backward()
    opt.step()


def replay(calls, record, cached: bool):
    kernel, grid, args, meta = record
    n = len(calls)
    if cached:
        core.launch(kernel, grid, *args, **meta)
    else:
        with core.triton_launch_path():
            core.launch(kernel, grid, *args, **meta)
    assert len(calls) == n + 1, "one launch must reach the launcher"
    return calls[-1]


def main() -> None:
    jit_runs = 0
    jit_run = triton_jit.JITFunction.run

    def counted_run(self, *args, **kwargs):
        nonlocal jit_runs
        jit_runs += 1
        return jit_run(self, *args, **kwargs)

    triton_jit.JITFunction.run = counted_run
    records = []
    with compile_only_driver(90) as calls, kernels_on_cpu():
        with observe_launches(lambda *record: records.append(record)):
            workload()
        assert records, "the workload launched nothing: are the kernels interpreted?"
        kernels = {core.kernel_name(r[0]) for r in records}

        for record in records:
            through_triton = replay(calls, record, cached=False)
            before = jit_runs
            kept = replay(calls, record, cached=True)
            assert jit_runs == before, f"{core.kernel_name(record[0])}: the kept path called Triton's JIT"
            diff = difference(kept, through_triton)
            assert diff is None, f"{core.kernel_name(record[0])}: kept kernel against Triton's path: {diff}"

        # What Triton specialises on selects another kernel on both paths: a tensor off 16-byte
        # alignment, and an int argument equal to 1.
        sgd = next(r for r in records if core.kernel_name(r[0]) == "_sgd_kernel")
        tail = next(r for r in records if core.kernel_name(r[0]) == "_bn_relu_apply_kernel")
        kernel, grid, args, meta = tail
        i_tensor = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dtype == torch.float32)
        misaligned = torch.empty(args[i_tensor].numel() + 1)[1:]
        i_int = next(i for i, a in enumerate(args) if type(a) is int and a != 1)
        for name, changed in [("misaligned tensor", (*args[:i_tensor], misaligned, *args[i_tensor + 1:])),
                              ("int argument of 1", (*args[:i_int], 1, *args[i_int + 1:]))]:
            variant = (kernel, grid, changed, meta)
            through_triton = replay(calls, variant, cached=False)
            first = replay(calls, variant, cached=True)  # a new key: Triton's path, kept
            kept = replay(calls, variant, cached=True)
            for call in (first, kept):
                diff = difference(call, through_triton)
                assert diff is None, f"{name}: kept kernel against Triton's path: {diff}"
            original = replay(calls, tail, cached=True)
            assert original.launcher is not kept.launcher, f"{name}: Triton did not specialise on it"
        # ... and a float's value does not (the key leaves it out).
        kernel, grid, args, meta = sgd
        i_float = next(i for i, a in enumerate(args) if type(a) is float)
        other_float = (kernel, grid, (*args[:i_float], args[i_float] * 0.5 + 1.0, *args[i_float + 1:]), meta)
        assert replay(calls, other_float, cached=False).launcher is replay(calls, sgd, cached=False).launcher, \
            "Triton specialised on a float's value"

        per_launch = {}
        for label, cached in (("triton", False), ("kept", True)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(20):
                    for record in records + [sgd]:
                        replay(calls, record, cached)
                best = min(best, (time.perf_counter() - start) / (20 * (len(records) + 1)))
            per_launch[label] = best * 1e6
    print(f"OK: {len(records)} launches of {len(kernels)} kernels replayed on both paths; host time per launch: "
          f"Triton's path {per_launch['triton']:.1f} us, kept kernels {per_launch['kept']:.1f} us")


if __name__ == "__main__":
    main()
