"""Shared helpers for the ``fastres.optim`` tests: parameter builders and a parity runner.

``torch.optim`` is the specification. The runner builds identical parameter
lists for a fastres optimizer and for one or more ``torch.optim`` references,
feeds every one the same fresh random gradients each step, steps them and
compares every parameter and every state tensor after every step.

Reference kinds (``run_parity(..., references=...)``):

* ``"master"``: torch.optim on fp32 copies of the parameters (gradients are
  upcast exactly). After each torch step its parameters and state tensors
  (all but ``step``) are rounded to each parameter's own dtype and back, so the
  reference models exactly what fastres promises: fp32 math, parameters and
  state stored in the parameter's dtype. For fp32 parameters this is the plain
  comparison with torch.optim.
* ``"direct"``: torch.optim run on the parameters in their own dtype. For fp16 /
  bf16 torch does every op in the low dtype (each op rounds), so this is only a
  loose sanity comparison.

Sanity mode (``FASTRES_OPTIM_SANITY=1``): the "fastres" side is replaced by
torch.optim itself, with ``fused=True`` where torch has a fused CPU/CUDA
implementation that agrees with its for-loop path (Adam, AdamW, Adagrad: fp32
math, like fastres) and ``foreach=True`` otherwise. It checks that the harness and the tolerances work
without fastres; tests that need fastres itself are skipped (``fastres_only``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as tests/conftest.py

SANITY = os.environ.get("FASTRES_OPTIM_SANITY", "") == "1"
fastres_only = pytest.mark.skipif(SANITY, reason="FASTRES_OPTIM_SANITY=1: needs fastres.optim itself")

OPTIMIZERS = ("SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta")
TORCH_FUSED = frozenset({"SGD", "Adam", "AdamW", "Adagrad"})  # torch has fused CPU+CUDA kernels
CAPTURABLE = frozenset({"RMSprop", "Adam", "AdamW", "Adadelta"})
LOW_DTYPES = (torch.float16, torch.bfloat16)

# Options that make every optimizer create every state tensor it can have.
FULL_STATE_OPTIONS: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "AdamW": dict(lr=1e-2, amsgrad=True),
    "Adagrad": dict(lr=0.1, initial_accumulator_value=0.1, lr_decay=0.01),
    "Adadelta": dict(lr=1.0, weight_decay=1e-2),
}

# ---------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------
# An element passes when |fastres - torch| <= atol + rtol*|torch| + hist*H, with
# H the largest |value| that element of the torch tensor has held so far in the
# run (``history``; H >= |torch|). The hist term: a rounding difference made
# while a value was large persists as an absolute error after the value
# cancels toward zero (momentum buffers and exp_avg swing through zero; a
# 0-d RMSprop buffer going 12 -> -0.17 keeps ~1e-6 of fp32 error from the 12).
# fp32: fastres and torch both compute in fp32 but in a different order of ops
#   (fused expressions, precomputed step sizes): a few ulps (2^-23 ~ 1.2e-7)
#   per op, accumulated over ~10 steps: rtol 2e-6 ("about 1e-6 relative"),
#   hist 1e-6 (~8 ulps of the element's largest magnitude), atol 1e-6.
# fp16/bf16 vs the "master" reference: both sides do fp32 math on the same
#   low-dtype inputs and round once per stored value, so they differ only where
#   a tiny fp32 difference flips a rounding: 1 ulp, 2 allowed (rtol = hist =
#   2 eps of the dtype: bf16 2*2^-7, fp16 2*2^-10). atol 1e-5 covers results
#   near zero, where the fp32 error of the O(1) operands exceeds an ulp of the
#   result, and fp16 subnormals (spacing 6e-8).
# fp16/bf16 vs torch run directly in the low dtype: torch rounds after every op
#   (about 5-10 roundings per update), which compounds over the steps and is
#   amplified by cancellation (centered RMSprop's square_avg - grad_avg^2: up to
#   28 fp16 ulps measured after 8 steps): rtol of 32 ulps for fp16 (3%), 16 ulps
#   for bf16 (12.5%), hist and atol 4 ulps. A loose check: it catches wrong
#   formulas only.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def tolerance(dtype: torch.dtype, kind: str) -> dict[str, float]:
    """rtol / atol / hist (see above) for a tensor of ``dtype`` compared with reference ``kind``."""
    if dtype == torch.float32:
        return dict(rtol=2e-6, atol=1e-6, hist=1e-6)
    if dtype == torch.float64:  # torch's float64 implementations against each other: a few ulps per step
        return dict(rtol=1e-12, atol=1e-12, hist=1e-12)
    eps = EPS[dtype]
    loose = dict(rtol=(32 if dtype == torch.float16 else 16) * eps, atol=4 * eps, hist=4 * eps)
    if kind == "master":
        if SANITY:  # torch foreach (SGD/RMSprop/Adadelta) does its math in the low dtype
            return loose
        return dict(rtol=2 * eps, atol=1e-5, hist=2 * eps)
    if kind == "direct":
        return loose
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# Optimizer classes
# ---------------------------------------------------------------------------
def torch_cls(name: str) -> type[torch.optim.Optimizer]:
    return getattr(torch.optim, name)


_SANITY_CLASSES: dict[str, type] = {}


def _sanity_cls(name: str) -> type:
    if name not in _SANITY_CLASSES:
        base = torch_cls(name)

        def __init__(self, params, *args, **kwargs):  # noqa: N807
            kwargs.pop("foreach", None)
            kwargs.pop("fused", None)
            if name in TORCH_FUSED and name != "SGD":  # torch 2.13's fused CPU SGD is off for fp16/bf16
                kwargs["fused"] = True
            else:
                kwargs["foreach"] = True
            base.__init__(self, params, *args, **kwargs)

        _SANITY_CLASSES[name] = type(f"Sanity{name}", (base,), {"__init__": __init__})
    return _SANITY_CLASSES[name]


def fastres_cls(name: str) -> type[torch.optim.Optimizer]:
    if SANITY:
        return _sanity_cls(name)
    import fastres.optim

    return getattr(fastres.optim, name)


def clip_grad_norm_impl() -> Callable[..., torch.Tensor]:
    if SANITY:
        return torch.nn.utils.clip_grad_norm_
    import fastres.optim

    return fastres.optim.clip_grad_norm_


@contextlib.contextmanager
def count_launches_or_none() -> Iterator[Any]:
    """fastres.testing.count_launches(), or None in sanity mode (torch launches no Triton)."""
    if SANITY:
        yield None
        return
    from fastres.testing import count_launches

    with count_launches() as launches:
        yield launches


CPU = torch.device("cpu")


@contextlib.contextmanager
def torch_path_on_cpu() -> Iterator[None]:
    """CPU tensors take fastres' torch path (torch.optim's implementations), as in a process without
    TRITON_INTERPRET, while the tests' kernels stay interpreted.

    :func:`fastres.backend_for` reads ``fastres._backend.INTERPRET`` on every call (the kernels were
    decorated at import and are not affected); an optimizer picks its path when it plans its first
    step. On a GPU machine INTERPRET is already off and this changes nothing.
    """
    import fastres
    import fastres._backend as backend

    saved = backend.INTERPRET
    backend.INTERPRET = False
    try:
        assert fastres.backend_for(torch.zeros(1)).name == "torch"
        yield
    finally:
        backend.INTERPRET = saved


@contextlib.contextmanager
def torch_capturable_on_cpu() -> Iterator[None]:
    """Let torch.optim run ``capturable=True`` on CPU tensors (it refuses by default).

    torch only checks the device (capturable is meant for CUDA graphs); the
    capturable math itself runs fine on CPU, so this gives a same-settings torch
    reference for fastres's capturable mode on machines without a GPU.
    """
    names = ("torch.optim.adam", "torch.optim.rmsprop", "torch.optim.adadelta", "torch.optim.optimizer")
    saved = {}
    for mod_name in names:
        mod = sys.modules[mod_name]
        fn = mod._get_capturable_supported_devices
        saved[mod_name] = fn
        mod._get_capturable_supported_devices = (
            lambda supports_xla=True, _fn=fn: [*_fn(supports_xla), "cpu"]
        )
    try:
        yield
    finally:
        for mod_name, fn in saved.items():
            sys.modules[mod_name]._get_capturable_supported_devices = fn


# ---------------------------------------------------------------------------
# Parameter specs and builders
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class P:
    """One parameter: its shape, whether it gets a gradient, its dtype (None: the case's)."""

    shape: tuple[int, ...]
    grad: bool = True
    dtype: torch.dtype | None = None


@dataclasses.dataclass(frozen=True)
class G:
    """One param group: its parameters and its own hyperparameters (overrides)."""

    params: tuple[P, ...]
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


Spec = Sequence[G]


def group(*params: P, **options: Any) -> G:
    return G(tuple(params), tuple(options.items()))


def small() -> list[G]:
    """Cheap awkward shapes (0-d, 1025 elements, a conv weight) + a grad-less param: 3 programs a step."""
    return [group(P(()), P((1025,)), P((5,), grad=False), P((8, 3, 3, 3)))]


def awkward() -> list[G]:
    """Every awkward size: 0-d, 1, 3, 127, 1025, 5000, 2-D, 4-D; two params without grads."""
    return [
        group(
            P(()),
            P((1,)),
            P((3,)),
            P((7,), grad=False),
            P((127,)),
            P((1025,)),
            P((5000,)),
            P((16, 33)),
            P((2, 2), grad=False),
            P((8, 3, 3, 3)),
        )
    ]


def many_tiny(n: int = 1024) -> list[G]:
    """``n`` tiny tensors (1-4 elements, some 0-d), a few without grads, plus one larger tensor."""
    shapes = [(), (1,), (2,), (3,), (2, 2), (1, 1, 1, 3)]
    params = [P(shapes[i % len(shapes)], grad=(i % 97 != 5)) for i in range(n)]
    params.append(P((1025,)))
    return [group(*params)]


def multi_group(name: str) -> list[G]:
    """Three groups with different hyperparameters for optimizer ``name`` (one group uses defaults)."""
    overrides = {
        "SGD": [dict(lr=0.05, momentum=0.5, weight_decay=1e-2), dict(lr=0.2, nesterov=True, momentum=0.9)],
        "RMSprop": [dict(lr=3e-3, alpha=0.9, centered=True), dict(momentum=0.5, weight_decay=0.1)],
        "Adam": [dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), dict(amsgrad=True, eps=1e-6)],
        "AdamW": [dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), dict(amsgrad=True, eps=1e-6)],
        "Adagrad": [dict(lr=0.05, lr_decay=0.1), dict(eps=1e-3, weight_decay=1e-2)],
        "Adadelta": [dict(lr=0.5, rho=0.5), dict(weight_decay=0.1, eps=1e-4)],
    }[name]
    return [
        group(P((3,)), P((8, 3, 3, 3))),
        group(P(()), P((1025,)), P((4,), grad=False), **overrides[0]),
        group(P((1,)), P((33, 2)), **overrides[1]),
    ]


def mixed_dtypes(*dtypes: torch.dtype) -> list[G]:
    """One group holding parameters of several dtypes (interleaved)."""
    params = []
    for i, shape in enumerate([(3,), (1025,), (), (8, 3, 3, 3), (5,), (2, 7)]):
        params.append(P(shape, dtype=dtypes[i % len(dtypes)]))
    return [group(*params)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def initial_values(spec: Spec, dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
    """fp32-representable initial values (CPU), already rounded to each param's dtype."""
    gen = _gen(1_000_003 * seed + 17)
    out = []
    for g in spec:
        vals = []
        for p in g.params:
            dt = p.dtype or dtype
            vals.append(torch.randn(p.shape, generator=gen).to(dt))
        out.append(vals)
    return out


def random_grad(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Fresh random gradient, magnitudes in [0.05, ~4]: never zero (and no fp16 underflow in g^2)."""
    g = torch.randn(shape, generator=gen)
    g = torch.where(g >= 0, 1.0, -1.0) * g.abs().clamp_min(0.05)
    return g.to(dtype)


def spec_dtypes(spec: Spec, dtype: torch.dtype) -> set[torch.dtype]:
    return {p.dtype or dtype for g in spec for p in g.params}


# ---------------------------------------------------------------------------
# Building optimizers
# ---------------------------------------------------------------------------
def _clone_options(options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone().to(device)
        elif isinstance(v, tuple):
            v = tuple(x.detach().clone().to(device) if isinstance(x, torch.Tensor) else x for x in v)
        out[k] = v
    return out


def make_params(values: list[list[torch.Tensor]], device: torch.device, upcast: bool = False) -> list[list[torch.nn.Parameter]]:
    return [
        [torch.nn.Parameter((v.float() if upcast else v).clone().to(device)) for v in vals] for vals in values
    ]


def param_arg(spec: Spec, params: list[list[torch.nn.Parameter]], device: torch.device) -> Any:
    """A flat list for a single option-less group (the common call), else a list of group dicts."""
    if len(spec) == 1 and not spec[0].options:
        return list(params[0])
    return [dict(params=list(ps), **_clone_options(g.opts, device)) for g, ps in zip(spec, params)]


def flat(params: list[list[torch.nn.Parameter]]) -> list[torch.nn.Parameter]:
    return [p for ps in params for p in ps]


def round_to_storage(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], dtypes: list[torch.dtype]) -> None:
    """Round fp32 params and their state (not ``step``) to each param's storage dtype, in place."""
    with torch.no_grad():
        for p, dt in zip(params, dtypes):
            if dt == torch.float32:
                continue
            p.copy_(p.to(dt))
            for key, value in opt.state.get(p, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.copy_(value.to(dt))


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------
def magnitude(t: torch.Tensor) -> torch.Tensor:
    """|t| in float64 on the CPU with NaN/inf as 0 (for the ``history`` term)."""
    return torch.nan_to_num(t.detach().cpu().double().abs(), nan=0.0, posinf=0.0, neginf=0.0)


def assert_tensor_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    ctx: str,
    *,
    rtol: float,
    atol: float,
    hist: float = 0.0,
    history: torch.Tensor | None = None,
    equal_nan: bool = False,
) -> None:
    """Elementwise |actual - expected| <= atol + rtol*|expected| + hist*max(history, |expected|).

    ``expected`` is first rounded to ``actual``'s dtype. NaNs must match when
    ``equal_nan`` (else any NaN fails), infinities must be equal. The message
    names ``ctx``, the number of bad elements and the worst one.
    """
    a = actual.detach().cpu()
    b = expected.detach().to(a.dtype).cpu()
    assert a.shape == b.shape, f"{ctx}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    nan_a, nan_b = a64.isnan(), b64.isnan()
    bad = (nan_a != nan_b) if equal_nan else (nan_a | nan_b)
    inf = (a64.isinf() | b64.isinf()) & ~(nan_a | nan_b)
    bad |= inf & (a64 != b64)
    finite = ~(nan_a | nan_b | inf)
    mag = b64.abs()
    if history is not None:
        mag = torch.maximum(mag, history.double().reshape(-1))
    allowed = atol + rtol * b64.abs() + hist * mag
    diff = torch.where(finite, (a64 - b64).abs(), torch.zeros_like(a64))
    bad |= finite & (diff > allowed)
    if bool(bad.any()):
        score = torch.where(bad, torch.where(finite, diff / allowed, torch.full_like(a64, math.inf)), -1.0)
        i = int(score.argmax())
        index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        if bool(finite[i]):
            why = (
                f"|diff| {diff[i].item():.3g} > allowed {allowed[i].item():.3g} "
                f"(rtol {rtol:g}, atol {atol:g}, hist {hist:g} x {mag[i].item():.3g})"
            )
        else:
            why = "NaN/inf where the other has " + ("a different value" if equal_nan else "a value (equal_nan=False)")
        raise AssertionError(
            f"{ctx}: {int(bad.sum())} / {a.numel()} elements differ. Worst at index {index}: "
            f"got {a64[i].item()!r}, expected {b64[i].item()!r}: {why}"
        )


def compare_optimizers(
    fr_opt: torch.optim.Optimizer,
    fr_params: Sequence[torch.Tensor],
    ref_opt: torch.optim.Optimizer,
    ref_params: Sequence[torch.Tensor],
    *,
    kind: str,
    where: str,
    equal_nan: bool = False,
    labels: Sequence[str] | None = None,
    history: dict[Any, torch.Tensor] | None = None,
) -> None:
    """Compare every param and every state tensor of ``fr_opt`` with ``ref_opt`` (same order).

    ``history`` (kept by the caller across steps) holds, per element, the
    largest magnitude each compared torch tensor has had so far (see the
    tolerance notes above). Without it (a comparison after several unobserved
    steps) each tensor's current largest magnitude stands in for every element.
    """
    def hist_of(key: Any, expected: torch.Tensor) -> torch.Tensor:
        now = magnitude(expected)
        if history is None:  # no record of past steps: the tensor's largest magnitude stands in
            return torch.full_like(now, float(now.max())) if now.numel() else now
        prev = history.get(key)
        history[key] = now if prev is None or prev.shape != now.shape else torch.maximum(prev, now)
        return history[key]

    assert len(fr_params) == len(ref_params)
    for i, (a, b) in enumerate(zip(fr_params, ref_params)):
        label = labels[i] if labels else f"param {i}"
        ctx = f"[{where}, {label}, shape {tuple(a.shape)}, {a.dtype}, vs torch '{kind}']"
        assert a.dtype == (a.dtype if kind == "master" else b.dtype), f"{ctx} param dtype changed: {a.dtype} vs {b.dtype}"
        tol = tolerance(a.dtype, kind)
        assert_tensor_close(a, b, f"{ctx} param", history=hist_of((kind, i, "param"), b), equal_nan=equal_nan, **tol)
        sa, sb = fr_opt.state.get(a, {}), ref_opt.state.get(b, {})
        assert set(sa) == set(sb), f"{ctx} state keys: fastres {sorted(sa)} vs torch {sorted(sb)}"
        for key in sb:
            va, vb = sa[key], sb[key]
            if vb is None or va is None:
                assert va is None and vb is None, f"{ctx} state[{key!r}]: fastres {va!r} vs torch {vb!r}"
                continue
            assert isinstance(va, torch.Tensor), f"{ctx} state[{key!r}] is a {type(va).__name__}, torch has a Tensor"
            if key == "step":
                assert va.dtype == torch.float32 and va.dim() == 0, (
                    f"{ctx} state['step'] must be a 0-d float32 tensor like torch's, got {va.dtype} shape {tuple(va.shape)}"
                )
                assert float(va) == float(vb), f"{ctx} state['step']: fastres {float(va)} vs torch {float(vb)}"
                continue
            assert va.shape == a.shape, f"{ctx} state[{key!r}] shape {tuple(va.shape)} != param shape"
            assert va.dtype == a.dtype, f"{ctx} state[{key!r}] dtype {va.dtype}, expected the param's {a.dtype}"
            assert va.device == a.device, f"{ctx} state[{key!r}] on {va.device}, param on {a.device}"
            assert_tensor_close(
                va, vb, f"{ctx} state[{key!r}]", history=hist_of((kind, i, key), vb), equal_nan=equal_nan, **tol
            )


def compare_groups(fr_opt: torch.optim.Optimizer, ref_opt: torch.optim.Optimizer, where: str) -> None:
    assert len(fr_opt.param_groups) == len(ref_opt.param_groups), where
    for gi, (ga, gb) in enumerate(zip(fr_opt.param_groups, ref_opt.param_groups)):
        assert float(ga["lr"]) == pytest.approx(float(gb["lr"]), rel=1e-12), f"[{where}] group {gi} lr"


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------
GradHook = Callable[[int, int, int, torch.Tensor], "torch.Tensor | None"]


def step_grads(
    spec: Spec, dtype: torch.dtype, seed: int, step: int, grad_hook: GradHook | None = None
) -> list[list[torch.Tensor | None]]:
    """The gradients of ``step`` (CPU, each param's dtype; None: no grad this step).

    Params with ``grad=False`` never get one; ``grad_hook(step, gi, pi, grad)``
    may replace a gradient or return None to leave that param without one.
    """
    gen = _gen(7919 * seed + step)
    out = []
    for gi, g in enumerate(spec):
        row: list[torch.Tensor | None] = []
        for pi, p in enumerate(g.params):
            grad = random_grad(p.shape, p.dtype or dtype, gen) if p.grad else None
            if grad is not None and grad_hook is not None:
                grad = grad_hook(step, gi, pi, grad)
            row.append(grad)
        out.append(row)
    return out


def set_grads(
    params: list[list[torch.nn.Parameter]], grads: list[list[torch.Tensor | None]], scale: float = 1.0
) -> None:
    """Give each param a fresh copy of its gradient, in the param's dtype and device (times ``scale``)."""
    for ps, gs in zip(params, grads):
        for p, g in zip(ps, gs):
            p.grad = None if g is None else (g.to(p.dtype) * scale).to(p.device)


def buckets_with_grads(params: list[list[torch.nn.Parameter]]) -> int:
    """(param group, device, dtype) buckets holding a param with a grad: the launches a step must make."""
    return len({(gi, p.device, p.dtype) for gi, ps in enumerate(params) for p in ps if p.grad is not None})


@dataclasses.dataclass
class Run:
    """Everything a parity run built, for further checks by the caller."""

    fr_opt: torch.optim.Optimizer
    fr_params: list[list[torch.nn.Parameter]]
    refs: dict[str, tuple[torch.optim.Optimizer, list[list[torch.nn.Parameter]]]]
    launches: list[Any]


def run_parity(
    name: str,
    options: dict[str, Any],
    spec: Spec,
    *,
    dtype: torch.dtype = torch.float32,
    steps: int = 10,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    references: Sequence[str] | None = None,
    device: torch.device = DEVICE,
    seed: int = 0,
    check_launches: bool = True,
    grad_hook: GradHook | None = None,
    equal_nan: bool = False,
    between_steps: Callable[[int, torch.optim.Optimizer, list[list[torch.nn.Parameter]]], None] | None = None,
) -> Run:
    """Step a fastres optimizer and torch.optim reference(s) side by side and compare after each step.

    ``options`` go to both constructors; ``spec`` gives the param groups (with
    per-group overrides); every step every param with ``grad=True`` gets a fresh
    random gradient (the same on all sides), the others keep ``grad=None``.
    ``between_steps(step, opt, params)`` runs on every optimizer after each
    step's comparison (to mutate params/state the same way on all sides).
    """
    if references is None:
        references = ["master"] if spec_dtypes(spec, dtype) == {torch.float32} else ["master", "direct"]
    values = initial_values(spec, dtype, seed)
    labels = [f"group {gi} param {pi}" for gi, g in enumerate(spec) for pi in range(len(g.params))]
    storage = [p.dtype or dtype for g in spec for p in g.params]
    has_grad = [p.grad for g in spec for p in g.params]

    capture = contextlib.nullcontext()
    if options.get("capturable") and torch.device(device).type == "cpu":
        capture = torch_capturable_on_cpu()

    with capture:
        fr_params = make_params(values, device)
        fr_opt = fastres_cls(name)(param_arg(spec, fr_params, device), **_clone_options(options, device))
        refs = {}
        for kind in references:
            ps = make_params(values, device, upcast=(kind == "master"))
            refs[kind] = (torch_cls(name)(param_arg(spec, ps, device), **_clone_options(options, device)), ps)

        scheds = []
        if scheduler is not None:
            scheds = [scheduler(fr_opt)] + [scheduler(o) for o, _ in refs.values()]

        launches_seen = []
        history: dict[Any, torch.Tensor] = {}
        for step in range(1, steps + 1):
            grads = step_grads(spec, dtype, seed, step, grad_hook)
            set_grads(fr_params, grads)
            for _, ps in refs.values():
                set_grads(ps, grads)
            n_expected = buckets_with_grads(fr_params)

            with count_launches_or_none() as launches:
                fr_opt.step()
            if launches is not None:
                launches_seen.append(dict(launches))
                if check_launches:
                    assert sum(launches.values()) == n_expected, (
                        f"step {step}: expected {n_expected} kernel launch(es), one per (param group, dtype) "
                        f"bucket with grads; got {dict(launches)}"
                    )
            for kind, (opt, ps) in refs.items():
                opt.step()
                if kind == "master":
                    round_to_storage(opt, flat(ps), storage)

            fp = flat(fr_params)
            for i, (p, v) in enumerate(zip(fp, [v for vals in values for v in vals])):
                if not has_grad[i]:
                    assert torch.equal(p.detach().cpu(), v), f"step {step}: {labels[i]} has no grad but changed"
                    if name != "Adagrad":  # torch's Adagrad creates state for every param in __init__
                        assert not fr_opt.state.get(p), f"step {step}: {labels[i]} has no grad but got state"
            for kind, (opt, ps) in refs.items():
                compare_optimizers(
                    fr_opt, fp, opt, flat(ps), kind=kind, where=f"step {step}", equal_nan=equal_nan, labels=labels,
                    history=history,
                )
                compare_groups(fr_opt, opt, f"step {step}")
            for sch in scheds:
                sch.step()
            if between_steps is not None:
                between_steps(step, fr_opt, fr_params)
                for opt, ps in refs.values():
                    between_steps(step, opt, ps)
    return Run(fr_opt, fr_params, refs, launches_seen)


def state_snapshot(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Deep copies of params and their state, to check that a step changed nothing."""
    return [(p.detach().clone(), copy.deepcopy(dict(opt.state.get(p, {})))) for p in params]


def assert_unchanged(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], snap, where: str) -> None:
    """Params and their state (every key, ``step`` included) are bitwise what ``snap`` recorded."""
    for i, (p, (v, st)) in enumerate(zip(params, snap)):
        assert torch.equal(p.detach(), v), f"[{where}] param {i} changed"
        now = opt.state.get(p, {})
        assert set(now) == set(st), f"[{where}] param {i} state keys changed: {sorted(st)} -> {sorted(now)}"
        for k, old in st.items():
            new = now[k]
            if isinstance(old, torch.Tensor):
                assert torch.equal(new.cpu(), old.cpu()), f"[{where}] param {i} state[{k!r}] changed: {old} -> {new}"
            else:
                assert new == old, f"[{where}] param {i} state[{k!r}] changed"


def isfinite_all(ts: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)
