"""What the lease runner (lease.py) measures and checks: its environment, ceilings, checks and ratio rows.

Imported by the stage processes only (never by the runner's own process), after
``lease.py`` has put ``benchmarks/``, ``tests/`` and ``examples/`` on
``sys.path`` and, on a dry run, set ``TRITON_INTERPRET=1``.

Each check and each ratio row is an :class:`Item`: ``run()`` does it and returns
the fields of its record (a check raises ``AssertionError`` when it fails);
``warm()`` runs the fastres work of ``run()`` once at the same shapes, dtypes and
options, so that stage 2 compiles every Triton kernel variant before anything is
timed, and each of ``compiles`` builds one ``torch.compile`` (inductor) graph of
``run()`` into inductor's on-disk caches. A :class:`Config` holds the sizes: the
GPU's, or the dry run's tiny ones (``scaled`` says what was scaled down).

A ratio row records each variant as soon as it is timed (:func:`recording_variants`),
so a row cut by the stage's watchdog keeps what it measured.

The pieces come from the benchmark suite (``test_optim``, ``test_block``,
``test_train``, ``resnet_bench``, ``harness``) and the tests (``optim_cases``'s
tolerances, ``test_conv_block``'s three-way rule), so the lease checks what the
suite checks, at full size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
import torch.nn.functional as F

import fastres
import harness
import optim_cases
import resnet_bench
import test_block
import test_optim
import test_train
from fastres.launchers import conv as conv_launchers
from fastres.launchers.core import triton_launch_path
from fastres.launchers.optim import CHUNK
from fastres.testing import count_launches

FP32, BF16 = torch.float32, torch.bfloat16


class Skip(Exception):
    """An item (or a variant of a row) that cannot run here, with the reason."""


SKIPS = (Skip, pytest.skip.Exception)  # the suites' helpers skip with pytest.skip (a BaseException)


@dataclasses.dataclass
class Item:
    name: str
    kind: str  # "check" or "ratio"
    run: Callable[[], dict]
    warm: Optional[Callable[[], None]] = None  # the Triton kernels of run(): short, stage 2 runs these first
    scaled: str = ""  # on a dry run: what differs from the GPU run
    group: str = ""  # the summary prints a group's items on one line: "group: label PASS, label PASS"
    label: str = ""
    # Inductor compiles of run() ({variant: build}), each a long task of its own in stage 2, a few at a time.
    compiles: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of one run: the GPU's (``dry=False``) or the dry run's, on the CPU under the interpreter."""

    dry: bool
    inject_failure: bool = False
    inject_cut_row: bool = False  # --inject-cut-row: a row hangs after its first variant, until the watchdog


    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    # Optimizers: parameter sets (test_optim.PARAM_SETS names), steps, step-counter and >2^31 sizes.
    @property
    def optim_sets(self) -> dict:
        if self.dry:
            return {"resnet20": "tiny", "100M/1000": "20k/20"}
        return {"resnet20": "resnet20", "resnet18": "resnet18", "100M/1000": "100M"}

    def optim_steps(self, set_name: str) -> int:
        # 100M in 1,000 tensors: each step's comparison flattens 400 MB per state tensor, so 3 steps fit 3a's
        # budget (12 such checks); the smaller sets take 10.
        return 2 if self.dry else 3 if set_name == "100M/1000" else 10

    @property
    def counter(self) -> tuple:  # (numel of the big tensor, steps)
        return (2 * CHUNK + 3, 2) if self.dry else (64 * CHUNK + 3, 1000)

    @property
    def counter_stress(self) -> tuple:  # (single-chunk tensors, multi-chunk shapes, steps)
        if self.dry:
            return 6, [(2 * CHUNK + 3,)], 3
        return 300, [(CHUNK + 1,), (5 * CHUNK + 7,), (64 * CHUNK + 3,)], 200

    @property
    def graph_replays(self) -> int:
        return 2 if self.dry else 5

    @property
    def graph_models(self) -> tuple:  # (model, batch, image size, eager warm-up steps, replays): captured training
        # steps. The dry run has no graphs (each model's eager step stands in): one warm-up step, one replay.
        if self.dry:
            return ("tiny", 2, test_train.SMOKE_IMAGE_HW["tiny"], 1, 1)
        return ("resnet20", 64, 32, CAPTURE_WARMUP, 4)

    @property
    def graphed_models(self) -> tuple:  # the captured models (with the eager third, "C"): one on the CPU, where
        # each stands in eagerly for its replay, to save the interpreter two models' steps
        return ("A",) if self.dry else ("A", "B")

    @property
    def tf32_conv(self) -> tuple:  # (batch, channels, image size): ResNet-20's stage-1 conv at batch 256
        return (2, 8, 6) if self.dry else (256, 16, 32)

    @property
    def big_numel(self) -> int:
        return 2 * CHUNK + 5 if self.dry else 2**31 + 4099

    # Blocks and models.
    @property
    def block_cases(self) -> list:
        if self.dry:
            return [test_block.BlockCase("tiny", 4, 4, 6, 1, batch=2), test_block.BlockCase("tiny", 4, 8, 6, 2, batch=2)]
        return test_block.CUDA_CASES

    @property
    def block_steps(self) -> int:
        return 1  # a step updates the running statistics; the checks' float64 oracle is the cost at batch 512

    @property
    def models(self) -> dict:  # name -> (batch, image size, SGD steps)
        if self.dry:
            return {"tiny": (2, test_train.SMOKE_IMAGE_HW["tiny"], 1)}
        # ResNet-18 and ResNet-9 written in plain PyTorch, through fastres.convert (issue 20; the ResNet-18 of
        # fastres.reference.nn, the same network, was here before)
        return {"resnet20": (256, 32, 5), "kuangliu_resnet18": (256, 32, 5), "resnet9": (256, 32, 5)}

    @property
    def train_models(self) -> dict:  # name -> batch
        return {"tiny": 2} if self.dry else {"resnet20": 512, "kuangliu_resnet18": 512, "resnet9": 512}

    @property
    def compile_backend(self) -> str:
        # No C++ compiles for the CPU on a dry run: dynamo and AOTAutograd run, inductor does not.
        return "aot_eager" if self.dry else "inductor"

    @property
    def min_runs(self) -> int:
        return 1 if self.dry else 5

    def scaled(self, what: str) -> str:
        return what if self.dry else ""


# --------------------------------------------------------------------------- shared helpers


def synchronize(cfg: Config) -> None:
    harness.synchronize(cfg.device)


def release() -> None:
    """Free what the last item left: Python garbage, compiled steps, the CUDA cache."""
    resnet_bench.release_compiled()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def poisoned(cfg: Config) -> Iterator[None]:
    """Inside the block every new floating tensor starts as NaN, so an element a kernel forgets to write fails.

    torch.empty / empty_like / empty_strided / Tensor.new_empty (what fastres's
    launchers allocate outputs with) are wrapped to fill their result with NaN;
    on CUDA the caching allocator's free memory is filled with NaN first too (what
    torch's own C++ allocations get).
    """
    if cfg.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        n = min(int(free * 0.4), 32 << 30) // 4
        if n > 0:
            torch.full((n,), float("nan"), device="cuda")  # freed at once: its block stays cached, NaN-filled
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    new_empty = torch.Tensor.new_empty

    def wrap(fn):
        @functools.wraps(fn)
        def nan_filled(*args, **kwargs):
            t = fn(*args, **kwargs)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                with torch.no_grad():
                    t.fill_(float("nan"))
            return t

        return nan_filled

    for name, fn in originals.items():
        setattr(torch, name, wrap(fn))
    torch.Tensor.new_empty = wrap(new_empty)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = new_empty


@contextlib.contextmanager
def no_host_sync(cfg: Config, active: bool = True) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block (on CUDA; nothing to check on a CPU)."""
    if cfg.device != "cuda" or not active:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN autotuning on (eager and torch.compile's aten convs), as the benchmark suite's rows run."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """cuDNN's and cuBLAS's TF32 switches (fastres's fp32 convs follow cudnn.allow_tf32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: dict, history: Optional[torch.Tensor] = None,
             what: str = "") -> Optional[str]:
    """optim_cases.assert_tensor_close's rule, computed on the tensors' device: None, or what differs.

    |actual - expected| <= atol + rtol |expected| + hist max(history, |expected|), ``expected`` rounded to
    ``actual``'s dtype first; any NaN fails (a NaN-poisoned element that was never written shows here).
    """
    a, b, allowed, bad = _compare(actual, expected, tol, history)
    n = int(bad.sum())
    if not n:
        return None
    i = int(bad.nonzero()[0])
    return (f"{what}: {n} of {a.numel()} elements differ; first at flat index {i}: got {a[i].item()!r}, "
            f"expected {b[i].item()!r} (allowed {allowed[i].item():.3g})")


def _compare(actual: torch.Tensor, expected: torch.Tensor, tol: dict, history: Optional[torch.Tensor]) -> tuple:
    """(actual, expected, allowed difference, mask of elements that differ), flat, in float64, on the device."""
    a = actual.detach().double().reshape(-1)
    b = expected.detach().to(actual.dtype).double().reshape(-1)
    mag = b.abs() if history is None else torch.maximum(b.abs(), history.double().reshape(-1))
    allowed = tol["atol"] + tol["rtol"] * b.abs() + tol["hist"] * mag
    return a, b, allowed, ~((a - b).abs() <= allowed)  # NaN compares False: bad


def count_mismatches(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> torch.Tensor:
    """How many elements break :func:`mismatch`'s rule (no history), as a device scalar: no host sync."""
    return _compare(actual, expected, tol, None)[3].sum()


def torch_reference(name: str, params: list, options: dict, device: str) -> tuple:
    """torch.optim.<name> with ``fused=True`` where torch has it for this device and dtype, else ``foreach=True``."""
    cls = getattr(torch.optim, name)
    if name in optim_cases.TORCH_FUSED:
        probe = torch.zeros(2, device=device, dtype=params[0].dtype, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        try:
            cls([probe], **options, fused=True).step()
            return cls(params, **options, fused=True), "fused"
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            pass
    return cls(params, **options, foreach=True), "foreach"


def device_grads(shapes: list, gen: torch.Generator, device: str) -> list:
    """Fresh random gradients in fp32, |g| in [0.05, ~4] (optim_cases.random_grad's rule, on the device)."""
    grads = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen, device=device)
        grads.append(torch.where(g >= 0, 1.0, -1.0) * g.abs().clamp_min(0.05))
    return grads


def leaf_params(shapes: list, dtype: torch.dtype, device: str, seed: int = 0) -> list:
    gen = torch.Generator(device).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_() for s in shapes]


def flat(tensors: list) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def shapes_of(cfg: Config, set_name: str) -> list:
    return test_optim.PARAM_SETS[cfg.optim_sets[set_name]]


def short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


# --------------------------------------------------------------------------- stage 3: optimizer checks


def optim_parity(cfg: Config, name: str, set_name: str, dtype: torch.dtype, inject: bool = False) -> dict:
    """fastres.optim.<name> against torch.optim (fused, else foreach), every state tensor, for
    ``cfg.optim_steps(set_name)`` steps.

    Options make every state tensor exist (optim_cases.FULL_STATE_OPTIONS). bf16: torch steps fp32 copies that
    are rounded to bf16 after each step (optim_cases' "master" reference). Steps after the first run under
    ``set_sync_debug_mode("error")``; new tensors are NaN-poisoned.
    """
    device, shapes = cfg.device, shapes_of(cfg, set_name)
    options = optim_cases.FULL_STATE_OPTIONS[name]
    fr = leaf_params(shapes, dtype, device)
    ref = [p.detach().float().clone().requires_grad_() for p in fr]
    fr_opt = getattr(fastres.optim, name)(fr, **options)
    ref_opt, kind = torch_reference(name, ref, options, device)
    tol = optim_cases.tolerance(dtype, "master")
    history: dict = {}
    gen = torch.Generator(device).manual_seed(1)
    steps = cfg.optim_steps(set_name)
    for step in range(1, steps + 1):
        for p, q, g in zip(fr, ref, device_grads(shapes, gen, device)):
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        with poisoned(cfg), no_host_sync(cfg, active=step > 1):
            fr_opt.step()
        ref_opt.step()
        if dtype != FP32:
            optim_cases.round_to_storage(ref_opt, ref, [dtype] * len(ref))
        if inject and step == steps:  # --inject-failure: a wrong element the comparison must catch
            with torch.no_grad():
                fr[0].view(-1)[0] += 1.0
        keys = set(ref_opt.state[ref[0]])
        for i, (p, q) in enumerate(zip(fr, ref)):
            if set(fr_opt.state[p]) != set(ref_opt.state[q]):
                raise AssertionError(f"param {i}: state keys {sorted(fr_opt.state[p])} vs torch's {sorted(ref_opt.state[q])}")
        if "step" in keys:
            # Stacked where they live and moved once: a .cpu() per tensor is 2,000 syncs a step on 100M/1000.
            steps_fr = torch.stack([fr_opt.state[p]["step"].float() for p in fr])
            steps_ref = torch.stack([ref_opt.state[q]["step"].float() for q in ref]).to(steps_fr.device)
            if not torch.equal(steps_fr, steps_ref):
                raise AssertionError(f"step {step}: state['step'] {steps_fr.tolist()[:4]}... vs torch's {steps_ref.tolist()[:4]}...")
        # One comparison per key over all tensors at once (1,000 tensors would be 1,000 x a dozen launches each).
        for key in ["param"] + sorted(keys - {"step"}):
            a = flat([p if key == "param" else fr_opt.state[p][key] for p in fr])
            b = flat([q if key == "param" else ref_opt.state[q][key] for q in ref])
            h = history.get(key)
            history[key] = b.abs().float() if h is None else torch.maximum(h, b.abs().float())
            bad = mismatch(a, b, tol, history[key], f"step {step}, {key} (all {len(fr)} tensors, flattened)")
            if bad:
                raise AssertionError(bad + f" (vs torch.optim.{name} {kind}; tensor sizes {[p.numel() for p in fr][:8]}...)")
    return {"reference": f"torch.optim.{name}({kind}=True)", "steps": steps,
            "params": sum(math.prod(s) for s in shapes), "tensors": len(shapes),
            "sync_checked": cfg.device == "cuda"}


def warm_optim(cfg: Config, name: str, options: dict, shapes: list, dtype: torch.dtype, lr_tensor: bool = False) -> None:
    params = leaf_params(shapes, dtype, cfg.device)
    for p in params:
        p.grad = torch.randn_like(p)
    if lr_tensor:
        options = dict(options, lr=torch.tensor(float(options.get("lr", 1e-3)), device=cfg.device))
    opt = getattr(fastres.optim, name)(params, **options)
    opt.step()
    opt.step()
    synchronize(cfg)


def step_counter(cfg: Config) -> dict:
    """Adam's device step counter after many steps with many programs per tensor is exact, and matches torch."""
    numel, steps = cfg.counter
    shapes = [(numel,), (3,), ()]
    fr = leaf_params(shapes, FP32, cfg.device)
    ref = [p.detach().clone().requires_grad_() for p in fr]
    grads = device_grads(shapes, torch.Generator(cfg.device).manual_seed(2), cfg.device)
    for p, q, g in zip(fr, ref, grads):
        p.grad, q.grad = g, g.clone()
    fr_opt = fastres.optim.Adam(fr, lr=1e-4)
    ref_opt, kind = torch_reference("Adam", ref, {"lr": 1e-4}, cfg.device)
    with poisoned(cfg):
        fr_opt.step()
    for _ in range(steps - 1):
        fr_opt.step()
    for _ in range(steps):
        ref_opt.step()
    counts = [float(fr_opt.state[p]["step"]) for p in fr]
    if counts != [float(steps)] * len(fr):
        raise AssertionError(f"state['step'] after {steps} steps: {counts}")
    # Against torch too (the bias corrections use the count), loosely: 1,000 steps of fp32 rounding in
    # another order drift by ~1e-6; a count off by one moves Adam's update by ~6e-4 of itself at step 1,000.
    tol = dict(rtol=1e-4, atol=1e-5, hist=1e-5)
    for i, (p, q) in enumerate(zip(fr, ref)):
        for key, a, b in [("param", p, q)] + [(k, fr_opt.state[p][k], ref_opt.state[q][k]) for k in ("exp_avg", "exp_avg_sq")]:
            bad = mismatch(a, b, tol, b.detach().abs().max().expand(b.shape), f"param {i} {tuple(a.shape)}, {key} after {steps} steps")
            if bad:
                raise AssertionError(bad + f" (vs torch.optim.Adam {kind})")
    return {"steps": steps, "programs_per_tensor": -(-numel // CHUNK), "numel": numel}


# Optimizer options of the counter stress check: each uses its step count (Adam's bias corrections,
# Adagrad's lr decay), so a count some warps read wrong changes the update.
COUNTER_STRESS_OPTIONS = {"Adam": dict(lr=1e-2, weight_decay=1e-2), "Adagrad": dict(lr=0.1, lr_decay=0.01)}


def counter_stress_shapes(cfg: Config) -> list:
    """Many single-chunk tensors (a 0-d one, one of exactly CHUNK elements, then sizes spread over 1..CHUNK)
    and a few multi-chunk ones: the two ways advance_step stores the count (one program, or the last reader)."""
    singles, multi, _ = cfg.counter_stress
    return [(), (CHUNK,)] + [(1 + (i * 7919) % CHUNK,) for i in range(singles - 2)] + multi


def counter_stress(cfg: Config, name: str) -> dict:
    """fastres.optim.<name> against torch.optim, every step compared from the same state (issue 18).

    The device step counter must equal the step number on every tensor after every step (exactly); params
    and state tensors follow optim_cases' fp32 rule. After each comparison torch's values are copied into
    fastres's, so that each step is checked on its own: a count that some warps read one step ahead moves
    that step's update by 0.3% at step 200, which a comparison of 200 accumulated steps could not resolve.
    The counts of differing elements stay on the device (no sync in the loop); the first step with any
    fails the check.
    """
    device, shapes = cfg.device, counter_stress_shapes(cfg)
    _, _, steps = cfg.counter_stress
    options = COUNTER_STRESS_OPTIONS[name]
    fr = leaf_params(shapes, FP32, device, seed=4)
    ref = [p.detach().clone().requires_grad_() for p in fr]
    sizes = [p.numel() for p in fr]
    # Both sides' grads are views of one buffer each: a step's fresh grads are three launches, not 900.
    grad_fr = torch.empty(sum(sizes), device=device)
    grad_ref = torch.empty_like(grad_fr)
    for p, q, g, h in zip(fr, ref, grad_fr.split(sizes), grad_ref.split(sizes)):
        p.grad, q.grad = g.view(p.shape), h.view(q.shape)
    fr_opt = getattr(fastres.optim, name)(fr, **options)
    ref_opt, kind = torch_reference(name, ref, options, device)
    tol = optim_cases.tolerance(FP32, "master")
    gen = torch.Generator(device).manual_seed(5)
    keys: list = []
    bad = None  # [step, what]: wrong counts, then differing elements of the param and of each state tensor
    for step in range(1, steps + 1):
        with torch.no_grad():
            grad_fr.normal_(generator=gen)
            grad_fr.add_(grad_fr.sign(), alpha=0.05)  # |g| >= 0.05, as device_grads
            grad_ref.copy_(grad_fr)
        with poisoned(cfg) if step == 1 else contextlib.nullcontext():
            fr_opt.step()
        ref_opt.step()
        if bad is None:
            keys = sorted(set(ref_opt.state[ref[0]]) - {"step"})
            bad = torch.zeros(steps, 2 + len(keys), dtype=torch.int64, device=device)
        counts = torch.stack([fr_opt.state[p]["step"] for p in fr])
        bad[step - 1, 0] = (counts != step).sum()
        with torch.no_grad():
            for j, key in enumerate(["param"] + keys):
                mine = fr if key == "param" else [fr_opt.state[p][key] for p in fr]
                theirs = ref if key == "param" else [ref_opt.state[q][key] for q in ref]
                bad[step - 1, 1 + j] = count_mismatches(flat(mine), flat(theirs), tol)
                torch._foreach_copy_(mine, [t.detach() for t in theirs])
    per_step = bad.cpu()
    wrong = per_step.sum(dim=1).nonzero()
    if len(wrong):
        i = int(wrong[0])
        what = [f"state['step'] wrong on {int(per_step[i, 0])} of {len(fr)} tensors"] if per_step[i, 0] else []
        what += [f"{key}: {int(n)} of {sum(sizes)} elements differ"
                 for key, n in zip(["param"] + keys, per_step[i, 1:]) if n]
        raise AssertionError(f"step {i + 1} of {steps} (each from torch's state after the one before): "
                             + "; ".join(what) + f" (vs torch.optim.{name} {kind}; {len(fr)} tensors)")
    return {"reference": f"torch.optim.{name}({kind}=True)", "steps": steps, "tensors": len(shapes),
            "single_chunk": sum(n <= CHUNK for n in sizes), "programs_per_tensor_max": -(-max(sizes) // CHUNK)}


# Set when a CUDA-graph capture failed: the caching allocator may still point at the dead graph's pool,
# so the stage process ends after the item (lease.run_items) and the next item starts in a fresh one.
_FRESH_PROCESS: list = []


def needs_fresh_process() -> str:
    """Why this process must end after its current item ("" when it need not)."""
    return _FRESH_PROCESS[0] if _FRESH_PROCESS else ""


def capture_failed(what: str) -> None:
    _FRESH_PROCESS.append(f"a CUDA-graph capture failed in {what}")


CAPTURE_WARMUP = 2  # eager steps before capture: the first step's state creation and flags are behind it


def capture(step: Callable[[], Any], cfg: Config, warmup: int = CAPTURE_WARMUP,
            before: Optional[Callable[[int], Any]] = None) -> Callable[[], Any]:
    """``step`` captured in a CUDA graph (warmed up on a side stream first); returns its replay.

    Two warm-up steps by default: an optimizer's first step creates its state and flips its first-step
    flags (SGD's momentum); fastres builds the next step's tables with the first, so one warm-up step is
    enough for fastres's optimizers alone (``warmup=1``), the recipe's two cover the rest. ``before(i)``
    runs before warm-up step ``i`` (to load that step's inputs). On the CPU (dry run) there are no graphs:
    ``step`` itself stands in, so the comparison still runs.
    """
    if cfg.device != "cuda":
        for i in range(warmup):
            if before is not None:
                before(i)
            step()
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            if before is not None:
                before(i)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception:
        capture_failed(getattr(step, "__qualname__", "a step"))
        raise
    return graph.replay


def graph_step(cfg: Config, name: str) -> dict:
    """A CUDA-graph-captured step equals the eager step bitwise over 5 replays, a tensor lr changed before the last."""
    shapes = shapes_of(cfg, "resnet20")
    kwargs: dict = {"lr": torch.tensor(1e-2, device=cfg.device)}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    else:
        kwargs["capturable"] = True
    eager = leaf_params(shapes, FP32, cfg.device)
    graphed = [p.detach().clone().requires_grad_() for p in eager]
    for p, q in zip(eager, graphed):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt_e = getattr(fastres.optim, name)(eager, **kwargs)
    opt_g = getattr(fastres.optim, name)(graphed, **{**kwargs, "lr": kwargs["lr"].clone()})
    for _ in range(CAPTURE_WARMUP):
        opt_e.step()
    replay = capture(opt_g.step, cfg)  # its warm-up steps are the graphed side's first steps
    for i in range(cfg.graph_replays):
        for p, q in zip(eager, graphed):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            q.grad.copy_(g)
        if i == cfg.graph_replays - 1:  # a scheduler-style change of the tensor lr reaches the graph
            opt_e.param_groups[0]["lr"].fill_(5e-3)
            opt_g.param_groups[0]["lr"].fill_(5e-3)
        opt_e.step()
        replay()
    synchronize(cfg)
    for i, (p, q) in enumerate(zip(eager, graphed)):
        for key, a, b in [("param", q, p)] + [(k, opt_g.state[q][k], v) for k, v in opt_e.state[p].items()]:
            if not torch.equal(a, b):
                raise AssertionError(f"param {i} {tuple(p.shape)} {key}: graph replay differs from eager")
    return {"replays": cfg.graph_replays, "graph": cfg.device == "cuda"}


def big_tensor(cfg: Config) -> dict:
    """One SGD step on a tensor of more than 2^31 elements: every element right (no int32 offset overflow)."""
    release()
    numel, lr = cfg.big_numel, 0.5
    gen = torch.Generator(cfg.device).manual_seed(3)
    p = torch.randn(numel, generator=gen, device=cfg.device).requires_grad_()
    p.grad = torch.randn(numel, generator=gen, device=cfg.device)
    p0 = p.detach().clone()
    with poisoned(cfg):
        fastres.optim.SGD([p], lr=lr).step()
    tol = optim_cases.tolerance(FP32, "master")
    piece = 1 << 28
    for start in range(0, numel, piece):
        a = p.detach()[start:start + piece]
        b = p0[start:start + piece].add(p.grad[start:start + piece], alpha=-lr)
        bad = mismatch(a, b, tol, None, f"elements {start}..{start + a.numel() - 1}")
        if bad:
            raise AssertionError(bad)
    del p, p0
    release()
    return {"numel": numel, "over_2_31": numel > 2**31}


# --------------------------------------------------------------------------- stage 3: issue 18's CUDA-only fixes

# A fastres ResNet-20's training step as the CUDA-graph recipe captures it (examples/train_cifar.py's
# GraphedStep): grads zeroed in place, forward, loss, backward, fastres.optim.SGD's step. fp32 (TF32 convs).


def graph_model(cfg: Config, seed: int) -> tuple:
    """(model, optimizer) of cfg.graph_models, its weights from ``seed``: two calls with one seed are twins."""
    name = cfg.graph_models[0]
    torch.manual_seed(seed)
    model = test_train.build_model(name, fused=True).to(cfg.device, memory_format=torch.channels_last).train()
    return model, fastres.optim.SGD(model.parameters(), **test_train.RECIPE)


def graph_inputs(cfg: Config, seed: int, steps: int) -> list:
    """``steps`` (images, labels) batches on the device, made up front (no allocation between replays)."""
    _, batch, hw, _, _ = cfg.graph_models
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, hw, hw, generator=gen).to(cfg.device, memory_format=torch.channels_last),
             torch.randint(0, 10, (batch,), generator=gen).to(cfg.device)) for _ in range(steps)]


def model_step(model: torch.nn.Module, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)  # in place: the grads keep the addresses the optimizer's tables hold
    F.cross_entropy(model(x), y, label_smoothing=test_train.LABEL_SMOOTHING).backward()
    opt.step()


def warm_graph_model(cfg: Config) -> None:
    """Two steps of cfg.graph_models' model: its conv and optimizer kernels at that batch (items 1-2 of
    issue 18's lease list share them)."""
    model, opt = graph_model(cfg, 0)
    for x, y in graph_inputs(cfg, 0, 2):
        model_step(model, opt, x, y)
    synchronize(cfg)


def differing_state(model: torch.nn.Module, opt, ref: torch.nn.Module, ref_opt) -> list:
    """Names of the params, buffers and momentum buffers of ``model`` that are not equal to ``ref``'s."""
    bad = [k for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()) if not torch.equal(a, b)]
    for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
        a, b = opt.state[p].get("momentum_buffer"), ref_opt.state[q].get("momentum_buffer")
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            bad.append(f"momentum_buffer of param {i}")
    return bad


def captured_models(cfg: Config) -> dict:
    """Two captured training steps (graphs A and B, each its model's forward, backward and SGD step)
    replayed interleaved on two streams, with eager steps of a third model on the default stream between
    them: every param, buffer and momentum buffer equals the same three models stepped eagerly one after
    another, bitwise (same inputs). Captured conv launches take their BatchNorm partials and counters from
    their own graph's pool (fastres/launchers/workspace.py); when every capture shared one workspace, two
    graphs replayed at once would mix their partials."""
    name, batch, hw, warmup, replays = cfg.graph_models
    steps = warmup + replays
    graphed = cfg.graphed_models
    keys = graphed + ("C",)
    data = {k: graph_inputs(cfg, 20 + "ABC".index(k), steps) for k in keys}
    # The references: three models stepped eagerly, one after another, on the default stream.
    refs = {k: graph_model(cfg, 10 + "ABC".index(k)) for k in keys}
    for k in keys:
        for x, y in data[k]:
            model_step(*refs[k], x, y)
    models = {k: graph_model(cfg, 10 + "ABC".index(k)) for k in keys}
    cuda = cfg.device == "cuda"
    static = {k: (data[k][0][0].clone(), data[k][0][1].clone()) for k in graphed}
    replay = {}
    for k in graphed:
        (m, o), (sx, sy) = models[k], static[k]

        def load(i, k=k, sx=sx, sy=sy):
            sx.copy_(data[k][i][0])
            sy.copy_(data[k][i][1])

        replay[k] = capture(functools.partial(model_step, m, o, sx, sy), cfg, warmup=warmup, before=load)
    for x, y in data["C"][:warmup]:
        model_step(*models["C"], x, y)
    streams = {k: torch.cuda.Stream() if cuda else None for k in graphed}
    for s in streams.values():
        if s is not None:
            s.wait_stream(torch.cuda.current_stream())
    for i in range(warmup, steps):
        for k in graphed:
            with torch.cuda.stream(streams[k]) if cuda else contextlib.nullcontext():
                static[k][0].copy_(data[k][i][0])
                static[k][1].copy_(data[k][i][1])
                replay[k]()
        model_step(*models["C"], *data["C"][i])  # the default stream, while A and B replay on theirs
    for s in streams.values():
        if s is not None:
            torch.cuda.current_stream().wait_stream(s)
    synchronize(cfg)
    bad = {k: differing_state(*models[k], *refs[k]) for k in keys}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise AssertionError("not equal to the eager steps: " + "; ".join(
            f"{k} ({'graph' if k != 'C' else 'eager'}): {len(v)} tensors, first {', '.join(v[:3])}"
            for k, v in bad.items()))
    return {"model": name, "batch": batch, "steps": steps, "eager_warmup": warmup, "replays": replays,
            "graphs": len(graphed) if cuda else 0, "streams": len(keys) if cuda else 1}


@contextlib.contextmanager
def capture_or_pretend(cfg: Config, graph) -> Iterator[None]:
    """``torch.cuda.graph(graph)`` on CUDA; on the CPU, fastres's launchers told that a capture is on
    (``launchers.core.capturing``), so that what fastres does inside a capture runs."""
    if cfg.device == "cuda":
        with torch.cuda.graph(graph):
            yield
        return
    from fastres.launchers import core

    real = core.capturing
    core.capturing = lambda device: True
    try:
        yield
    finally:
        core.capturing = real


REFUSAL_WORDS = ("fastres", "CUDA graph capture", "warm-up")  # fastres/launchers/multi_tensor.py's message


def capture_refused(cfg: Config) -> dict:
    """After ``zero_grad(set_to_none=True)``, capturing forward + backward + ``opt.step()`` must fail with
    fastres's RuntimeError (the optimizer's tables would be rebuilt inside the capture: the grads are new),
    raised cleanly: the capture ended (no stream still capturing, no CUDA error after it), and the process
    goes on: an eager step then equals a twin's that never tried, bitwise. A capture that ended any other
    way ends this stage process after the item (lease.run_items), so no later item inherits its state.
    On the CPU the pretended capture runs the forward for real (running statistics move), so there the
    eager step after it is checked to run, without the twin."""
    _, _, _, warmup, _ = cfg.graph_models
    cuda = cfg.device == "cuda"
    model, opt = graph_model(cfg, 30)
    twin, twin_opt = graph_model(cfg, 30) if cuda else (None, None)
    data = graph_inputs(cfg, 31, warmup + 1)
    for x, y in data[:warmup]:
        model_step(model, opt, x, y)
        if cuda:
            model_step(twin, twin_opt, x, y)
    x, y = data[warmup]
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph() if cfg.device == "cuda" else None
    refused: Optional[BaseException] = None
    try:
        with capture_or_pretend(cfg, graph):
            F.cross_entropy(model(x), y, label_smoothing=test_train.LABEL_SMOOTHING).backward()
            opt.step()
    except Exception as exc:  # noqa: BLE001 (which exception it was is the check)
        refused = exc
    still_capturing = cfg.device == "cuda" and torch.cuda.is_current_stream_capturing()
    clean = isinstance(refused, RuntimeError) and all(w in str(refused) for w in REFUSAL_WORDS) and not still_capturing
    if refused is not None and not clean:
        capture_failed("the refused capture")  # ended some other way: a fresh process for what follows
    if refused is None:
        raise AssertionError("the capture of a step with new grads (set_to_none=True) was not refused")
    if not clean:
        raise AssertionError(f"the capture did not end with fastres's refusal alone: {short(refused)}"
                             + (f" (during: {short(refused.__context__)})" if refused.__context__ else "")
                             + ("; the stream is still capturing" if still_capturing else ""))
    message = str(refused).splitlines()[0][:200]
    refused = graph = None  # the traceback's frames hold the graph (and its pool, the capture's grads)
    try:
        synchronize(cfg)  # a capture left broken shows here
        opt.zero_grad(set_to_none=True)
        model_step(model, opt, x, y)
        if cuda:
            twin_opt.zero_grad(set_to_none=True)
            model_step(twin, twin_opt, x, y)
        synchronize(cfg)
    except Exception:
        capture_failed("the refused capture")
        raise
    bad = differing_state(model, opt, twin, twin_opt) if cuda else [
        n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        what = "differs from the twin's in" if cuda else "left non-finite"
        raise AssertionError(f"the eager step after the refusal {what} {len(bad)} tensors, first {', '.join(bad[:3])}")
    return {"message": message, "graph": cuda, "twin_compared": cuda}


# SGD with momentum: its first step creates the momentum buffers (a first-step flag in the tables).
TABLES_KEPT_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def junk_allocations(cfg: Config) -> list:
    """Memory handed out and filled with -1 (as an address: illegal), small blocks and a large one, after
    ``empty_cache``: tables a graph reads that had been freed would now hold it."""
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    small, n, large = (64, 256, 1 << 12) if cfg.dry else (4096, 2048, 1 << 25)
    return [torch.full((n,), -1, dtype=torch.int64, device=cfg.device) for _ in range(small)] + \
        [torch.full((large,), -1, dtype=torch.int64, device=cfg.device)]


def tables_kept(cfg: Config) -> dict:
    """A captured SGD(momentum) step (one eager warm-up step before it) still replays right after an eager
    step with new grads (``set_to_none=True``) rebuilt the optimizer's tables, ``empty_cache`` and new
    allocations filled with garbage: fastres keeps the tables a graph reads for good
    (multi_tensor._captured_tables). Three replays equal an eagerly stepped copy bitwise."""
    shapes = shapes_of(cfg, "resnet20")
    graphed = leaf_params(shapes, FP32, cfg.device, seed=6)
    eager = [p.detach().clone().requires_grad_() for p in graphed]
    opt_g = fastres.optim.SGD(graphed, **TABLES_KEPT_OPTIONS)
    opt_e = fastres.optim.SGD(eager, **TABLES_KEPT_OPTIONS)
    static = [torch.empty_like(p) for p in graphed]  # the grads the graph reads
    gen = torch.Generator(cfg.device).manual_seed(7)
    first = device_grads(shapes, gen, cfg.device)

    def step_on_static():  # on the CPU it stands in for the replay: the grads must be the static ones again
        for p, g in zip(graphed, static):
            p.grad = g
        opt_g.step()

    def load(_):
        torch._foreach_copy_(static, first)

    replay = capture(step_on_static, cfg, warmup=1, before=load)

    def eager_step(grads):
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        opt_e.step()

    eager_step(first)
    fresh = device_grads(shapes, gen, cfg.device)
    opt_g.zero_grad(set_to_none=True)
    for p, g in zip(graphed, fresh):
        p.grad = g.clone()  # new tensors: the eager step rebuilds the tables
    opt_g.step()
    eager_step(fresh)
    del fresh, first
    junk = junk_allocations(cfg)
    replays = 3
    for _ in range(replays):
        grads = device_grads(shapes, gen, cfg.device)
        torch._foreach_copy_(static, grads)
        replay()
        eager_step(grads)
    synchronize(cfg)
    del junk
    for i, (p, q) in enumerate(zip(graphed, eager)):
        for key, a, b in (("param", p, q), ("momentum_buffer", opt_g.state[p]["momentum_buffer"],
                                              opt_e.state[q]["momentum_buffer"])):
            if not torch.equal(a, b):
                raise AssertionError(f"param {i} {tuple(p.shape)} {key}: the replays after the eager rebuild "
                                     "differ from the eager steps")
    return {"replays": replays, "tensors": len(shapes), "graph": cfg.device == "cuda"}


FIRST_STEP_ADAM = dict(lr=1e-3, weight_decay=1e-2)


def first_step_no_sync(cfg: Config, loaded: bool) -> dict:
    """The first ``step()`` of a fresh fastres Adam, or of one that loaded a torch.optim.Adam's CPU
    state_dict (its 'step' a CPU tensor), runs under ``set_sync_debug_mode("error")``: no host
    synchronisation (state and step tensors are made on the device by fills). Then it equals torch's step."""
    shapes = shapes_of(cfg, "resnet20")
    params = leaf_params(shapes, FP32, cfg.device, seed=8)
    ref = [p.detach().cpu().clone().requires_grad_() for p in params]
    ref_opt = torch.optim.Adam(ref, **FIRST_STEP_ADAM)
    gen = torch.Generator(cfg.device).manual_seed(9)
    if loaded:  # one step of torch.optim on the CPU, its state loaded into fastres
        for q, g in zip(ref, device_grads(shapes, gen, cfg.device)):
            q.grad = g.cpu()
        ref_opt.step()
        with torch.no_grad():
            for p, q in zip(params, ref):
                p.copy_(q)
    opt = fastres.optim.Adam(params, **FIRST_STEP_ADAM)
    if loaded:  # a copy, as from a file: torch's load_state_dict keeps a CPU 'step' tensor as it is (shared)
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for p, q, g in zip(params, ref, device_grads(shapes, gen, cfg.device)):
        p.grad, q.grad = g, g.cpu()
    try:
        with no_host_sync(cfg):
            opt.step()
    except RuntimeError as exc:
        if "synchroniz" in str(exc).lower():
            raise AssertionError(f"the first step synchronised with the host: {short(exc)}") from exc
        raise
    ref_opt.step()
    steps = 2 if loaded else 1
    counts = torch.stack([opt.state[p]["step"].float() for p in params]).cpu()
    if not bool((counts == steps).all()):
        raise AssertionError(f"state['step'] after the step: {counts.tolist()[:4]}..., expected {steps}")
    tol = optim_cases.tolerance(FP32, "master")
    for key in ("param", "exp_avg", "exp_avg_sq"):
        a = flat([p if key == "param" else opt.state[p][key] for p in params])
        b = flat([q if key == "param" else ref_opt.state[q][key] for q in ref]).to(a.device)
        bad = mismatch(a, b, tol, None, f"{key} (all {len(params)} tensors, flattened)")
        if bad:
            raise AssertionError(bad + " (vs torch.optim.Adam on the CPU)")
    if cfg.device != "cuda":
        raise Skip("set_sync_debug_mode needs CUDA: no host synchronisation to check on a CPU (the step ran "
                   "and equals torch.optim.Adam's)")
    return {"loaded_from": "torch.optim.Adam CPU state_dict" if loaded else None, "steps": steps,
            "sync_checked": True}


def optim_checks(cfg: Config) -> list:
    """The step counter, CUDA graphs, issue 18's CUDA-only checks, the counter stress and the >2^31 tensor
    first (one each), then parity on every set and dtype."""
    numel, steps = cfg.counter
    items = [Item("optim step counter Adam", "check", functools.partial(step_counter, cfg),
                  functools.partial(warm_optim, cfg, "Adam", {"lr": 1e-4}, [(numel,), (3,), ()], FP32),
                  cfg.scaled(f"{steps} steps, {-(-numel // CHUNK)} programs per tensor"))]
    for name in ("SGD", "Adam", "RMSprop", "Adadelta")[:1 if cfg.dry else 4]:
        opts = {"momentum": 0.9} if name == "SGD" else {"capturable": True}
        items.append(Item(f"optim CUDA graph {name}", "check", functools.partial(graph_step, cfg, name),
                          functools.partial(warm_optim, cfg, name, dict(opts, lr=1e-2), shapes_of(cfg, "resnet20"),
                                            FP32, lr_tensor=True),
                          cfg.scaled("no CUDA graph on a CPU: the eager step stands in for the replay")))
    # Issue 18's CUDA-only fixes (short): tables a graph reads outlive an eager rebuild; no host sync in a
    # first step; a capture that would rebuild tables is refused cleanly (the last of these: a capture that
    # ends any other way sends the items after it to a fresh process).
    shapes = shapes_of(cfg, "resnet20")
    items.append(Item("optim CUDA graph tables kept after an eager rebuild SGD", "check",
                      functools.partial(tables_kept, cfg),
                      functools.partial(warm_optim, cfg, "SGD", TABLES_KEPT_OPTIONS, shapes, FP32),
                      cfg.scaled("no CUDA graph on a CPU: the eager step on the captured grads stands in for "
                                 "the replay; the rebuild, empty_cache and garbage allocations run")))
    for loaded, label in ((False, "fresh"), (True, "loaded from torch CPU state")):
        items.append(Item(f"optim first step without host sync Adam {label}", "check",
                          functools.partial(first_step_no_sync, cfg, loaded),
                          None if loaded else functools.partial(warm_optim, cfg, "Adam", FIRST_STEP_ADAM, shapes, FP32),
                          cfg.scaled("no host sync to check on a CPU: the step and its comparison with "
                                     "torch.optim.Adam run, then the check skips"),
                          group="optim first step without host sync Adam", label=label))
    model, batch, _, warmup, _ = cfg.graph_models
    items.append(Item("optim capture refused after zero_grad(set_to_none=True)", "check",
                      functools.partial(capture_refused, cfg), functools.partial(warm_graph_model, cfg),
                      cfg.scaled(f"model {model}, batch {batch}, {warmup} warm-up step; no CUDA graph on a CPU: "
                                 "fastres's launchers are told a capture is on (launchers.core.capturing), so "
                                 "its refusal and the eager step after it run (no twin to compare with: the "
                                 "pretended capture's forward ran)")))
    singles, multi, stress_steps = cfg.counter_stress
    for name in COUNTER_STRESS_OPTIONS:
        items.append(Item(f"optim step counter stress {name}", "check", functools.partial(counter_stress, cfg, name),
                          functools.partial(warm_optim, cfg, name, COUNTER_STRESS_OPTIONS[name],
                                            counter_stress_shapes(cfg), FP32),
                          cfg.scaled(f"{stress_steps} steps, {singles} single-chunk and {len(multi)} multi-chunk "
                                     "tensors"),
                          group="optim step counter stress", label=name))
    items.append(Item("optim >2^31 elements SGD", "check", functools.partial(big_tensor, cfg),
                      functools.partial(warm_optim, cfg, "SGD", {"lr": 0.5}, [(cfg.big_numel,)], FP32),
                      cfg.scaled(f"{cfg.big_numel} elements, not 2^31 + 4099")))
    names = optim_cases.OPTIMIZERS
    combos = [(n, s, d) for d in (FP32, BF16) for s in cfg.optim_sets for n in names]
    if cfg.dry:  # every optimizer once in fp32 and the bf16 rounding path once, on one tiny set
        combos = [(n, "resnet20", FP32) for n in names] + [("Adam", "resnet20", BF16)]
    for i, (name, set_name, dtype) in enumerate(combos):
        dt = "fp32" if dtype == FP32 else "bf16"
        items.append(Item(
            f"optim {name} {set_name} {dt}", "check",
            functools.partial(optim_parity, cfg, name, set_name, dtype, inject=cfg.inject_failure and i == 0),
            functools.partial(warm_optim, cfg, name, optim_cases.FULL_STATE_OPTIONS[name], shapes_of(cfg, set_name), dtype),
            cfg.scaled(f"{set_name} -> {cfg.optim_sets[set_name]} params, {cfg.optim_steps(set_name)} steps"),
            group=f"optim {set_name} {dt}", label=name))
    return items


# --------------------------------------------------------------------------- stage 3: block and model checks

BLOCK_MODES = {"fp32-tf32": (FP32, True), "fp32-ieee": (FP32, False), "bf16": (BF16, True)}


@contextlib.contextmanager
def fp32_atol(value: float) -> Iterator[None]:
    """test_conv_block's fp32 ATOL for one check (4e-3 with TF32 on a GPU, 2e-5 in IEEE fp32)."""
    import test_conv_block

    old = test_conv_block.ATOL[FP32]
    test_conv_block.ATOL[FP32] = value
    try:
        yield
    finally:
        test_conv_block.ATOL[FP32] = old


def block_check(cfg: Config, case, mode: str) -> dict:
    """test_conv_block's three-way rule on one block: outputs, every gradient, running statistics, eval output."""
    import test_conv_block

    dtype, use_tf32 = BLOCK_MODES[mode]
    atol = 4e-3 if use_tf32 and cfg.device == "cuda" else 2e-5
    with tf32(use_tf32), fp32_atol(atol), poisoned(cfg):
        block = test_conv_block._make_block(case.cin, case.cout, case.stride, case.downsample, seed=case.cin + case.cout)
        x = torch.randn(case.batch, case.cin, case.hw, case.hw, generator=torch.Generator().manual_seed(1))
        test_conv_block._compare_training(None, block.to(cfg.device), x.to(cfg.device), dtype, steps=cfg.block_steps,
                                          memory_format=torch.channels_last)
    return {"steps": cfg.block_steps, "batch": case.batch, "fp32_atol": atol if dtype == FP32 else None}


def warm_block(cfg: Config, case, dtype: torch.dtype, use_tf32: bool, row: bool) -> None:
    """The fused block's forward, backward and eval forward at ``case``, with the layouts and dtypes the check
    (``row=False``: weights in ``dtype``, contiguous, as test_conv_block makes them) or the ratio row (``row=True``:
    fp32 channels_last weights under bf16 autocast, as test_block.block_step makes them) runs it with."""
    proj = fastres.nn.downsample(case.cin, case.cout, case.stride) if case.downsample else None
    block = fastres.nn.ResidualBlock(case.cin, case.cout, case.stride, proj).to(cfg.device)
    block = block.to(memory_format=torch.channels_last) if row else block.to(dtype)
    autocast = row and dtype == BF16
    with tf32(use_tf32):
        x = torch.randn(case.batch, case.cin, case.hw, case.hw, device=cfg.device, dtype=dtype)
        x = x.to(memory_format=torch.channels_last).requires_grad_()
        with torch.autocast(cfg.device, dtype=BF16, enabled=autocast):
            out = block(x * 1)
        out.backward(torch.randn_like(out))
        block.eval()
        with torch.no_grad(), torch.autocast(cfg.device, dtype=BF16, enabled=autocast):
            block(x)
    synchronize(cfg)


def compiled_model(cfg: Config, model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile(model, fullgraph=True)`` in ``mode`` ("default" or a torch.compile mode)."""
    return torch.compile(model, fullgraph=True, backend=cfg.compile_backend, mode=None if mode == "default" else mode)


def model_check(cfg: Config, model_name: str, compile_mode: Optional[str] = None) -> dict:
    """fastres's model + fastres.optim.SGD against eager + torch.optim.SGD from the same weights, and float64.

    Losses of every step and every parameter and buffer after the last step, by test_conv_block's three-way
    rule (fastres's error against float64 at most twice eager fp32's, plus its fp32 ATOL). With
    ``compile_mode`` the fastres model runs as ``torch.compile(model, fullgraph=True, mode=compile_mode)``
    (its fused ops in the graph; "reduce-overhead": CUDA graphs), issue 11's compiled path.
    """
    import test_conv_block

    batch, hw, steps = cfg.models[model_name]
    torch.manual_seed(0)
    plain = test_train.build_model(model_name, fused=False)
    fused = test_train.build_model(model_name, fused=True)
    fused.load_state_dict(plain.state_dict())
    runs = {}
    for key, model, dtype in (("fused", fused, FP32), ("torch", plain, FP32),
                              ("oracle", copy.deepcopy(plain).double(), torch.float64)):
        model = model.to(cfg.device, memory_format=torch.channels_last).train()
        opt_cls = fastres.optim.SGD if key == "fused" else torch.optim.SGD
        opt = opt_cls(model.parameters(), **test_train.RECIPE)
        module = model  # state_dict keys without the compiled wrapper's prefix
        if key == "fused" and compile_mode is not None:
            model = compiled_model(cfg, model, compile_mode)
        gen = torch.Generator().manual_seed(1)
        losses = []
        with poisoned(cfg) if key == "fused" else contextlib.nullcontext():
            for _ in range(steps):
                x = torch.randn(batch, 3, hw, hw, generator=gen).to(cfg.device, dtype, memory_format=torch.channels_last)
                y = torch.randint(0, 10, (batch,), generator=gen).to(cfg.device)
                loss = F.cross_entropy(model(x), y, label_smoothing=test_train.LABEL_SMOOTHING)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        runs[key] = (torch.stack(losses), module.state_dict())
    atol = 4e-3 if cfg.device == "cuda" else 2e-5  # TF32 on a GPU (the default, for eager and fastres)
    with fp32_atol(atol):
        (lf, sf), (lt, st), (lo, so) = runs["fused"], runs["torch"], runs["oracle"]
        test_conv_block._check("losses", lf, lt, lo, FP32)
        for name, value in so.items():
            if name.endswith("num_batches_tracked"):
                assert sf[name].item() == value.item() == steps, name
            else:
                test_conv_block._check(name, sf[name], st[name], value, FP32)
    return {"batch": batch, "steps": steps, "image_hw": hw, "losses": [float(v) for v in runs["fused"][0]]}


def warm_model(cfg: Config, model_name: str, compile_mode: Optional[str] = None) -> None:
    batch, hw, _ = cfg.models[model_name]
    model = test_train.build_model(model_name, fused=True).to(cfg.device, memory_format=torch.channels_last)
    opt = fastres.optim.SGD(model.parameters(), **test_train.RECIPE)
    if compile_mode is not None:  # fills inductor's on-disk caches for the check
        model = compiled_model(cfg, model, compile_mode)
    x = torch.randn(batch, 3, hw, hw, device=cfg.device).to(memory_format=torch.channels_last)
    F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device=cfg.device)).backward()
    opt.step()
    synchronize(cfg)


def batch_suffix(case) -> str:
    """Names say the batch only where it is not the issue's 512 (the dry run's)."""
    return "" if case.batch == 512 else f" b{case.batch}"


# TF32 operands (issue 18): fastres's fp32 convs with TF32 round their operands to TF32 to nearest, ties
# away from zero (kernels/conv.py, _to_tf32), as cuDNN's cvt.rna.tf32.f32 does; the tensor cores alone
# would truncate them (ignore the low 13 bits), which biases every product toward zero.


def tf32_operands(x: torch.Tensor, rule: str) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32 in its bits: "rna" ``(bits + 0x1000) & 0xFFFFE000`` on the magnitude (to
    nearest, ties away: the sign bit is untouched by the carry for finite values), "trunc" the low 13 bits
    dropped. Infinities and NaN unchanged."""
    bits = x.contiguous().view(torch.int32)
    mask = -0x2000  # 0xFFFFE000 as an int32
    rounded = (bits + 0x1000) & mask if rule == "rna" else bits & mask
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, bits).view(torch.float32).view(x.shape)


def conv_error(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> dict:
    """``out`` against the float64 ``ref``: the largest and mean error in units of 2^-24 sum|x w| (an ulp
    of the fp32 sum of the products' magnitudes), and the signed error along the reference's sign relative
    to its magnitude ("bias": < 0 toward zero, as truncated operands give), and the plain mean error."""
    err = out.double() - ref
    ulps = err.abs() / (magnitude * 2.0**-24).clamp_min(1e-300)
    return {"max_ulps": float(ulps.max()), "mean_ulps": float(ulps.mean()),
            "bias": float((err * ref.sign()).sum() / ref.abs().sum().clamp_min(1e-300)),
            "mean_error": float(err.mean())}


@contextlib.contextmanager
def interpreter_tf32() -> Iterator[None]:
    """On the CPU: fastres's fp32 convs planned as with TF32 (``_to_tf32`` on the operands). The
    interpreter's ``tl.dot`` multiplies fp32 values exactly and sums them in fp32 (numpy), as the tensor
    cores do with the rounded operands, so the check's arithmetic holds there too."""
    real = conv_launchers.dot_precision
    conv_launchers.dot_precision = lambda dtype, device: "tf32" if dtype == FP32 else real(dtype, device)
    try:
        yield
    finally:
        conv_launchers.dot_precision = real


TF32_BIAS_LIMIT = 2.0**-14  # |bias| allowed against the rounded reference; truncation gives ~ -2^-10.5


def tf32_inputs(cfg: Config) -> tuple:
    batch, c, hw = cfg.tf32_conv
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(batch, c, hw, hw, generator=gen).relu()  # a block's input: a ReLU's output
    w = torch.randn(c, c, 3, 3, generator=gen) * math.sqrt(2 / (9 * c))
    return x.to(cfg.device, memory_format=torch.channels_last), w.to(cfg.device)


def tf32_rounding(cfg: Config) -> dict:
    """fastres's fp32 conv forward with TF32 (a ResNet-20 stage-1 conv, 3x3, batch 256) against a float64
    conv of the operands rounded to TF32 as cuDNN rounds them: the error is fp32 accumulation's alone, at
    most 2K ulps of sum|x w| (K = 9 C products per output) and no bias beyond TF32_BIAS_LIMIT. The errors
    against a reference from truncated operands (what the tensor cores alone compute), and cuDNN's own
    against the rounded reference, are reported beside it."""
    x, w = tf32_inputs(cfg)
    cpu = cfg.device != "cuda"
    with tf32(True), interpreter_tf32() if cpu else contextlib.nullcontext():
        precision = conv_launchers.dot_precision(FP32, x.device)
        if precision != "tf32":
            raise AssertionError(f"fastres's fp32 convs run with {precision!r}, not TF32, with cuDNN's TF32 on")
        with poisoned(cfg):
            out, _ = conv_launchers.conv(x, w, 1, 1, dtype=FP32)
        cudnn = None if cpu else F.conv2d(x, w, padding=1)
    synchronize(cfg)
    if not bool(torch.isfinite(out).all()):
        raise AssertionError(f"{int((~torch.isfinite(out)).sum())} of {out.numel()} outputs not finite (unwritten)")
    refs, magnitude = {}, None
    for rule in ("rna", "trunc"):
        xr, wr = tf32_operands(x, rule).double(), tf32_operands(w, rule).double()
        refs[rule] = F.conv2d(xr, wr, padding=1)
        if rule == "rna":
            magnitude = F.conv2d(xr.abs(), wr.abs(), padding=1)
    k = 9 * x.shape[1]
    vs = {rule: conv_error(out, ref, magnitude) for rule, ref in refs.items()}
    record = {"shape": list(x.shape), "k": k, "bound_ulps": 2 * k, "bias_limit": TF32_BIAS_LIMIT,
              "fastres_vs_rna": vs["rna"], "fastres_vs_trunc": vs["trunc"],
              "cudnn_vs_rna": None if cudnn is None else conv_error(cudnn, refs["rna"], magnitude),
              "cudnn_vs_trunc": None if cudnn is None else conv_error(cudnn, refs["trunc"], magnitude)}
    rna = vs["rna"]
    if rna["max_ulps"] > 2 * k or abs(rna["bias"]) > TF32_BIAS_LIMIT:
        raise AssertionError(
            f"against TF32-rounded operands: max {rna['max_ulps']:.0f} ulps of sum|x w| (allowed {2 * k}), bias "
            f"{rna['bias']:.2e} (allowed {TF32_BIAS_LIMIT:.1e}); against truncated ones: max "
            f"{vs['trunc']['max_ulps']:.0f} ulps, bias {vs['trunc']['bias']:.2e}")
    return record


def warm_tf32_conv(cfg: Config) -> None:
    x, w = tf32_inputs(cfg)
    with tf32(True):
        conv_launchers.conv(x, w, 1, 1, dtype=FP32)
    synchronize(cfg)


# torch.compile(fastres model, fullgraph=True) modes checked against eager (issue 11).
COMPILE_CHECK_MODES = ("default", "reduce-overhead")


def block_checks(cfg: Config) -> list:
    combos = [(c, m) for c in cfg.block_cases for m in BLOCK_MODES]
    if cfg.dry:  # the identity block in IEEE fp32, the downsample block in bf16
        combos = [(cfg.block_cases[0], "fp32-ieee"), (cfg.block_cases[1], "bf16")]
    items = [Item(f"model {name} {steps} SGD steps", "check", functools.partial(model_check, cfg, name),
                  functools.partial(warm_model, cfg, name), cfg.scaled(f"batch {batch}, {hw}x{hw}, {steps} step"))
             for name, (batch, hw, steps) in cfg.models.items()]
    # Issue 18: captured conv launches with workspaces of their own graph's; fp32 TF32 operands rounded.
    model, batch, hw, warmup, replays = cfg.graph_models
    items.append(Item(f"model {model} b{batch} two CUDA graphs on two streams + eager", "check",
                      functools.partial(captured_models, cfg), functools.partial(warm_graph_model, cfg),
                      cfg.scaled(f"model {model}, batch {batch}, {hw}x{hw}, {warmup} warm-up step, {replays} "
                                 "replay; no CUDA graphs or streams on a CPU: one 'captured' model (its eager "
                                 "step stands in for the replay) and the eager third")))
    tb, tc, thw = cfg.tf32_conv
    items.append(Item(f"conv fp32 TF32 operands rounded like cuDNN b{tb} {tc}@{thw}x{thw}", "check",
                      functools.partial(tf32_rounding, cfg), functools.partial(warm_tf32_conv, cfg),
                      cfg.scaled(f"batch {tb}, {tc} channels, {thw}x{thw}; no TF32 on a CPU: fastres's conv is "
                                 "planned as with TF32 (its operands rounded by _to_tf32) and the interpreter's "
                                 "exact fp32 dot stands in for the tensor cores")))
    for case, mode in combos:
        dtype, use_tf32 = BLOCK_MODES[mode]
        items.append(Item(f"block {case.net} {case.name}{batch_suffix(case)} {mode}", "check",
                          functools.partial(block_check, cfg, case, mode),
                          functools.partial(warm_block, cfg, case, dtype, use_tf32, row=False),
                          cfg.scaled(f"batch {case.batch}, {cfg.block_steps} step"),
                          group=f"block {case.net} {case.name}{batch_suffix(case)}", label=mode))
    # Last: a compile that overruns the stage's budget must not starve the block checks.
    first = next(iter(cfg.models))  # resnet20 (the dry run's tiny net)
    batch, hw, steps = cfg.models[first]
    for mode in COMPILE_CHECK_MODES if not cfg.dry else ("default",):
        items.append(Item(f"model {first} compiled {mode} {steps} SGD steps", "check",
                          functools.partial(model_check, cfg, first, mode), None,
                          cfg.scaled(f"batch {batch}, {hw}x{hw}, {steps} step, aot_eager"),
                          compiles={mode: functools.partial(warm_model, cfg, first, mode)}))
    return items


# --------------------------------------------------------------------------- stage 4: ratio rows


_VARIANT_SINK: list = []  # the callable recording_variants installed, if any


@contextlib.contextmanager
def recording_variants(sink: Callable[[str, dict], None]) -> Iterator[None]:
    """Inside the block time_variants hands each variant's fields to ``sink(variant, fields)`` as soon as it
    is timed (lease.run_items appends them to OUT), so a row cut by the watchdog keeps its timed variants."""
    _VARIANT_SINK.append(sink)
    try:
        yield
    finally:
        _VARIANT_SINK.remove(sink)


def time_variants(cfg: Config, factories: dict, host: tuple = ()) -> tuple:
    """Median ms of every variant (built by its factory: a zero-argument step), or why it did not run.

    Returns (medians {variant: ms}, errors {variant: reason}, launches {variant: fastres launches per call},
    host {variant: CPU ms per call}) with ``host`` only for the variants named in ``host`` (see host_ms).
    Variants are timed back to back in this process; each is released before the next is built, and handed
    to the recording_variants sink when done. On a dry run the warm-up call's own time stands in for the
    median (interpreted calls take seconds each).
    """
    medians, errors, launches, host_times = {}, {}, {}, {}
    for variant, make in factories.items():
        try:
            fn = make()
            start = time.perf_counter()
            with count_launches() as counted:  # the warm-up call (compiles; launches per call do not change)
                fn()
            launches[variant] = sum(counted.values())
            if cfg.dry:
                medians[variant] = (time.perf_counter() - start) * 1e3
            else:
                medians[variant] = harness.median_ms(fn, cfg.device, cfg.min_runs, warmed=True)
            if variant in host:
                host_times[variant] = host_ms(cfg, fn)
        except SKIPS as exc:
            errors[variant] = f"skipped: {getattr(exc, 'msg', None) or exc}"
        except Exception as exc:  # this variant's failure is part of the row; the others go on
            errors[variant] = short(exc)
            if variant.endswith(TRAIN_GRAPH) and cfg.device == "cuda":  # GraphedStep captures on its 4th call
                capture_failed(variant)
        fn = None
        release_steps()
        fields = {"median_ms": medians.get(variant), "launches": launches.get(variant),
                  "host_ms": host_times.get(variant), "error": errors.get(variant)}
        for sink in _VARIANT_SINK:
            sink(variant, {k: v for k, v in fields.items() if v is not None})
        if cfg.inject_cut_row:
            print(f"--inject-cut-row: hanging after {variant} until the watchdog ends the part", flush=True)
            time.sleep(10**6)
    return medians, errors, launches, host_times


HOST_CALLS = 4  # few enough that their launches (~80 each for a training step) never fill the launch queue


def host_ms(cfg: Config, fn: Callable[[], Any]) -> float:
    """CPU time of this thread per call of ``fn``, the device idle at the start: what the host spends
    (Python, allocation, launches) while the GPU works through the queue, for HOST_CALLS calls."""
    calls = 1 if cfg.dry else HOST_CALLS  # interpreted calls take seconds
    synchronize(cfg)
    start = time.thread_time()
    for _ in range(calls):
        fn()
    elapsed = time.thread_time() - start
    synchronize(cfg)
    return elapsed / calls * 1e3


def release_steps() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ratio(medians: dict, subject: str, baseline, goal: Optional[float] = None, note: str = "") -> dict:
    """``subject``'s time over ``baseline``'s (the fastest of several); < 1: subject faster; goal: ratio <= goal."""
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    present = [b for b in baselines if b in medians]
    out = {"subject": subject, "baseline": " | ".join(baselines), "goal": goal, "note": note}
    if subject not in medians or not present:
        return dict(out, ratio=None, met=None)
    best = min(present, key=medians.get)
    r = medians[subject] / medians[best]
    return dict(out, baseline=best, ratio=r, met=None if goal is None else r <= goal)


def read_ceilings(out_dir: Optional[str]) -> dict:
    """The ceilings stage 1 recorded in OUT/results.jsonl ({} when it recorded none: GB/s rows then lack a fraction)."""
    if out_dir and os.path.exists(os.path.join(out_dir, "results.jsonl")):
        with open(os.path.join(out_dir, "results.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") == "ceiling" and rec.get("status") == "ok":
                    return rec["values"]
    return {}


def optim_row(cfg: Config, ceiling: Callable[[], dict], name: str, set_name: str, dtype: str) -> dict:
    """fastres.optim.<name> step time against torch.optim foreach and fused, GB/s against the copy ceiling."""
    paramset = cfg.optim_sets[set_name]
    params = test_optim.make_params(paramset, cfg.device, test_optim.DTYPES[dtype])
    hyper = test_optim.OPTIMIZERS[name][0]
    factories = {"fastres": lambda: getattr(fastres.optim, name)(params, **hyper).step}
    factories.update({v: test_optim.optimizer_factory(name, v, params, cfg.device)
                      for v in ("torch-foreach", "torch-fused")})
    medians, errors, launches, _ = time_variants(cfg, factories)
    test_optim.make_params.cache_clear()
    bytes_moved = test_optim.numel(paramset) * test_optim.OPTIMIZERS[name][1] * test_optim.DTYPES[dtype].itemsize
    copy_gbps = ceiling().get("copy_gbps")
    fastres_gbps = harness.gbps(bytes_moved, medians.get("fastres"))
    ratios = [ratio(medians, "fastres", "torch-fused"), ratio(medians, "fastres", "torch-foreach")]
    # The goals name the GPU's sets; on a dry run the tiny sets stand in for them (and "1M", the CPU's).
    goal_set = {"resnet20": "resnet20", "100M/1000": test_optim.BANDWIDTH_SET[cfg.device]}.get(set_name, paramset)
    goal = test_optim.optimizer_goal(lambda: copy_gbps, name, dtype, cfg.device, goal_set, bytes_moved)
    goal_text = None
    try:
        g = goal(medians)
    except Exception:  # e.g. no ceiling measured: the row stands without its goal
        g = None
    if g is not None:
        goal_text, value, met = g
        goal_text = f"{goal_text}: {value:.3g}"
        ratios.append({"subject": "fastres", "baseline": "goal", "ratio": value, "goal": goal_text, "met": bool(met)})
    return {"medians_ms": medians, "errors": errors, "launches": launches, "ratios": ratios,
            "bytes_moved": bytes_moved, "gbps": fastres_gbps,
            "fraction_of_copy": fastres_gbps / copy_gbps if fastres_gbps and copy_gbps else None,
            "params": test_optim.numel(paramset), "tensors": len(params)}


def optim_rows(cfg: Config, out_dir: Optional[str] = None) -> list:
    ceiling = functools.lru_cache(maxsize=1)(lambda: read_ceilings(out_dir))
    combos = [(n, s, "fp32") for s in cfg.optim_sets for n in test_optim.OPTIMIZERS] + \
             [("Adam", s, "bf16") for s in cfg.optim_sets]
    if cfg.dry:  # the row with the bandwidth goal
        combos = [("Adam", "100M/1000", "fp32")]
    return [Item(f"optim {n} {s} {d}", "ratio", functools.partial(optim_row, cfg, ceiling, n, s, d),
                 functools.partial(warm_optim, cfg, n, test_optim.OPTIMIZERS[n][0], shapes_of(cfg, s),
                                   test_optim.DTYPES[d]),
                 cfg.scaled(f"{s} -> {cfg.optim_sets[s]} params; interpreter times"))
            for n, s, d in combos]


TRAIN_GRAPH = test_train.CUDA_GRAPH
TRITON_PATH = "fastres, Triton's launch path"
# Timed in this order: the launch-path A/B last, so a short budget cuts it before the graph rows.
TRAIN_VARIANTS = ["fastres", "eager channels_last", "torch.compile", "torch.compile(fastres)",
                  "fastres" + TRAIN_GRAPH, "eager channels_last" + TRAIN_GRAPH, "torch.compile" + TRAIN_GRAPH,
                  TRITON_PATH]
# The converted models' rows (issue 20): against eager and torch.compile only, so that two rows fit where the
# reference ResNet-18's eight variants were.
CONVERTED_VARIANTS = ["fastres", "eager channels_last", "torch.compile"]
TRAIN_GOALS = {"eager channels_last": 1 / 1.5, "torch.compile": 1 / 1.15}  # time ratios (speedups 1.5x, 1.15x)


def train_factory(cfg: Config, variant: str, model: str, batch: int, dtype: str):
    def make():
        if variant.endswith(TRAIN_GRAPH) and cfg.device != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        if variant == "torch.compile(fastres)" and cfg.dry:  # its interpreted kernels would double the row's time
            raise Skip("dry run: the compiled fastres model runs on the GPU only (train_step's torch.compile path "
                       "runs here in the torch.compile row)")
        if variant == TRITON_PATH:  # the A/B of launch()'s kept compiled kernels
            step = test_train.train_step("fastres", model, batch, dtype, cfg.device, cfg.compile_backend)[0]

            def through_triton():
                with triton_launch_path():
                    return step()
            return through_triton
        step, _ = test_train.train_step(variant, model, batch, dtype, cfg.device, cfg.compile_backend)
        return step

    return make


def train_row(cfg: Config, model: str, batch: int) -> dict:
    """A bf16 training step: fastres against eager AMP channels_last and torch.compile, each with and without a
    CUDA-graph-captured step; torch.compile of the fastres model against compiled eager; images/s. The first
    model's row (ResNet-20) also times fastres through Triton's launch path and records host ms per step."""
    first = model in ("resnet20", "tiny")
    if model in test_train.CONVERTED_MODELS:
        variants = CONVERTED_VARIANTS
    else:
        variants = [v for v in TRAIN_VARIANTS if first or v != TRITON_PATH]
    with cudnn_benchmark():
        medians, errors, launches, host = time_variants(
            cfg, {v: train_factory(cfg, v, model, batch, "bf16") for v in variants},
            host=("fastres", TRITON_PATH, "eager channels_last") if first else ())
    test_train.image_pool.cache_clear()
    goals = TRAIN_GOALS if first else {}
    ratios = [ratio(medians, "fastres", b, goals.get(b)) for b in ("eager channels_last", "torch.compile")]
    if variants is not CONVERTED_VARIANTS:
        ratios += [ratio(medians, "fastres" + TRAIN_GRAPH, b + TRAIN_GRAPH, goals.get(b))
                   for b in ("eager channels_last", "torch.compile")]
        ratios.append(ratio(medians, "torch.compile(fastres)", "torch.compile",
                            note="fastres's fused ops are opaque operators in the graph; inductor compiles what is "
                                 "around them"))
    if first:
        ratios.append(ratio(medians, "fastres", TRITON_PATH,
                            note="launch() calling its kept compiled kernels, against Triton's JIT path for every "
                                 "launch"))
    return {"medians_ms": medians, "errors": errors, "launches": launches, "ratios": ratios, "batch": batch,
            "host_ms": host, "dtype": "bf16 autocast", "images_per_s": {v: batch / (ms * 1e-3) for v, ms in medians.items()},
            "compile_backend": cfg.compile_backend}


def warm_train(cfg: Config, model: str, batch: int, variant: str = "fastres") -> None:
    """Two steps of ``variant``'s training step: fastres's kernels, or a torch.compile variant's graphs."""
    with cudnn_benchmark():
        step, _ = test_train.train_step(variant, model, batch, "bf16", cfg.device, cfg.compile_backend)
        step()
        step()
    synchronize(cfg)


PROFILE_STEPS = 5
PROFILE_TOP = 25  # kernels kept in the record, longest first


def profile_row(cfg: Config, model: str, batch: int) -> dict:
    """Where a fastres bf16 training step's time goes, by torch.profiler: GPU time per kernel name (per step,
    longest first, with launches per step) and the step's GPU total. A ratio row says how fast the step is;
    this says which launch to work on (e.g. a persistent kernel's or a finalize's tail). On a dry run the
    same code profiles CPU ops instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = cfg.device == "cuda"
    with cudnn_benchmark():
        step, _ = test_train.train_step("fastres", model, batch, "bf16", cfg.device, cfg.compile_backend)
        for _ in range(1 if cfg.dry else 3):  # compiles, the optimizer's first step, cudnn.benchmark's search
            step()
        synchronize(cfg)
        steps = PROFILE_STEPS if on_gpu else 1
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
            synchronize(cfg)
    test_train.image_pool.cache_clear()
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU
    events = sorted((e for e in prof.key_averages() if e.device_type == kind),
                    key=lambda e: -(e.device_time_total if on_gpu else e.self_cpu_time_total))
    # One dict per kernel name, longest first: room for more figures per kernel (a modeled time beside
    # the measured one) without changing the record's shape.
    kernels = {e.key: {"ms": (e.device_time_total if on_gpu else e.self_cpu_time_total) / 1e3 / steps,
                       "launches": e.count / steps} for e in events}
    try:  # the model's prediction beside each measured kernel (issue 18): never the row's undoing
        modeled = join_modeled(kernels, load_modeled(), "bf16")
    except Exception as exc:  # noqa: BLE001
        modeled = {"status": "error", "file": str(modeled_path()), "detail": short(exc)}
    return {"medians_ms": {"fastres": sum(k["ms"] for k in kernels.values())}, "errors": {}, "ratios": [],
            "batch": batch, "dtype": "bf16 autocast",
            "time": "GPU kernel time per step" if on_gpu else "CPU self time per step (dry run)",
            "kernels_per_step": sum(k["launches"] for k in kernels.values()),
            "kernels": dict(list(kernels.items())[:PROFILE_TOP]), "modeled": modeled}


# The modeled GPU time of each launch of a ResNet-20 step at batch 512 (fastres/testing/gpu_model.py), written
# by `python -m fastres.testing.traffic --dtypes bf16 --time --json PATH` (Triton's interpreter, 1-2
# CPU-minutes: the lease reads the committed file). FASTRES_LEASE_MODELED names another file (tests).
MODELED_JSON = Path(__file__).resolve().with_name("modeled_resnet20_b512.json")
MODELED_ENV = "FASTRES_LEASE_MODELED"


def modeled_path() -> Path:
    return Path(os.environ.get(MODELED_ENV) or MODELED_JSON)


def load_modeled() -> Optional[dict]:
    """The modeled-time file's contents, or None when there is none."""
    path = modeled_path()
    if not path.is_file():
        return None
    return {"path": str(path), "data": json.loads(path.read_text())}


def profiled_name(name: str) -> str:
    """A profiler event's name as the model names it: kernels by their function name (Triton's), aten ops
    without the ``aten::`` prefix (the dry run profiles CPU ops)."""
    return name.removeprefix("aten::")


def join_modeled(kernels: dict, modeled: Optional[dict], dtype: str) -> dict:
    """Put the model's time beside the profiler's: each kernel of ``kernels`` ({name: {"ms", "launches"}},
    per step) whose name the model also has gets ``modeled_ms``, ``modeled_calls`` and
    ``measured_over_modeled`` (> 1: slower than modeled); returns the record's ``modeled`` field: the file,
    the step totals (every measured kernel against every modeled launch and op), the totals over the
    names both have, and the largest modeled names the profiler did not see."""
    if modeled is None:
        return {"status": "missing", "file": str(modeled_path()),
                "detail": f"no {modeled_path().name}: `python -m fastres.testing.traffic --dtypes {dtype} --time "
                          "--json PATH` writes it"}
    data = modeled["data"].get(dtype)
    if not data or not isinstance(data.get("fastres"), dict):
        return {"status": "error", "file": modeled["path"], "detail": f"no {dtype!r} fastres entry in the file"}
    model = data["fastres"]
    seen = set()
    matched_ms = matched_model_ms = 0.0
    for name, k in kernels.items():
        row = model.get(profiled_name(name))
        if row is None:
            continue
        seen.add(profiled_name(name))
        k["modeled_ms"] = row["us"] / 1e3
        k["modeled_calls"] = row.get("calls")
        k["measured_over_modeled"] = k["ms"] / k["modeled_ms"] if k["modeled_ms"] else None
        matched_ms += k["ms"]
        matched_model_ms += k["modeled_ms"]
    measured = sum(k["ms"] for k in kernels.values())
    modeled_ms = sum(row["us"] for row in model.values()) / 1e3
    unseen = sorted(((n, r["us"] / 1e3) for n, r in model.items() if n not in seen), key=lambda t: -t[1])
    return {"status": "ok", "file": modeled["path"], "dtype": dtype, "batch": data.get("batch"),
            "size": data.get("size"), "summary": data.get("summary"), "matched": len(seen), "modeled_names": len(model),
            "total": {"measured_ms": measured, "modeled_ms": modeled_ms,
                      "measured_over_modeled": measured / modeled_ms if modeled_ms else None,
                      "measured_launches": sum(k["launches"] for k in kernels.values()),
                      "modeled_calls": sum(row.get("calls", 0) for row in model.values())},
            "matched_total": {"measured_ms": matched_ms, "modeled_ms": matched_model_ms,
                              "measured_over_modeled": matched_ms / matched_model_ms if matched_model_ms else None},
            "not_measured": dict(unseen[:5])}


def train_rows(cfg: Config) -> list:
    def compiled(m: str) -> tuple:
        return ("torch.compile",) if m in test_train.CONVERTED_MODELS else ("torch.compile", "torch.compile(fastres)")

    return [Item(f"train {m}{' (convert)' if m in test_train.CONVERTED_MODELS else ''} b{b} bf16", "ratio",
                 functools.partial(train_row, cfg, m, b), functools.partial(warm_train, cfg, m, b),
                 cfg.scaled(f"model {m}, batch {b}, torch.compile backend {cfg.compile_backend}"),
                 compiles={v: functools.partial(warm_train, cfg, m, b, v) for v in compiled(m)})
            for m, b in cfg.train_models.items()]


def profile_rows(cfg: Config) -> list:
    """The profiler's table of one ResNet-20 step: last in stage 4, so its profiling skews no timed row."""
    model, batch = next(iter(cfg.train_models.items()))
    return [Item(f"profile {model} b{batch} bf16", "ratio", functools.partial(profile_row, cfg, model, batch),
                 None, cfg.scaled(f"model {model}, batch {batch}, CPU ops, 1 warm-up step; the modeled GPU times "
                                  "joined by name (aten ops match, the interpreted kernels do not show)"))]


SEPARATE_GRADS = "fastres separate grads"
BLOCK_ROW_VARIANTS = ["fastres", SEPARATE_GRADS, "eager channels_last", "eager", "torch.compile"]


def block_row_variants(case) -> list:
    """A block row's variants: the separate-gradients A/B only where the fused kernel takes a conv (at most
    64 output channels; wider blocks run the separate launches anyway)."""
    return [v for v in BLOCK_ROW_VARIANTS if v != SEPARATE_GRADS or case.cout <= conv_launchers.GRADS_MAX_K]


def separate_grads_step(case, dtype: str, device: str) -> Callable[[], Any]:
    """fastres's block step with every conv's data and weight gradients in separate launches: the A/B of
    the fused gradient kernel (``_conv_grads_kernel``), designed by counting bytes, never timed before."""
    step = test_block.block_step("fastres", case, dtype, device)[0]

    def run():
        with conv_launchers.separate_grads():
            return step()
    return run


def block_row(cfg: Config, ceiling: Callable[[], dict], case, dtype: str, variants: list) -> dict:
    """One block's forward + backward: fastres against eager (cudnn.benchmark; both layouts) and torch.compile,
    with GB/s (the fused design's traffic, test_block's count) and saved-activation bytes against eager."""
    group = f"lease/block/{case.name}/{dtype}"
    compiled = test_block.block_factories(group, case, dtype, cfg.device)  # compiled once per group
    factories = {v: compiled[v] if v in test_block.COMPILED else
                 functools.partial(separate_grads_step, case, dtype, cfg.device) if v == SEPARATE_GRADS else
                 functools.partial(lambda v: test_block.block_step(v, case, dtype, cfg.device)[0], v) for v in variants}
    try:
        with cudnn_benchmark():
            medians, errors, launches, _ = time_variants(cfg, factories)
        saved = test_block.saved_memory(case, dtype, cfg.device) if "fastres" in variants else {}
    finally:
        test_block.block_inputs.cache_clear()
        test_block.saved_memory.cache_clear()
        resnet_bench.release_compiled()
    lim = test_block.LIMITS
    ratios = [ratio(medians, "fastres", test_block.EAGER, lim["eager"]),
              ratio(medians, "fastres", [v for v in test_block.COMPILED if v in variants], lim["torch.compile"]),
              ratio(medians, "fastres", SEPARATE_GRADS, note="fused data and weight gradients against separate "
                                                              "launches (<1: the fused kernel is faster)")]
    saved_ratio = None
    if saved:
        saved_ratio = saved["fastres"]["saved_activation_bytes"] / saved["eager"]["saved_activation_bytes"]
        ratios.append({"subject": "fastres", "baseline": "eager saved activations", "ratio": saved_ratio,
                       "goal": lim["saved"], "met": saved_ratio <= lim["saved"]})
    elem = test_block.DTYPES[dtype].itemsize
    ms = medians.get("fastres")
    gbps = harness.gbps(test_block.fused_elements(case) * elem, ms)
    tflops = test_block.conv_flops(case) / (ms * 1e-3) / 1e12 if ms else None
    c = ceiling()
    return {"medians_ms": medians, "errors": errors, "launches": launches, "ratios": ratios, "saved": saved,
            "saved_activation_ratio": saved_ratio, "batch": case.batch, "gbps": gbps, "tflops": tflops,
            "fraction_of_copy": gbps / c["copy_gbps"] if gbps and c.get("copy_gbps") else None,
            "fraction_of_bf16_matmul": tflops / c["matmul_bf16_tflops"] if tflops and c.get("matmul_bf16_tflops") else None}


def warm_block_row(cfg: Config, case, dtype: str) -> None:
    warm_block(cfg, case, test_block.DTYPES[dtype], True, row=True)
    if SEPARATE_GRADS in block_row_variants(case):
        with conv_launchers.separate_grads():  # the A/B variant's separate gradient launches
            warm_block(cfg, case, test_block.DTYPES[dtype], True, row=True)


def warm_block_compile(cfg: Config, case, dtype: str) -> None:
    """The row's torch.compile (inductor) step, compiled and run: stage 4 then finds it in the on-disk cache."""
    group = f"lease/block/{case.name}/{dtype}"
    with cudnn_benchmark():
        test_block.block_factories(group, case, dtype, cfg.device)["torch.compile"]()
    resnet_bench.release_compiled()
    test_block.block_inputs.cache_clear()


# 4c's budget holds about this many bf16 rows (five variants each, ~6 s with the compiled graph cached):
# stage 2 compiles only their graphs, as more would only take cores from the compiles stages 3b and 4b need.
BLOCK_ROWS_COMPILED = 6


def block_rows(cfg: Config, out_dir: Optional[str] = None) -> list:
    """Every stage shape in bf16 (the training dtype) with torch.compile, then in fp32 against eager and the
    separate-gradients A/B only: those rows run on time a part before left over, too late for a compile."""
    ceiling = functools.lru_cache(maxsize=1)(lambda: read_ceilings(out_dir))
    cases = cfg.block_cases[:1] if cfg.dry else cfg.block_cases
    items = []
    for i, c in enumerate(cases):
        compiles = {"torch.compile": functools.partial(warm_block_compile, cfg, c, "bf16")}
        items.append(Item(f"block {c.net} {c.name}{batch_suffix(c)} bf16", "ratio",
                          functools.partial(block_row, cfg, ceiling, c, "bf16", block_row_variants(c)),
                          functools.partial(warm_block_row, cfg, c, "bf16"),
                          cfg.scaled(f"batch {c.batch}; torch.compile skipped on the CPU"),
                          compiles=compiles if cfg.device == "cuda" and i < BLOCK_ROWS_COMPILED else {}))
    if not cfg.dry:
        items += [Item(f"block {c.net} {c.name}{batch_suffix(c)} fp32", "ratio",
                       functools.partial(block_row, cfg, ceiling, c, "fp32",
                                         [v for v in block_row_variants(c) if v not in test_block.COMPILED]),
                       functools.partial(warm_block_row, cfg, c, "fp32"))
                  for c in cases]
    return items
