"""Numerical parity of ``fastres.optim`` with ``torch.optim`` (the specification).

Every test steps a fastres optimizer next to torch.optim with the same fresh
random gradients and compares all params and all state tensors after every
step (``optim_cases.run_parity``; tolerances and their justification are in
``optim_cases.tolerance``). Every step must also be one kernel launch per
(param group, dtype) bucket.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import optim_cases as oc
from optim_cases import DEVICE

STEPS = 10


def _fmt(k: str, v: Any) -> str:
    if v is True:
        return k
    if isinstance(v, torch.Tensor):
        return f"{k}=T({float(v):g})"
    if isinstance(v, tuple):
        return f"{k}=" + ",".join(f"{x:g}" for x in v)
    return f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"


def _cases(name: str, base: dict[str, Any], axes: dict[str, list[Any]], valid=lambda o: True) -> list[Any]:
    """pytest.params for the cross product of ``axes`` on top of ``base``."""
    out = []
    keys = list(axes)
    for values in itertools.product(*(axes[k] for k in keys)):
        opts = dict(base)
        opts.update({k: v for k, v in zip(keys, values)})
        if valid(opts):
            out.append(pytest.param(name, opts))
    return out


def _capturable_lr(opts: dict[str, Any]) -> dict[str, Any]:
    """capturable=True goes with a 0-d tensor lr (the CUDA-graph use)."""
    if opts.get("capturable"):
        opts = dict(opts, lr=torch.tensor(opts.get("lr", 1e-3)))
    return opts


# weight_decay and maximize are varied together ((0, off), (wd, on)) and once
# apart, to keep the interpreter's runtime down while still exercising their
# order (torch negates the grad before adding weight decay).
def _wd_max(cases_axes: dict[str, list[Any]], wd: float = 1e-2) -> dict[str, list[Any]]:
    return dict(cases_axes, weight_decay__maximize=[(0.0, False), (wd, True)])


def _expand(opts: dict[str, Any]) -> dict[str, Any]:
    if "weight_decay__maximize" in opts:
        opts = dict(opts)
        opts["weight_decay"], opts["maximize"] = opts.pop("weight_decay__maximize")
    return opts


def _cases2(name, base, axes, valid=lambda o: True):
    out = []
    for param in _cases(name, base, axes, valid=lambda o: valid(_expand(o))):
        name_, opts = param.values
        opts = _expand(opts)
        shown = [
            _fmt(k, v)
            for k, v in opts.items()
            if k not in ("lr", "capturable") and (v not in (False, 0, 0.0) or k == "momentum")
        ]
        out.append(pytest.param(name_, opts, id=f"{name_}-" + ("-".join(shown) or "default")))
    return out


SGD_CASES = _cases2(
    "SGD",
    dict(lr=0.1),
    _wd_max(dict(momentum=[0.0, 0.9], dampening=[0.0, 0.1], nesterov=[False, True])),
    valid=lambda o: not o["nesterov"] or (o["momentum"] > 0 and o["dampening"] == 0),
) + _cases2("SGD", dict(lr=0.1, momentum=0.9), dict(weight_decay=[1e-2])) + _cases2(
    "SGD", dict(lr=0.1, momentum=0.9, nesterov=True), dict(maximize=[True])
)
RMSPROP_CASES = _cases2(
    "RMSprop", dict(lr=1e-2), _wd_max(dict(centered=[False, True], momentum=[0.0, 0.9]), wd=0.1)
) + _cases2("RMSprop", dict(lr=1e-2, alpha=0.9), dict(centered=[True], momentum=[0.5], weight_decay=[0.1]))
ADAM_CASES = _cases2(
    "Adam", dict(lr=1e-2), _wd_max(dict(amsgrad=[False, True], decoupled_weight_decay=[False, True]), wd=0.1)
) + _cases2("Adam", dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6), dict(amsgrad=[True], weight_decay=[0.1])) + _cases2(
    "Adam", dict(lr=1e-2), dict(maximize=[True])
)
ADAMW_CASES = _cases2("AdamW", dict(lr=1e-2), dict(amsgrad=[False, True], weight_decay=[1e-2, 0.1], maximize=[True]))
ADAGRAD_CASES = _cases2(
    "Adagrad", dict(lr=0.1), _wd_max(dict(lr_decay=[0.0, 0.1], initial_accumulator_value=[0.0, 0.5]))
)
ADADELTA_CASES = _cases2("Adadelta", dict(lr=1.0), _wd_max(dict(rho=[0.9, 0.5]), wd=0.1)) + _cases2(
    "Adadelta", dict(lr=1.0, eps=1e-4), dict(weight_decay=[0.1])
)
# capturable=True (with a tensor lr): Adam, AdamW, RMSprop, Adadelta. On CPU the torch
# reference runs with the same settings (optim_cases.torch_capturable_on_cpu).
CAPTURABLE_CASES = (
    _cases2("Adam", dict(lr=1e-2, capturable=True), _wd_max(dict(amsgrad=[False, True]), wd=0.1))
    + _cases2("Adam", dict(lr=1e-2, capturable=True, decoupled_weight_decay=True), dict(weight_decay=[0.1]))
    + _cases2("AdamW", dict(lr=1e-2, capturable=True), dict(amsgrad=[False, True]))
    + _cases2("RMSprop", dict(lr=1e-2, capturable=True), _wd_max(dict(centered=[False, True], momentum=[0.9]), wd=0.1))
    + _cases2("Adadelta", dict(lr=1.0, capturable=True), _wd_max(dict(rho=[0.9]), wd=0.1))
)


@pytest.mark.parametrize(
    "name, options", SGD_CASES + RMSPROP_CASES + ADAM_CASES + ADAMW_CASES + ADAGRAD_CASES + ADADELTA_CASES
)
def test_parity_fp32(name, options):
    oc.run_parity(name, options, oc.small(), steps=STEPS)


@pytest.mark.parametrize("name, options", CAPTURABLE_CASES)
def test_parity_capturable_tensor_lr(name, options):
    run = oc.run_parity(name, _capturable_lr(options), oc.small(), steps=STEPS)
    for p in oc.flat(run.fr_params):
        st = run.fr_opt.state.get(p)
        if st:
            assert st["step"].device == p.device, "capturable: state['step'] must live on the param's device"


@pytest.mark.parametrize(
    "name, options",
    [
        pytest.param("SGD", dict(lr=torch.tensor(0.1), momentum=0.9), id="SGD-momentum"),
        pytest.param("SGD", dict(lr=torch.tensor(0.1)), id="SGD-plain"),
        pytest.param("Adam", dict(lr=torch.tensor(1e-2), foreach=False), id="Adam-foreach=False"),
    ],
)
def test_parity_tensor_lr_not_capturable(name, options):
    """torch accepts a tensor lr without capturable for these (for-loop path); so must fastres."""
    oc.run_parity(name, options, oc.small(), steps=4)


LOW_PRECISION_OPTIONS = {
    "SGD": [dict(lr=0.1), dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)],
    "RMSprop": [dict(lr=1e-2), dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=1e-2)],
    "Adam": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, maximize=True)],
    "AdamW": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1)],
    "Adagrad": [dict(lr=0.1), dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5, weight_decay=1e-2)],
    "Adadelta": [dict(lr=1.0), dict(lr=1.0, rho=0.5, weight_decay=0.1, maximize=True)],
}
LOW_PRECISION_CASES = [
    pytest.param(name, opts, dtype, id=f"{name}-{'-'.join(_fmt(k, v) for k, v in opts.items())}-{str(dtype)[6:]}")
    for name, optss in LOW_PRECISION_OPTIONS.items()
    for opts in optss
    for dtype in oc.LOW_DTYPES
]


@pytest.mark.parametrize("name, options, dtype", LOW_PRECISION_CASES)
def test_parity_low_precision(name, options, dtype):
    """fp16/bf16: tight vs torch on fp32 master copies rounded to the dtype; loose vs torch in the dtype."""
    oc.run_parity(name, options, oc.small(), dtype=dtype, steps=STEPS, references=["master", "direct"])


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_parity_awkward_shapes(name):
    """0-d, 1, 3, 127, 1025, 5000 elements, 2-D and 4-D tensors, params without grads."""
    oc.run_parity(name, oc.FULL_STATE_OPTIONS[name], oc.awkward(), steps=4)


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_parity_param_groups(name):
    """Three groups with different hyperparameters: one launch per group, each group its own numbers."""
    oc.run_parity(name, {}, oc.multi_group(name), steps=6)


def test_parity_many_tiny_tensors():
    """1,024 tiny tensors (0-d to 4 elements, some without grads) + one larger in one group: one launch.

    Two steps only (the second with existing state): the interpreter runs one program per tensor (~5 ms each).
    """
    run = oc.run_parity("Adam", dict(lr=1e-2, weight_decay=1e-2), oc.many_tiny(1024), steps=2)
    assert [sum(c.values()) for c in run.launches] == [1] * len(run.launches)


def test_adagrad_initial_accumulator_value_comes_from_the_constructor_like_torch():
    """torch.optim.Adagrad fills every param's ``sum`` in __init__ from the constructor's
    initial_accumulator_value, whatever a param group's own ``initial_accumulator_value`` says."""
    spec = [oc.group(oc.P((3,)), oc.P((5,))), oc.group(oc.P((4,)), oc.P(()), initial_accumulator_value=0.5)]
    oc.run_parity("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1), spec, steps=2)


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _lambda_lr(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))


def _one_cycle(opt):
    # Also cycles momentum (SGD) / betas[0] (Adam) every step.
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1)


SCHEDULER_CASES = [
    pytest.param(name, oc.FULL_STATE_OPTIONS[name], _step_lr, id=f"{name}-StepLR") for name in oc.OPTIMIZERS
] + [
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), _lambda_lr, id="SGD-LambdaLR"),
    pytest.param("Adam", dict(lr=1e-2), _lambda_lr, id="Adam-LambdaLR"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), _one_cycle, id="SGD-OneCycleLR-momentum"),
    pytest.param("Adam", dict(lr=1e-2, amsgrad=True), _one_cycle, id="Adam-OneCycleLR-betas"),
    pytest.param("RMSprop", dict(lr=1e-2, momentum=0.9), _one_cycle, id="RMSprop-OneCycleLR-momentum"),
]


@pytest.mark.parametrize("name, options, scheduler", SCHEDULER_CASES)
def test_parity_lr_scheduler(name, options, scheduler):
    """Hyperparameters changed between steps by a scheduler are picked up at the next step."""
    oc.run_parity(name, options, oc.small(), steps=STEPS, scheduler=scheduler)


FLAG_CASES = [
    pytest.param(name, flags, id=f"{name}-" + "-".join(f"{k}={v}" for k, v in flags.items()))
    for name in oc.OPTIMIZERS
    for flags in ([dict(foreach=True), dict(foreach=False)] + ([dict(fused=True)] if name in oc.TORCH_FUSED else []))
]


@pytest.mark.parametrize("name, flags", FLAG_CASES)
def test_foreach_and_fused_flags_are_accepted(name, flags):
    """foreach / fused are accepted (and ignored by fastres): same numbers as torch with the flag."""
    oc.run_parity(name, dict(oc.FULL_STATE_OPTIONS[name], **flags), oc.small(), steps=3)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_parity_mixed_dtypes_in_one_group(name):
    """fp32 + fp16 + bf16 params in one group: one launch per dtype, each dtype its own tolerance."""
    run = oc.run_parity(
        name, oc.FULL_STATE_OPTIONS[name], oc.mixed_dtypes(torch.float32, torch.float16, torch.bfloat16), steps=4
    )
    assert all(sum(c.values()) == 3 for c in run.launches)


# ---------------------------------------------------------------------------
# clip_grad_norm_
# ---------------------------------------------------------------------------
CLIP_SHAPES = [(), (1,), (3,), (1025,), (8, 3, 3, 3), (127,)]


def _clip_params(dtype, scale, none_at=(2,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b = [], []
    for i, shape in enumerate(CLIP_SHAPES):
        v = torch.randn(shape, generator=gen).to(dtype)
        pa, pb = torch.nn.Parameter(v.clone().to(DEVICE)), torch.nn.Parameter(v.clone().to(DEVICE))
        if i not in none_at:
            g = (oc.random_grad(shape, torch.float32, gen) * scale).to(dtype)
            pa.grad, pb.grad = g.clone().to(DEVICE), g.clone().to(DEVICE)
        a.append(pa)
        b.append(pb)
    return a, b


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0], ids=["L2", "Linf", "L1"])
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clips", "no-clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_grad_norm_parity(norm_type, max_norm, dtype):
    clip = oc.clip_grad_norm_impl()
    a, b = _clip_params(dtype, scale=1.0)
    with oc.count_launches_or_none() as launches:
        total = clip(a, max_norm, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(b, max_norm, norm_type=norm_type)
    tol = oc.tolerance(dtype, "direct")  # bf16: torch computes per-tensor norms in bf16
    assert isinstance(total, torch.Tensor) and total.dim() == 0
    oc.assert_tensor_close(total.float(), expected.float(), "total norm", **tol)
    if dtype == torch.float32:
        assert total.dtype == expected.dtype
    for i, (pa, pb) in enumerate(zip(a, b)):
        if pb.grad is None:
            assert pa.grad is None, f"param {i} had no grad and got one"
            continue
        assert pa.grad.dtype == pb.grad.dtype
        oc.assert_tensor_close(pa.grad, pb.grad, f"grad {i}", **tol)
    if launches is not None and norm_type in (2.0, float("inf")):  # other norms may fall back to torch
        assert 1 <= sum(launches.values()) <= 2, f"clip_grad_norm_: expected 1 or 2 launches, got {dict(launches)}"


def test_clip_grad_norm_single_tensor_and_generator():
    clip = oc.clip_grad_norm_impl()
    a, b = _clip_params(torch.float32, scale=3.0, none_at=())
    total = clip(a[3], 1.0)  # a single tensor, not a list
    expected = torch.nn.utils.clip_grad_norm_(b[3], 1.0)
    torch.testing.assert_close(total.cpu(), expected.cpu())
    torch.testing.assert_close(a[3].grad.cpu(), b[3].grad.cpu())
    total = clip((p for p in a), 2.0)  # a generator (e.g. model.parameters())
    expected = torch.nn.utils.clip_grad_norm_((p for p in b), 2.0)
    torch.testing.assert_close(total.cpu(), expected.cpu())
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad.cpu(), pb.grad.cpu())


def test_clip_grad_norm_no_grads():
    clip = oc.clip_grad_norm_impl()
    a, b = _clip_params(torch.float32, scale=1.0, none_at=tuple(range(len(CLIP_SHAPES))))
    with oc.count_launches_or_none() as launches:
        total = clip(a, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert float(total) == float(expected) == 0.0
    assert all(p.grad is None for p in a)
    if launches is not None:
        assert sum(launches.values()) == 0
    assert float(clip([], 1.0)) == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")], ids=["L2", "Linf"])
def test_clip_grad_norm_nonfinite_like_torch(bad, norm_type):
    """error_if_nonfinite=False: torch returns the non-finite norm and scales grads by it (NaN-ing them)."""
    clip = oc.clip_grad_norm_impl()
    a, b = _clip_params(torch.float32, scale=1.0)
    for p in (a[3], b[3]):
        p.grad[7] = bad
    total = clip(a, 1.0, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(b, 1.0, norm_type=norm_type)
    torch.testing.assert_close(total.cpu(), expected.cpu(), equal_nan=True)
    for i, (pa, pb) in enumerate(zip(a, b)):
        if pb.grad is not None:
            torch.testing.assert_close(pa.grad.cpu(), pb.grad.cpu(), equal_nan=True, msg=lambda m, i=i: f"grad {i}: {m}")


@oc.fastres_only
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_kernels_follow_the_reference_loop(name, monkeypatch):
    """fastres.reference.optim, the per-tensor loop with the kernels' math (fp32, stored in the param's dtype),
    is their spec and the oracle here: the kernels (DEVICE) against it run on CPU through the same optimizer
    class (its torch path pointed at the reference), to fp32 rounding. (bf16/fp16: test_parity_low_precision's
    "master" reference models the same math.)"""
    dtype = torch.float32
    import fastres.optim._base as base
    from fastres.reference import optim as reference

    spec, options = oc.small(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, dtype, seed=21)
    kernels = oc.fastres_cls(name)(oc.param_arg(spec, k := oc.make_params(values, DEVICE), DEVICE), **options)
    ref = oc.fastres_cls(name)(oc.param_arg(spec, r := oc.make_params(values, oc.CPU), oc.CPU), **options)
    monkeypatch.setattr(base, "_torch_path", reference)
    for step in range(1, 3):
        grads = oc.step_grads(spec, dtype, 21, step)
        oc.set_grads(k, grads)
        oc.set_grads(r, grads)
        with oc.count_launches_or_none() as launches:
            kernels.step()
        assert sum(launches.values()) == 1, "the kernels did not run"
        with oc.torch_path_on_cpu():  # ref plans (at its first step) the torch path: here the reference
            ref.step()
    oc.compare_optimizers(kernels, oc.flat(k), ref, oc.flat(r), kind="master", where="after 2 steps")
