"""The GPU lease runner: one command that turns a short GPU lease into the whole evidence (issues 9, 21).

    python benchmarks/lease.py OUT              # on the GPU machine (scripts/gpu_check.sh OUT installs first)
    python benchmarks/lease.py --dry-run OUT    # on a CPU: every stage at tiny sizes, Triton's interpreter
    python benchmarks/lease.py --check-install  # fastres's kernels import (and, on the GPU, CUDA is there)

The whole command, from the start of scripts/gpu_check.sh (``FASTRES_LEASE_START``) with Python's start-up
and the install, is planned for 420 s, so that a 15-minute lease with a slow machine start still returns it.
Stages, in order, each under its own time budget (GPU / dry run, seconds), so that a slow, hanging or
crashing stage never starves the next; what a stage measured is in OUT even when it is cut:

      start-up, install check    25 / 10   planned, not enforced: what it takes beyond that comes off the tests
  1   environment and ceilings   12 / 15   device, driver, versions, git revision; D2D copy GB/s, bf16 TFLOP/s
  2   compile warm-up            80 / 30   every Triton kernel variant of stages 3-4 in stage order, one process
                                           per core (at most 16), and beside them at most 2 torch.compile
                                           (inductor) builds at a time, 4 once the Triton tasks are done, each
                                           with 3 compile threads: the compiled-model checks, the training rows,
                                           the bf16 block rows 4c reaches; Triton's and inductor's on-disk
                                           caches then hit in stages 3-4
  3a  correctness: optimizers    42 / 35   lease_items.optim_checks: NaN-poisoned, at full size; issue 18's CUDA-only
                                           fixes: graph tables kept after an eager rebuild, no host sync in a
                                           first step, a capture that would rebuild tables refused cleanly
  3b  correctness: models+blocks 63 / 40   lease_items.block_checks; issue 18's: two captured ResNet-20 steps
                                           replayed on two streams beside eager steps, bitwise; TF32 operands
                                           rounded as cuDNN rounds them
  4a  ratios: optimizer steps    25 / 15   lease_items.optim_rows
  4b  ratios: training steps     55 / 35   lease_items.train_rows (ResNet-20's with the host's CPU ms per step
                                           of fastres, fastres through Triton's own launch path, and eager)
  4c  ratios: residual block     40 / 20   lease_items.block_rows
  4d  profile: one step          12 / 15   lease_items.profile_rows: a torch.profiler table of one ResNet-20
                                           step's kernels (GPU time per kernel name), last, skewing no row,
                                           each beside the model's prediction (benchmarks/
                                           modeled_resnet20_b512.json, fastres.testing.gpu_model)
  5   tests                      the rest  a GPU-relevant subset (tests_to_run; multi-GPU tests only on two
                                           or more GPUs), 1-4 pytest-xdist workers, interrupted cleanly before
                                           the total ends (at least 30 s)

Time a part leaves goes to the parts after it: a part ends at its planned end on the timeline above (the
sum of the budgets before it, a stage process's imports included) or at its own budget from its start,
whichever is later, and never where the tests would keep less than 30 s. Stages 1, 2, 3 (3a, 3b) and 4
(4a-4d) each run in a process of their own (one import of torch per process); within one, a watchdog ends
the process when a part overruns, and the runner starts it again for the parts after it. A part that
crashes (a CUDA error poisons the context) is resumed, up to twice, from the item after the one it died
in; that item is recorded as an error. A failed CUDA-graph capture ends the process after its item, which
is recorded, and the part goes on in a fresh one (the allocator may still point at the dead graph's pool).

OUT (at most 6 files): ``results.jsonl`` (one JSON record per line, appended as produced: each check,
each timed variant of a ratio row, each row), ``lease.json`` (all of it, rebuilt after every stage),
``lease.log`` (the stages' output), ``tests.log`` and ``tests.xml`` (pytest), ``summary.txt`` (the table
printed last; a row cut mid-way shows the variants it timed, marked partial). Exit status 1 when a
correctness check failed or errored, or a test failed; 2 when the install check failed; else 0.

Options for testing the runner itself: ``--stages 1,3a`` (a subset), ``--budget 1=5`` (override a
stage's budget), ``--inject-failure`` (the first optimizer check gets a wrong element, which must fail),
``--inject-hang KEY`` (stage KEY sleeps until it is cut), ``--inject-crash KEY`` (part KEY's process aborts in
its first item, which must be recorded as an error, and the part resumes after it), ``--inject-cut-row KEY``
(part KEY's first ratio row hangs after its first timed variant, which the cut row must keep).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# From the start of gpu_check.sh (install included) to the table. GPU: 7 minutes, so that the lease's one
# command returns inside a 15-minute lease even after a slow machine start. Dry run: a cap (~1 minute idle).
TOTAL_S = {"gpu": 420.0, "dry": 200.0}
STARTUP_S = {"gpu": 25.0, "dry": 10.0}  # planned: Python's start-up, the install and its check
TESTS_MIN_S = {"gpu": 30.0, "dry": 20.0}  # what the earlier stages always leave the test suite
IMPORT_S = {"gpu": 10.0, "dry": 15.0}  # a stage process's imports (torch, fastres), before its parts' budgets start
FINAL_S = 5.0  # the table's time at the end
KILL_GRACE_S = 2.0  # past a part's deadline before its process is ended
FILES = ("results.jsonl", "lease.json", "lease.log", "tests.log", "tests.xml", "summary.txt")
PART_OVERRUN = 4  # exit status of a stage process whose watchdog ended it
FRESH_PROCESS = 3  # exit status of a stage process that ended itself after an item for a clean CUDA state
INSTALL_FAILED = 2  # exit status when the install check fails: nothing ran


@dataclasses.dataclass(frozen=True)
class Part:
    key: str
    title: str
    gpu_s: float
    dry_s: float

    @property
    def process(self) -> str:  # the stage process that runs it: "3a" runs in "3"
        return self.key[0]


PARTS = [
    Part("1", "environment and ceilings", 12, 15),
    Part("2", "compile warm-up", 80, 30),
    Part("3a", "correctness: optimizers", 42, 35),
    Part("3b", "correctness: models and blocks", 63, 40),
    Part("4a", "ratios: optimizer steps", 25, 15),
    Part("4b", "ratios: training steps", 55, 35),
    Part("4c", "ratios: residual block", 40, 20),
    Part("4d", "profile: one training step", 12, 15),
    Part("5", "test suite", 0, 0),  # the time left
]
TITLES = {p.key: p.title for p in PARTS}
ITEM_PARTS = ("3a", "3b", "4a", "4b", "4c", "4d")
CHECK_PARTS = ("3a", "3b")
IMPORTING = ("1", "3", "4")  # processes that import torch before their parts (2's workers do, in 2's budget)


def plan_ends(parts: list, budget_of, start: float, mode: str) -> dict:
    """Each part's planned end on the timeline: ``start`` plus every budget up to it, imports included."""
    ends, t, process = {}, start, None
    for part in parts:
        if part.key == "5":
            continue
        if part.process != process and part.process in IMPORTING:
            t += IMPORT_S[mode]
        process = part.process
        t += budget_of(part)
        ends[part.key] = t
    return ends


def part_deadline(start: float, budget: float, planned_end: float, hard_deadline: float) -> float:
    """A part's end: its planned end, or its own budget from its start if later (parts before it ran late),
    never past ``hard_deadline`` (the tests' minimum). A part that starts early gets what was left before it."""
    return min(max(start + budget, planned_end), hard_deadline)


def lease_start(value: Optional[str], now: float) -> float:
    """The command's start (gpu_check.sh's ``FASTRES_LEASE_START``, epoch seconds), or ``now`` when it is unset
    or implausible (in the future, or over 10 minutes ago: a value another run left in the environment)."""
    try:
        t0 = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return now
    return t0 if 0 <= now - t0 <= 600 else now


# Stage 5 on the GPU: tests that run fastres's kernels on CUDA (the rest run the same on a CPU, and CI runs
# them), the CUDA-only ones first; tests that need two GPUs only where there are two.
GPU_TESTS = ("tests/test_optim_cuda.py", "tests/test_ops.py", "tests/test_conv_kernels.py",
             "tests/test_conv_block.py", "tests/test_resnet.py")
MULTI_GPU_TESTS = ("tests/test_train_example.py::test_ddp_two_processes",)
DRY_TESTS = ("tests/test_optim_errors.py",)  # quick: the interpreted suite takes minutes (CI runs it anyway)
TEST_WORKERS = 4
TEST_WORKER_S = 15.0  # a worker's start-up (torch, conftest) and its first compiles: fewer workers when short


def tests_to_run(dry: bool, gpus: int) -> list:
    """Stage 5's pytest selection: the dry run's quick file, or the GPU subset (multi-GPU tests from 2 GPUs)."""
    if dry:
        return list(DRY_TESTS)
    return list(GPU_TESTS) + (list(MULTI_GPU_TESTS) if gpus >= 2 else [])


def xdist_workers(dry: bool, seconds: float, cpus: int, have_xdist: bool) -> int:
    """pytest-xdist workers for ``seconds`` of tests (0: no -n): a few, so that starting them leaves time."""
    if dry or not have_xdist:
        return 0
    return max(1, min(TEST_WORKERS, cpus, int(seconds // TEST_WORKER_S)))


# --------------------------------------------------------------------------- records (both processes)


def append(out: Path, record: dict) -> None:
    """One JSON line in OUT/results.jsonl, written at once (a run cut off later keeps it)."""
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_records(out: Path) -> list:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            pass
    return records


def partial_row(variants: list) -> dict:
    """A ratio row's fields from the variant records it appended before it was cut or crashed."""
    fields: dict = {"medians_ms": {}, "errors": {}, "launches": {}, "host_ms": {}}
    for v in variants:
        for field, key in (("medians_ms", "median_ms"), ("errors", "error"), ("launches", "launches"),
                           ("host_ms", "host_ms")):
            if v.get(key) is not None:
                fields[field][v["variant"]] = v[key]
    return dict(fields, partial=True)


def tail(text: str, lines: int = 12, chars: int = 1500) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def setup_paths() -> None:
    for sub in ("benchmarks", "tests", "examples"):
        path = str(REPO / sub)
        if path not in sys.path:
            sys.path.insert(0, path)


# --------------------------------------------------------------------------- inside a stage process


def stage_items(cfg, key: str, out: Path) -> list:
    """The items of part ``key`` (3a..4d), built in a stage process."""
    import lease_items as li

    return {"3a": lambda: li.optim_checks(cfg), "3b": lambda: li.block_checks(cfg),
            "4a": lambda: li.optim_rows(cfg, str(out)), "4b": lambda: li.train_rows(cfg),
            "4c": lambda: li.block_rows(cfg, str(out)), "4d": lambda: li.profile_rows(cfg)}[key]()


def cuda_broken() -> bool:
    """After an error: is this process's CUDA context still usable? (An illegal address poisons it.)"""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def run_items(cfg, key: str, out: Path, deadline: float, crash: bool = False) -> int:
    """Run the part's items in order, each recorded as it ends; skip those an earlier process recorded.

    A ratio row's variants are appended as each is timed ("variant" records), so a row cut later keeps them.
    Returns FRESH_PROCESS after an item that left this process's CUDA state unusable or suspect (an error
    that poisoned the context, a failed CUDA-graph capture): the runner goes on in a new process.
    ``crash`` (--inject-crash): the process aborts in its first item, if no item of the part ran yet.
    """
    import lease_items as li

    done = {r["name"] for r in read_records(out) if r.get("type") == "item" and r.get("stage") == key}
    crash = crash and not done
    min_left = 2.0 if cfg.dry else 5.0
    for item in stage_items(cfg, key, out):
        if item.name in done:
            continue
        base = {"type": "item", "stage": key, "name": item.name, "kind": item.kind, "group": item.group or item.name,
                "label": item.label, "scaled_down": item.scaled}
        if deadline - time.time() < min_left:
            append(out, dict(base, status="not run", detail="the stage's budget ran out before this item"))
            continue
        append(out, {"type": "begin", "stage": key, "name": item.name})
        if crash:
            print(f"[{key}] --inject-crash: aborting in {item.name}", flush=True)
            os.abort()  # as a CUDA error that kills the process would
        variants: list = []

        def record_variant(variant: str, fields: dict, name: str = item.name) -> None:
            variants.append(dict(fields, variant=variant))
            append(out, {"type": "variant", "stage": key, "name": name, "variant": variant, **fields})

        start = time.time()
        fields, detail = {}, ""
        try:
            with li.recording_variants(record_variant):
                fields = item.run() or {}
            status = "pass" if item.kind == "check" else "ok"
        except AssertionError as exc:
            status, detail = "fail", tail(str(exc) or traceback.format_exc())
        except li.SKIPS as exc:
            status, detail = "skipped", str(getattr(exc, "msg", None) or exc)
        except Exception:
            status, detail = "error", tail(traceback.format_exc())
        if status in ("fail", "error") and variants:
            fields = partial_row(variants)
        seconds = time.time() - start
        append(out, dict(base, status=status, seconds=round(seconds, 2), detail=detail, **fields))
        print(f"[{key}] {status:8s} {seconds:7.1f} s  {item.name}" + (f"\n{detail}" if detail else ""), flush=True)
        li.release()
        why = li.needs_fresh_process() or (status == "error" and cuda_broken() and "the CUDA context is unusable")
        if why:
            print(f"[{key}] {why} after {item.name}: exiting for a fresh process", flush=True)
            return FRESH_PROCESS
    return 0


def environment_stage(dry: bool, out: Path) -> int:
    import torch

    import harness

    device = "cpu" if dry else "cuda"
    env = dict(harness.environment(device), python=platform.python_version(), dry_run=dry,
               cpu_count=os.cpu_count(), revision=git_revision())
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:
        env["numpy"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", driver=nvidia_smi_driver())
    env["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0  # stage 5's selection
    append(out, {"type": "item", "stage": "1", "kind": "env", "name": "environment", "status": "ok", "values": env})
    print(json.dumps(env, indent=1), flush=True)
    try:
        values = harness.ceilings(device, small=dry)
        append(out, {"type": "item", "stage": "1", "kind": "ceiling", "name": "ceilings", "status": "ok",
                     "values": values, "scaled_down": "CPU: 16 MiB copy, 256^3 bf16 matmul" if dry else ""})
        print(json.dumps(values, indent=1), flush=True)
    except Exception:
        append(out, {"type": "item", "stage": "1", "kind": "ceiling", "name": "ceilings", "status": "error",
                     "detail": tail(traceback.format_exc())})
    return 0


def git_revision() -> Optional[str]:
    if os.environ.get("FASTRES_REVISION"):
        return os.environ["FASTRES_REVISION"]
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None  # a copy of the tree without .git


def nvidia_smi_driver() -> Optional[str]:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return run.stdout.strip().splitlines()[0] if run.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# Stage 2: a pool of spawned processes; each rebuilds the item lists and warms the tasks it is given. A task
# is (part key, item name, compile): compile "" builds the item's Triton kernels (seconds), else it names the
# torch.compile variant whose inductor graphs it builds (tens of seconds, with compile threads of its own).
_WORKER: dict = {}
INDUCTOR_LIMIT = {"gpu": (2, 4), "dry": (1, 1)}  # inductor builds at once: while Triton tasks wait, after
INDUCTOR_THREADS = 3  # TORCHINDUCTOR_COMPILE_THREADS of each: 4 builds x (1 + 3) on the 16 cores at most


def warm_order(tasks: list) -> list:
    """The tasks in the order the stages need them: by part (3a, 3b, ..., 4d), each part's in item order."""
    return sorted(tasks, key=lambda task: ITEM_PARTS.index(task[0]))  # stable: item order within a part


def next_warm_task(pending: list, inductor_running: int, limits: tuple) -> Optional[int]:
    """Index in ``pending`` (in warm_order) of the task a free worker takes: the first inductor build while
    fewer than ``limits[0]`` run (``limits[1]`` once no Triton task waits), else the first Triton task.

    So the Triton tasks go in stage order on every other worker from the start, and the long builds, the
    stages' own order too, never take more than a few workers' cores."""
    triton = next((i for i, task in enumerate(pending) if not task[2]), None)
    limit = limits[0] if triton is not None else limits[1]
    if inductor_running < limit:
        inductor = next((i for i, task in enumerate(pending) if task[2]), None)
        if inductor is not None:
            return inductor
    return triton


def tasks_to_start(pending: list, running: list, workers: int, limits: tuple) -> list:
    """The tasks free workers take now (popped from ``pending``, by next_warm_task), in the order they start."""
    started: list = []
    inductor = sum(bool(task[2]) for task in running)
    while pending and len(running) + len(started) < workers:
        i = next_warm_task(pending, inductor, limits)
        if i is None:  # only inductor builds wait, and as many run as may
            break
        started.append(pending.pop(i))
        inductor += bool(started[-1][2])
    return started


def warm_tasks(cfg, out: Path) -> list:
    """Every (part, item, compile) task of stages 3-4, in warm_order."""
    tasks = []
    for key in ITEM_PARTS:
        for item in stage_items(cfg, key, out):
            if item.warm is not None:
                tasks.append((key, item.name, ""))
            tasks += [(key, item.name, variant) for variant in item.compiles]
    return warm_order(tasks)


def _warm_init(dry: bool, out: str) -> None:
    setup_paths()
    import lease_items as li

    _WORKER.update(cfg=li.Config(dry=dry), out=Path(out), items={})


def _warm_tasks() -> list:
    return warm_tasks(_WORKER["cfg"], _WORKER["out"])  # in a worker: the stage's own process imports no torch


def _warm_task(task: tuple, real: bool) -> tuple:
    """Run one task; ``real`` False (a dry run's): only its scheduling is exercised (the interpreter compiles
    nothing)."""
    key, name, variant = task
    if not real:
        return task, 0.0, "planned", ""
    items = _WORKER["items"]
    if key not in items:
        items[key] = {i.name: i for i in stage_items(_WORKER["cfg"], key, _WORKER["out"])}
    item = items[key][name]
    start = time.time()
    try:
        (item.compiles[variant] if variant else item.warm)()
        return task, time.time() - start, "ok", ""
    except Exception:
        return task, time.time() - start, "error", tail(traceback.format_exc(), 6, 600)


def warm_task_name(task: tuple) -> str:
    key, name, variant = task
    return f"{key} {name}" + (f" [{variant}]" if variant else "")


def warmup_stage(dry: bool, out: Path, deadline: float) -> int:
    import multiprocessing
    import queue

    mode = "dry" if dry else "gpu"
    workers = 2 if dry else max(1, min(16, os.cpu_count() or 1))
    limits = INDUCTOR_LIMIT[mode]
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(INDUCTOR_THREADS))  # the spawned workers inherit it
    start = time.time()
    pool = multiprocessing.get_context("spawn").Pool(workers, _warm_init, (dry, str(out)))
    finished, work_s, tasks, running = set(), 0.0, [], {}
    results: queue.Queue = queue.Queue()
    try:
        tasks = pool.apply_async(_warm_tasks).get(timeout=max(0.1, deadline - 1 - time.time()))
        # The dry run's interpreter compiles nothing: two cheap items (optimizer steps) exercise the pool,
        # the other tasks only the scheduling.
        real = set(tasks) if not dry else {next((t for t in tasks if t[0] == k and not t[2]), None)
                                           for k in ("3a", "4a")}
        pending, order = list(tasks), 0
        while pending or running:
            for task in tasks_to_start(pending, list(running), workers, limits):
                running[task] = (order, sum(bool(t[2]) for t in running) + bool(task[2]))
                order += 1
                pool.apply_async(_warm_task, (task, task in real), callback=results.put,
                                 error_callback=lambda exc, task=task: results.put((task, 0.0, "error", repr(exc))))
            task, seconds, status, detail = results.get(timeout=max(0.1, deadline - 1 - time.time()))
            dispatched, inductor_running = running.pop(task)
            finished.add(task)
            work_s += seconds
            append(out, {"type": "item", "stage": "2", "kind": "compile", "name": "warm " + warm_task_name(task),
                         "for_stage": task[0], "inductor": bool(task[2]), "order": dispatched,
                         "inductor_running": inductor_running, "status": status, "seconds": round(seconds, 2),
                         "detail": detail})
            print(f"[2] {status:7s} {seconds:7.1f} s  {warm_task_name(task)}" + (f"\n{detail}" if detail else ""),
                  flush=True)
    except (multiprocessing.TimeoutError, queue.Empty):
        pass
    finally:
        pool.terminate()
    missing = [warm_task_name(t) for t in tasks if t not in finished]
    append(out, {"type": "item", "stage": "2", "kind": "compile-summary", "name": "compile warm-up", "status": "ok",
                 "wall_s": round(time.time() - start, 1), "work_s": round(work_s, 1), "workers": workers,
                 "tasks": len(tasks), "inductor_tasks": sum(bool(t[2]) for t in tasks), "inductor_limit": list(limits),
                 "compile_threads": os.environ["TORCHINDUCTOR_COMPILE_THREADS"], "not_finished": missing,
                 "scaled_down": "the interpreter compiles nothing: two optimizer items run, the other tasks are "
                                "only scheduled, on 2 processes" if dry else ""})
    return 0


@contextlib.contextmanager
def watchdog(at: float, key: str) -> Iterator[None]:
    """End this process (status PART_OVERRUN) if part ``key`` is still running at time ``at``.

    A thread, so it fires while the main thread waits in a kernel, a compile or a sleep (each releases the
    GIL); the runner then records the part as cut and starts the process again for the parts after it.
    """
    def fire() -> None:
        print(f"[{key}] over its budget: ending the stage process", flush=True)
        os._exit(PART_OVERRUN)

    timer = threading.Timer(max(0.0, at - time.time()), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def stage_main(args: argparse.Namespace) -> int:
    """Run the given parts in order (skipping those an earlier process of this stage ended), each recorded."""
    out = Path(args.out)
    setup_paths()
    parts = []  # (key, budget, planned end): "3a=40@1767000000.5"
    for spec in args.parts.split(","):
        key, rest = spec.split("=")
        budget, planned = rest.split("@")
        parts.append((key, float(budget), float(planned)))
    if args.stage in ("3", "4"):
        import lease_items  # noqa: F401  (torch, fastres, the suites' modules: before the parts' budgets start)
    for key, budget, planned in parts:
        records = [r for r in read_records(out) if r.get("stage") == key]
        if any(r.get("type") == "stage" for r in records):
            continue  # ended (or cut) in an earlier process
        begun = next((r for r in records if r.get("type") == "part-begin"), None)
        if begun:  # resumed after a crash: the part keeps its deadline
            start, deadline = begun["start"], begun["deadline"]
        else:
            start = time.time()
            deadline = part_deadline(start, budget, planned, args.deadline)
            append(out, {"type": "part-begin", "stage": key, "start": start, "deadline": deadline,
                         "budget_s": budget, "carried_s": round(deadline - start - budget, 1)})
        with watchdog(deadline + KILL_GRACE_S, key):
            if args.inject_hang == key:
                print(f"[{key}] --inject-hang: sleeping until the watchdog ends this part", flush=True)
                time.sleep(10**6)
            if key == "1":
                rc = environment_stage(args.dry_run, out)
            elif key == "2":
                rc = warmup_stage(args.dry_run, out, deadline)
            else:
                import lease_items as li

                cfg = li.Config(dry=args.dry_run, inject_failure=args.inject_failure,
                                inject_cut_row=args.inject_cut_row == key)
                rc = run_items(cfg, key, out, deadline, crash=args.inject_crash == key)
        if rc:
            return rc
        not_run = any(r.get("status") == "not run" for r in read_records(out) if r.get("stage") == key)
        append(out, {"type": "stage", "stage": key, "title": TITLES[key], "status": "cut" if not_run else "done",
                     "seconds": round(time.time() - start, 1), "budget_s": round(deadline - start, 1)})
    return 0


# --------------------------------------------------------------------------- the runner process


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # a fresh run: never mix records of two runs
            (self.out / name).unlink(missing_ok=True)
        self.log = open(self.out / "lease.log", "a", buffering=1)
        self.started = time.time()
        self.t0 = lease_start(os.environ.get("FASTRES_LEASE_START"), self.started)
        self.mode = "dry" if self.dry else "gpu"
        self.total = args.total or TOTAL_S[self.mode]
        self.budgets = dict(b.split("=", 1) for b in args.budget)
        self.wanted = set(args.stages.split(",")) if args.stages else {p.key for p in PARTS}
        # Parts left out (--stages) leave no time in the plan: the parts run get their own budgets.
        self.plan = plan_ends([p for p in PARTS if p.key in self.wanted], self.budget,
                              self.t0 + STARTUP_S[self.mode], self.mode)
        self.hard_deadline = self.t0 + self.total - TESTS_MIN_S[self.mode] - FINAL_S  # what stages 1-4 never pass
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.dry:
            self.env["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run interpreted on the CPU
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def say(self, line: str) -> None:
        stamped = f"[lease {time.time() - self.t0:6.1f} s] {line}"
        print(stamped, flush=True)
        self.log.write(stamped + "\n")

    def budget(self, part: Part) -> float:
        if part.key in self.budgets:
            return float(self.budgets[part.key])
        return part.dry_s if self.dry else part.gpu_s

    def stage_command(self, parts: list) -> list:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", parts[0].process,
               "--deadline", repr(self.hard_deadline),
               "--parts", ",".join(f"{p.key}={self.budget(p)}@{self.plan[p.key]!r}" for p in parts)]
        if self.dry:
            cmd.append("--dry-run")
        if self.args.inject_failure:
            cmd.append("--inject-failure")
        for option in ("inject_hang", "inject_crash", "inject_cut_row"):
            if getattr(self.args, option):
                cmd += ["--" + option.replace("_", "-"), getattr(self.args, option)]
        return cmd + [str(self.out)]

    def open_parts(self, parts: list) -> list:
        """The parts no process has ended yet (a cut or a crash records its part as ended, or leaves it open)."""
        closed = {r["stage"] for r in read_records(self.out) if r.get("type") == "stage"}
        return [p for p in parts if p.key not in closed]

    def process_deadline(self, parts: list) -> float:
        """When a (re)started stage process must be done: its import and the open parts' budgets from now, or
        the last part's planned end if later (the watchdog ends each part before; this is the last resort)."""
        import_s = IMPORT_S[self.mode] if parts[0].process in IMPORTING else 0.0
        return part_deadline(time.time(), import_s + sum(self.budget(p) for p in self.open_parts(parts) or parts),
                             self.plan[parts[-1].key], self.hard_deadline)

    def run_stage(self, parts: list) -> None:
        """One stage process for ``parts`` (e.g. 3a, 3b), started again after a watchdog cut, a crash, or an
        item that asked for a fresh process."""
        start = time.time()
        deadline = self.process_deadline(parts)
        self.say(f"stage {parts[0].process} ({', '.join(p.key + ' ' + p.title for p in parts)}): "
                 f"until {deadline - self.t0:.0f} s ({deadline - start:.0f} s)")
        restarts = 0
        while True:
            proc = subprocess.Popen(self.stage_command(parts), stdout=self.log, stderr=subprocess.STDOUT,
                                    cwd=REPO, env=self.env, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(0.5, deadline + 2 * KILL_GRACE_S - time.time()))
            except subprocess.TimeoutExpired:  # the watchdog should have fired: the last resort
                kill_group(proc)
                rc = None
            kill_group(proc)  # its warm-up workers, if any are left
            if rc == 0:
                break
            crashed = rc not in (None, PART_OVERRUN, FRESH_PROCESS)
            restarts += crashed
            resume = rc in (PART_OVERRUN, FRESH_PROCESS) or (crashed and restarts <= 2)
            self.close_unfinished(parts, rc, final=not resume or deadline - time.time() < 5)
            self.say(f"stage process {parts[0].process} ended with status {rc}"
                     + (": starting it again for what is left" if resume else ""))
            if not resume or deadline - time.time() < 5 or not self.open_parts(parts):
                break
            deadline = self.process_deadline(parts)
        self.close_unfinished(parts, rc, final=True)
        self.say(f"stage {parts[0].process} ended after {time.time() - start:.1f} s")
        self.write_json()

    def close_unfinished(self, parts: list, rc: Optional[int], final: bool) -> None:
        """Record what a killed or crashed stage process left open: the item it was in (with the variants it
        timed, a partial row), its part, parts not begun. A crashed part stays open (its process resumes it)
        unless ``final``.
        """
        records = read_records(self.out)
        for part in parts:
            mine = [r for r in records if r.get("stage") == part.key]
            if any(r.get("type") == "stage" for r in mine):
                continue
            begun = next((r for r in mine if r.get("type") == "part-begin"), None)
            if begun is None:
                if final:  # never begun: no time left, or its process died first (an import error: see lease.log)
                    died = rc not in (0, None, PART_OVERRUN, FRESH_PROCESS)
                    append(self.out, {"type": "stage", "stage": part.key, "title": part.title, "rc": rc,
                                      "status": "crashed" if died else "not run"})
                continue
            cut = rc in (None, PART_OVERRUN)
            ended = {r["name"] for r in mine if r.get("type") == "item"}
            for r in mine:
                if r.get("type") == "begin" and r["name"] not in ended:
                    why = ("still running when its part's budget ran out" if cut
                           else f"the stage process died (exit status {rc}) while this ran; see lease.log")
                    variants = [v for v in mine if v.get("type") == "variant" and v["name"] == r["name"]]
                    append(self.out, {"type": "item", "stage": part.key, "name": r["name"],
                                      "kind": "check" if part.key in CHECK_PARTS else "ratio",
                                      "status": "cut" if cut else "error", "detail": why,
                                      **(partial_row(variants) if variants else {})})
                    ended.add(r["name"])
            if cut or final:
                append(self.out, {"type": "stage", "stage": part.key, "title": part.title,
                                  "status": "cut" if cut else "crashed", "rc": rc,
                                  "seconds": round(time.time() - begun["start"], 1),
                                  "budget_s": round(begun["deadline"] - begun["start"], 1)})

    def run_tests(self, stage: Part) -> None:
        """pytest tests until the total budget, interrupted (SIGINT: pytest reports what ran) before it ends."""
        start = time.time()
        deadline = self.t0 + self.total - FINAL_S
        if stage.key in self.budgets:
            deadline = min(deadline, start + float(self.budgets[stage.key]))
        self.say(f"stage 5 {stage.title}: {deadline - start:.0f} s")
        env = next((r.get("values") for r in read_records(self.out) if r.get("kind") == "env"), None) or {}
        gpus = env.get("gpu_count", 0 if self.dry else 1)  # stage 1's count; one GPU if stage 1 recorded none
        selection = tests_to_run(self.dry, gpus)
        cmd = [sys.executable, "-m", "pytest", *selection, "-v", "-p", "no:cacheprovider", "-rfE",
               f"--junitxml={self.out / 'tests.xml'}"]
        workers = xdist_workers(self.dry, deadline - start, os.cpu_count() or 1,
                                importlib.util.find_spec("xdist") is not None)
        if workers:
            cmd += ["-n", str(workers)]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", "60"]
        interrupt_s = 6.0 if self.dry else 8.0  # pytest's time to stop and write its report
        record = {"type": "item", "stage": "5", "kind": "tests", "name": "test suite", "command": " ".join(cmd[1:]),
                  "selection": selection, "gpus": gpus, "workers": workers}
        if deadline - start < interrupt_s + 5:
            append(self.out, dict(record, status="not run", detail="no time left"))
            return
        interrupted = False
        with open(self.out / "tests.log", "w") as log:
            # PYTHONSAFEPATH: `python -m pytest` would put the checkout first on sys.path, and its fastres has
            # no fastres.kernels (the wheel maps kernels/ there): the installed package must be the one tested.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=dict(self.env, PYTHONSAFEPATH="1"), start_new_session=True)
            try:
                rc = proc.wait(timeout=max(0.5, deadline - interrupt_s - time.time()))
            except subprocess.TimeoutExpired:
                interrupted = True
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    rc = proc.wait(timeout=interrupt_s - 1)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
                    rc = None
        counts, failed = parse_pytest_log((self.out / "tests.log").read_text(errors="replace"))
        bad = counts.get("FAILED", 0) + counts.get("ERROR", 0)
        status = "fail" if bad or (rc not in (0, 5) and not interrupted) else ("cut" if interrupted else "pass")
        seconds = time.time() - start
        append(self.out, dict(record, status=status, rc=rc, seconds=round(seconds, 1), counts=counts,
                              failed=failed[:30], stopped_at_budget=interrupted,
                              detail="" if status != "fail" else tail((self.out / "tests.log").read_text(errors="replace"))))
        append(self.out, {"type": "stage", "stage": "5", "title": stage.title, "status": "cut" if interrupted else "done",
                          "rc": rc, "seconds": round(seconds, 1), "budget_s": round(deadline - start, 1), "restarts": 0})
        self.say(f"stage 5 {status} in {seconds:.1f} s: {counts}")

    def write_json(self) -> dict:
        records = read_records(self.out)
        items = [r for r in records if r.get("type") == "item"]
        data = {
            "meta": {"dry_run": self.dry, "total_budget_s": self.total, "elapsed_s": round(time.time() - self.t0, 1),
                     "startup_s": round(self.started - self.t0, 1), "argv": sys.argv[1:],
                     "planned_ends_s": {k: round(t - self.t0, 1) for k, t in self.plan.items()},
                     "note": "DRY RUN on the CPU: nothing here ran on a GPU" if self.dry else ""},
            "stages": [r for r in records if r.get("type") == "stage"],
            "environment": next((r.get("values") for r in items if r["kind"] == "env"), None),
            "ceilings": next((r.get("values") for r in items if r["kind"] == "ceiling"), None),
            "compile": [r for r in items if r["kind"] in ("compile", "compile-summary")],
            "checks": [r for r in items if r["kind"] == "check"],
            "ratios": [r for r in items if r["kind"] == "ratio"],
            "variants": [r for r in records if r.get("type") == "variant"],
            "tests": next((r for r in items if r["kind"] == "tests"), None),
        }
        data["summary"] = {"checks_passed": sum(r["status"] == "pass" for r in data["checks"]),
                           "checks_failed": sum(r["status"] in ("fail", "error") for r in data["checks"]),
                           "checks_not_run": sum(r["status"] in ("cut", "not run") for r in data["checks"]),
                           "exit_status": exit_status(data)}
        tmp = self.out / "lease.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.out / "lease.json")
        return data

    def run(self) -> int:
        wanted = self.wanted
        self.say(f"fastres lease runner{' (DRY RUN: CPU, Triton interpreter, tiny sizes)' if self.dry else ''}: "
                 f"total {self.total:.0f} s from the command's start ({self.started - self.t0:.1f} s ago), "
                 f"OUT {self.out}")
        for process in dict.fromkeys(p.process for p in PARTS):
            parts = [p for p in PARTS if p.process == process and p.key in wanted]
            if not parts:
                continue
            try:
                if process == "5":
                    self.run_tests(parts[0])
                else:
                    self.run_stage(parts)
            except Exception:  # the runner itself must go on to the next stage and the table
                self.say(f"stage {process}: runner error\n{traceback.format_exc()}")
                append(self.out, {"type": "stage", "stage": process, "title": parts[0].title,
                                  "status": "runner error", "detail": tail(traceback.format_exc())})
        data = self.write_json()
        table = render(data)
        (self.out / "summary.txt").write_text(table + "\n")
        self.log.write(table + "\n")
        self.log.close()
        print(table, flush=True)
        return data["summary"]["exit_status"]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group (it and its workers), SIGKILL what is left after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_OUTCOME = r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_PLAIN = re.compile(rf"^(\S+::\S*.*?) {_OUTCOME}\b")  # tests/x.py::test[a] PASSED   [ 10%]
_XDIST = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] {_OUTCOME} (\S+)")  # [gw3] [ 10%] PASSED tests/x.py::test


def parse_pytest_log(text: str) -> tuple:
    """Outcome counts and failed test ids from ``pytest -v`` output, up to its FAILURES/summary sections."""
    counts: dict = {}
    failed = []
    for line in text.splitlines():
        if line.startswith("=") and any(s in line for s in ("FAILURES", "ERRORS", "short test summary")):
            break
        m = _PLAIN.match(line)
        test, outcome = (m.group(1), m.group(2)) if m else (None, None)
        if not m:
            m = _XDIST.match(line)
            test, outcome = (m.group(2), m.group(1)) if m else (None, None)
        if outcome:
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("FAILED", "ERROR"):
                failed.append(test)
    return counts, failed


def exit_status(data: dict) -> int:
    if any(r["status"] in ("fail", "error") for r in data["checks"]):
        return 1
    if any(s.get("stage") in CHECK_PARTS + ("3",) and s.get("status") in ("crashed", "runner error")
           for s in data["stages"]):
        return 1
    if data["tests"] and data["tests"]["status"] == "fail":
        return 1
    return 0


# --------------------------------------------------------------------------- the install check


INSTALL_MODULES = ("torch", "triton", "fastres", "fastres.kernels")


def install_problem(dry: bool) -> str:
    """Why this interpreter cannot run the lease ("" when it can): a module of INSTALL_MODULES that does not
    import (fastres.kernels is where a wheel or an editable install maps kernels/), or, on the GPU, no CUDA."""
    for name in INSTALL_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an import that raises anything is a broken install
            text = str(exc).strip().splitlines()
            return f"import {name} failed in {sys.executable}: {type(exc).__name__}: {text[0] if text else ''}"
    import torch

    if not dry and not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device"
    return ""


def check_install(dry: bool) -> int:
    """One line either way: what is installed, or why the lease cannot run (exit status INSTALL_FAILED)."""
    problem = install_problem(dry)
    if problem:
        print(f"gpu_check: FAILED before stage 1, nothing ran: {problem}", flush=True)
        return INSTALL_FAILED
    import fastres
    import torch
    import triton

    device = "dry run: CPU" if dry else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    print(f"install check: fastres {fastres.__version__} ({Path(fastres.__file__).parent}), torch {torch.__version__}, "
          f"triton {triton.__version__}, {device}", flush=True)
    return 0


# --------------------------------------------------------------------------- the table


ABBREV = [(" + CUDA graph", "+graph"), ("eager channels_last", "eager-cl"), ("torch.compile", "compile"),
          ("torch-foreach", "foreach"), ("torch-fused", "fused"), ("eager saved activations", "saved"),
          ("fastres, Triton's launch path", "triton-path")]


def abbrev(name: str) -> str:
    for long, short_ in ABBREV:
        name = name.replace(long, short_)
    return name


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def ratio_text(r: dict) -> str:
    """``/baseline 0.55 (<=0.60 met)``: the subject's time over the baseline's, with the goal where one applies."""
    subject = "" if r["subject"] == "fastres" else abbrev(r["subject"]) + " "
    if r["baseline"] == "goal":
        return f"goal {r['goal']} {'met' if r['met'] else 'MISSED'}"
    text = f"{subject}/{abbrev(r['baseline'])} {fmt(r.get('ratio'), '.2f')}"
    if r.get("goal") is not None and r.get("ratio") is not None:
        text += f" (<={r['goal']:.2f} {'met' if r['met'] else 'MISSED'})"
    return text


MODELED_TOP = 3  # kernels the table shows measured beside modeled (lease.json has them all)


def modeled_lines(r: dict) -> list:
    """The profile row's model check, a few lines: its top kernels' measured ms beside the modeled ms
    (fastres.testing.gpu_model's prediction, from the committed JSON), then the step totals."""
    m = r["modeled"]
    if m.get("status") != "ok":
        return [f"    modeled: {m.get('status')}: {(m.get('detail') or '').strip()[:160]}"]
    lines = []
    top = [(n, k) for n, k in (r.get("kernels") or {}).items() if k.get("modeled_ms") is not None][:MODELED_TOP]
    for name, k in top:
        lines.append(f"    {name[:30]:30s} measured {k['ms']:.3g} ms, modeled {k['modeled_ms']:.3g} ms: "
                     f"x{fmt(k.get('measured_over_modeled'), '.2f')}; launches {fmt(k.get('launches'), '.0f')} vs "
                     f"{fmt(k.get('modeled_calls'), '.0f')}")
    t, mt = m["total"], m["matched_total"]
    lines.append(f"    {'step total':30s} measured {fmt(t['measured_ms'], '.3g')} ms, modeled "
                 f"{fmt(t['modeled_ms'], '.3g')} ms: x{fmt(t.get('measured_over_modeled'), '.2f')}; {m['matched']} of "
                 f"{m['modeled_names']} modeled names measured ({fmt(mt['measured_ms'], '.3g')} vs "
                 f"{fmt(mt['modeled_ms'], '.3g')} ms)")
    return lines


def render(data: dict) -> str:
    """The compact table printed last: stages, each check pass/fail, each ratio with its goal, the tests."""
    lines = ["=" * 30 + " fastres GPU lease " + "=" * 30]
    if data["meta"]["dry_run"]:
        lines.append("DRY RUN on the CPU (Triton interpreter, tiny sizes): no figure below is a GPU measurement")
    env = data.get("environment") or {}
    if env:
        lines.append(f"{env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | CUDA "
                     f"{env.get('cuda')} | driver {env.get('driver', '-')} | py {env.get('python')} | rev "
                     f"{(env.get('revision') or '-')[:12]} | {env.get('date_utc')}")
    ceil = data.get("ceilings") or {}
    if ceil:
        lines.append(f"ceilings: copy {fmt(ceil.get('copy_gbps'), '.0f')} GB/s, bf16 matmul "
                     f"{fmt(ceil.get('matmul_bf16_tflops'), '.1f')} TFLOP/s")
    lines.append("stages:")
    for s in data["stages"]:
        lines.append(f"  {s['stage']:3s} {s.get('title', ''):32s} {s['status']:13s} {fmt(s.get('seconds'), '.1f'):>6s} s"
                     f" of {fmt(s.get('budget_s'), '.0f')}" + (f", {s['restarts']} restarts" if s.get("restarts") else ""))
    for c in data["compile"]:
        if c["kind"] == "compile-summary":
            failed = sum(r["status"] == "error" for r in data["compile"] if r["kind"] == "compile")
            lines.append(f"compile warm-up: {c['tasks']} tasks ({c.get('inductor_tasks', 0)} inductor builds, at most "
                         f"{max(c.get('inductor_limit') or [0])} at once) in {c['wall_s']} s wall on {c['workers']} "
                         f"processes ({c['work_s']} s of work), {failed} failed, {len(c['not_finished'])} not finished"
                         + (f": {', '.join(c['not_finished'][:3])}" + (" ..." if len(c["not_finished"]) > 3 else "")
                            if c["not_finished"] else ""))
    s = data["summary"]
    lines.append(f"checks: {s['checks_passed']} passed, {s['checks_failed']} failed, {s['checks_not_run']} not run")
    groups: dict = {}
    for r in data["checks"]:
        groups.setdefault(r.get("group") or r["name"], []).append(r)
    check_lines = []
    for group, rs in groups.items():
        mark = lambda r: {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}.get(r["status"], r["status"].upper())
        if len(rs) == 1 and not rs[0].get("label"):
            check_lines.append(f"  {mark(rs[0]):5s} {group}")
        else:
            check_lines.append(f"  {group}: " + ", ".join(f"{r.get('label')} {mark(r)}" for r in rs))
    if sum(map(len, check_lines)) > 4000:  # the lease shows the last 12,000 characters: all-pass groups as a count
        passed = [g for g, rs in groups.items() if all(r["status"] == "pass" for r in rs)]
        check_lines = [line for line, g in zip(check_lines, groups) if g not in passed]
        check_lines.insert(0, f"  PASS  every check of {len(passed)} groups (names in lease.json)")
    lines += check_lines
    for r in data["checks"]:
        if r["status"] in ("fail", "error"):
            lines.append(f"  !! {r['name']}: " + (r.get("detail") or "").strip().splitlines()[-1][:200]
                         if r.get("detail") else f"  !! {r['name']}")
    if data["ratios"]:
        lines.append("ratios (fastres time / baseline time; < 1: fastres faster; goals from the issue):")
    folded: dict = {}  # rows that did not run, by status and reason: one line each
    for r in data["ratios"]:
        med = r.get("medians_ms") or {}
        head = f"  {r['name']:36s}"
        if r["status"] != "ok" and med:  # cut or crashed mid-row: the variants it timed
            timed = [f"{abbrev(v)} {ms:.4g} ms" for v, ms in med.items()]
            missing = [abbrev(v) for v in (r.get("errors") or {})]
            lines.append(head + f" PARTIAL ({r['status']}): " + " | ".join(
                timed + (["not run: " + ", ".join(missing)] if missing else [])))
            continue
        if r["status"] != "ok":
            why = (r.get("detail") or "").strip().splitlines()
            folded.setdefault((r["status"], why[-1][:150] if why else ""), []).append(r["name"])
            continue
        parts = [f"{fmt(med.get('fastres'), '.4g')} ms"]
        parts += [ratio_text(x) for x in r.get("ratios", []) if x.get("ratio") is not None]
        if r.get("gbps"):
            parts.append(f"{r['gbps']:.0f} GB/s" + (f" ({r['fraction_of_copy']:.2f} of copy)" if r.get("fraction_of_copy") else ""))
        if r.get("images_per_s", {}).get("fastres"):
            parts.append(f"{r['images_per_s']['fastres']:.0f} img/s")
        if r.get("host_ms"):
            parts.append("host ms/step " + ", ".join(f"{abbrev(v)} {ms:.3g}" for v, ms in r["host_ms"].items()))
        if r.get("kernels"):
            parts.append(f"{fmt(r.get('kernels_per_step'), '.0f')} kernels; top: " + ", ".join(
                f"{name[:28]} {k['ms']:.3g} ms" for name, k in list(r["kernels"].items())[:3]))
        missing = [abbrev(v) for v in (r.get("errors") or {})]
        if missing:
            parts.append("not run: " + ", ".join(missing))
        lines.append(head + " " + " | ".join(parts))
        if r.get("modeled"):
            lines += modeled_lines(r)
    for (status, why), names in folded.items():
        lines.append(f"  {status}: {names[0]}" + (f" and {len(names) - 1} more rows" if len(names) > 1 else "")
                     + (f": {why}" if why else ""))
    t = data.get("tests")
    if t:
        counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted((t.get("counts") or {}).items()))
        lines.append(f"tests: {t['status'].upper()} {counts or 'no outcomes'}"
                     + (" (stopped at the budget: not all ran)" if t.get("stopped_at_budget") else "")
                     + (f"; failed: {', '.join(t['failed'][:5])}" if t.get("failed") else ""))
    code = s["exit_status"]
    lines.append(f"result: {'PASS' if code == 0 else 'FAIL'} (exit {code}); raw results in lease.json, results.jsonl")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output folder (created; the runner's own files in it are replaced)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes, kernels interpreted")
    p.add_argument("--check-install", action="store_true",
                   help="only check that fastres's kernels import (and on the GPU that CUDA is there); exit 2 if not")
    p.add_argument("--stages", default="", help="comma-separated stage keys to run (default: all)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=SECONDS", help="override a stage's budget")
    p.add_argument("--total", type=float, default=0.0,
                   help="total budget in seconds from the command's start (default 420 GPU / 200 dry)")
    p.add_argument("--inject-failure", action="store_true", help="make the first optimizer check fail (tests)")
    p.add_argument("--inject-hang", default="", metavar="KEY", help="make stage KEY hang until cut (tests)")
    p.add_argument("--inject-crash", default="", metavar="KEY", help="abort the process in part KEY's first item (tests)")
    p.add_argument("--inject-cut-row", default="", metavar="KEY",
                   help="part KEY's first ratio row hangs after its first variant until cut (tests)")
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)  # inside a stage process
    p.add_argument("--parts", default="", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None and not args.check_install:
        p.error("OUT is required (except with --check-install)")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.check_install:
        return check_install(args.dry_run)
    if args.stage:
        return stage_main(args)
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
