"""Host time of a fastres ResNet training step, with every kernel body skipped.

    python benchmarks/host_time.py [--model resnet20] [--batch 2] [--rounds 7] [--launch-path stubbed|kept|triton]

What is left when the kernels do no work is what the GPU would wait on if the
host were the bottleneck: fastres's validation, planning and allocation,
autograd's bookkeeping, the optimizer step, and the few aten ops outside the
fused blocks (pooling, classifier, loss; on CPU tensors here, so they are run
for real at the batch given, hence the default batch of 2: at 512 they and the
page faults of their fresh buffers add 2-20 ms of CPU work that a GPU does
asynchronously).

``--launch-path`` says how far each launch goes:

* ``stubbed`` (default): not into Triton at all (:func:`fastres.testing.stub_launches`);
  the kernels are interpreted ones, never run. This is fastres's own host work.
* ``kept``: the kernels are compiled for sm_90 on the first step (ptxas runs on
  the CPU) and every launch runs fastres's kept-kernel path up to the CUDA
  launcher, which drops it instead (:mod:`fastres.testing.no_gpu`). Adds
  what a GPU step's launches cost in Python, short of the driver call itself.
* ``triton``: as ``kept``, through Triton's own JIT path
  (:func:`fastres.launchers.core.triton_launch_path`), for comparison.

Prints the best and median of ``--rounds`` rounds of ``--steps`` steps each,
per step, and the launches per step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

LAUNCH_PATHS = ("stubbed", "kept", "triton")


def _launch_path(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--launch-path", choices=LAUNCH_PATHS, default="stubbed")
    return parser.parse_known_args(argv)[0].launch_path


# Stubbed launches use the interpreter's kernels (CPU tensors take the kernel path only with
# TRITON_INTERPRET=1); the compiled paths need JIT kernels: the variable is read when fastres is imported.
if __name__ == "__main__" and _launch_path(sys.argv[1:]) != "stubbed":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastres  # noqa: E402
from fastres import _backend  # noqa: E402
from fastres.launchers.core import triton_launch_path  # noqa: E402
from fastres.testing import count_launches, stub_launches  # noqa: E402


def _launches(launch_path: str) -> contextlib.AbstractContextManager:
    """Where the step's launches go (see the module's docstring)."""
    if launch_path == "stubbed":
        return stub_launches()
    if _backend.INTERPRET:
        raise RuntimeError(f"--launch-path {launch_path} needs JIT kernels: run this script with TRITON_INTERPRET "
                           "unset (it unsets it itself when run as a script)")
    from fastres.testing.no_gpu import compile_only_driver, kernels_on_cpu
    from fastres.testing.traffic import GPU_SMS, planned_for_sms

    stack = contextlib.ExitStack()
    stack.enter_context(compile_only_driver(90, record=False))
    stack.enter_context(kernels_on_cpu())
    stack.enter_context(planned_for_sms(GPU_SMS))  # an H100/H200's plans
    if launch_path == "triton":
        stack.enter_context(triton_launch_path())
    return stack


def measure(model_name: str = "resnet20", batch: int = 2, rounds: int = 7, steps: int = 5,
            channels_last: bool = True, optimizer: str = "sgd", launch_path: str = "stubbed") -> dict:
    """Host seconds per training step (best and median of ``rounds``) and launches per step."""
    torch.manual_seed(0)
    # Stubbed kernels leave uninitialised memory in their outputs; denormals in
    # it would make the few real aten ops (pooling, classifier) crawl.
    torch.set_flush_denormal(True)
    # One thread: the host side is one Python thread on a GPU box too, and an
    # OpenMP pool on a busy machine adds waits that are not fastres's.
    torch.set_num_threads(1)
    model = getattr(fastres, model_name)()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if optimizer == "sgd":
        opt = fastres.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = fastres.optim.Adam(model.parameters(), lr=1e-3)
    # Real values for the input so the aten ops outside fastres see finite numbers.
    x = torch.randn(batch, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    # CPU time of this (single) thread: the host's own work, robust to other
    # processes competing for the CPU, which wall-clock time is not.
    clock = time.thread_time

    def step():
        t0 = clock()
        out = model(x)
        # Stubbed kernels leave garbage in their outputs: keep the loss finite.
        loss = torch.nn.functional.cross_entropy(torch.nan_to_num(out), y)
        t1 = clock()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = clock()
        opt.step()
        t3 = clock()
        parts["forward"] += t1 - t0
        parts["backward"] += t2 - t1
        parts["optimizer"] += t3 - t2

    with _launches(launch_path):
        step()  # plans, tables, caches (and compiled kernels) are built here, as on a GPU's first step
        with count_launches() as launches:
            step()
        times = []
        best_parts = None
        for _ in range(rounds):
            for k in parts:
                parts[k] = 0.0
            start = clock()
            for _ in range(steps):
                step()
            times.append((clock() - start) / steps)
            if times[-1] == min(times):
                best_parts = {k: v / steps * 1e3 for k, v in parts.items()}
    return {"model": model_name, "batch": batch, "launch_path": launch_path, "best_ms": min(times) * 1e3, "best_parts_ms": best_parts,
            "median_ms": statistics.median(times) * 1e3, "launches": sum(launches.values()),
            "by_kernel": dict(launches)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=2,
                        help="small keeps the aten ops outside the fused ones (run for real on CPU) negligible")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--launch-path", choices=LAUNCH_PATHS, default="stubbed",
                        help="stubbed: launches stop before Triton; kept / triton: kernels compiled for sm_90, "
                             "launches run fastres's kept-kernel path / Triton's JIT path up to the CUDA launcher")
    args = parser.parse_args(argv)
    r = measure(args.model, args.batch, args.rounds, args.steps, not args.contiguous, args.optimizer,
                args.launch_path)
    print(f"{r['model']} batch {r['batch']}, {r['launch_path']} launches: host time per training step "
          f"best {r['best_ms']:.2f} ms, "
          f"median {r['median_ms']:.2f} ms over {args.rounds} rounds of {args.steps}; "
          f"{r['launches']} launches per step")
    print("  best round: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["best_parts_ms"].items()))
    for name, n in sorted(r["by_kernel"].items()):
        print(f"  {n:4d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
