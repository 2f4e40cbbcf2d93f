"""``fastres.optim`` raises what torch.optim raises, and clear errors for what fastres cannot do.

Invalid hyperparameters: torch is called first and fastres must raise the same
exception type with the same message. Unsupported inputs (sparse grads,
complex/integer params, differentiable=True): a clear error naming the problem.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import optim_cases as oc
from optim_cases import DEVICE


def _params(n=2):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, generator=gen).to(DEVICE)) for _ in range(n)]


def _torch_error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we want whatever torch raises
        return exc
    return None


INVALID = {
    "SGD": [
        dict(lr=-1e-3),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(momentum=-0.1),
        dict(weight_decay=-1e-4),
        dict(nesterov=True),  # nesterov without momentum
        dict(nesterov=True, momentum=0.9, dampening=0.1),
    ],
    "RMSprop": [
        dict(lr=-1e-2),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(eps=-1e-8),
        dict(momentum=-0.5),
        dict(weight_decay=-1.0),
        dict(alpha=-0.1),
    ],
    "Adam": [
        dict(lr=-1e-3),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(betas=(0.9, -0.5)),
        dict(weight_decay=-1e-2),
        dict(betas=(torch.tensor(0.9), 0.999)),  # mixed float/Tensor betas
    ],
    "AdamW": [
        dict(lr=-1e-3),
        dict(eps=-1.0),
        dict(betas=(1.5, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(weight_decay=-1e-2),
    ],
    "Adagrad": [
        dict(lr=-1e-2),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(lr_decay=-0.1),
        dict(weight_decay=-1.0),
        dict(initial_accumulator_value=-0.1),
        dict(eps=-1e-10),
    ],
    "Adadelta": [
        dict(lr=-1.0),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(rho=-0.1),
        dict(rho=1.1),
        dict(eps=-1e-6),
        dict(weight_decay=-1.0),
    ],
}


def _kw_id(kw):
    return ",".join(f"{k}={'T' + str(tuple(v.shape)) if isinstance(v, torch.Tensor) else v}" for k, v in kw.items())


@pytest.mark.parametrize(
    "name, kwargs",
    [pytest.param(n, kw, id=f"{n}-{_kw_id(kw)}") for n, kws in INVALID.items() for kw in kws],
)
def test_invalid_hyperparameters_raise_like_torch(name, kwargs):
    expected = _torch_error(lambda: oc.torch_cls(name)(_params(), **kwargs))
    assert expected is not None, f"torch.optim.{name}({kwargs}) does not raise: fix the case list"
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        oc.fastres_cls(name)(_params(), **kwargs)


BASE_CASES = {
    "empty": lambda cls: cls([], lr=0.1),
    "single_tensor": lambda cls: cls(_params(1)[0], lr=0.1),
    "set_in_group": lambda cls: cls([{"params": set(_params(2))}], lr=0.1),
    "non_leaf": lambda cls: cls([_params(1)[0] * 2], lr=0.1),
    "duplicate_across_groups": lambda cls: (lambda ps: cls([{"params": ps}, {"params": ps[:1]}], lr=0.1))(_params(2)),
    "group_without_params": lambda cls: cls([{"lr": 0.1}], lr=0.1),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_bad_params_argument_raises_like_torch(name, case):
    build = BASE_CASES[case]
    expected = _torch_error(lambda: build(oc.torch_cls(name)))
    assert expected is not None, case
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        build(oc.fastres_cls(name))


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_lr_zero_and_boundary_values_are_accepted_like_torch(name):
    """Values on the boundary of the valid ranges are accepted by torch and must be by fastres."""
    edge = {"SGD": dict(lr=0.0, momentum=0.0, dampening=1.0), "RMSprop": dict(lr=0.0, alpha=0.0, eps=0.0),
            "Adam": dict(lr=0.0, betas=(0.0, 0.0), eps=0.0), "AdamW": dict(lr=0.0, betas=(0.0, 0.0), weight_decay=0.0),
            "Adagrad": dict(lr=0.0, eps=0.0), "Adadelta": dict(lr=0.0, rho=1.0, eps=0.0)}[name]
    oc.torch_cls(name)(_params(), **edge)
    oc.fastres_cls(name)(_params(), **edge)


# ---------------------------------------------------------------------------
# What fastres does not support: clear errors
# ---------------------------------------------------------------------------
@oc.fastres_only
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_differentiable_true_raises_value_error(name):
    with pytest.raises(ValueError, match="differentiable"):
        oc.fastres_cls(name)(_params(), differentiable=True)


@oc.fastres_only
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_sparse_gradients_raise_a_clear_error(name):
    """Sparse grads (e.g. nn.Embedding(sparse=True)): RuntimeError/ValueError that says 'sparse'."""
    emb = torch.nn.Embedding(10, 3, sparse=True).to(DEVICE)
    emb(torch.tensor([1, 2, 2], device=DEVICE)).sum().backward()
    assert emb.weight.grad.is_sparse
    opt = oc.fastres_cls(name)(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError), match=re.compile("sparse", re.IGNORECASE)):
        opt.step()
    assert torch.equal(emb.weight.detach(), before), "a failed step must not have changed the param"


def _bad_dtype_case(name, dtype):
    ps = _params(2)
    bad = torch.zeros(4, dtype=dtype, device=DEVICE)
    bad = torch.nn.Parameter(bad) if dtype.is_complex else bad  # integer tensors cannot require grad
    opt = oc.fastres_cls(name)([ps[0], ps[1], bad], lr=0.1)  # the bad param is index 2
    for p in (*ps, bad):
        p.grad = torch.ones_like(p)
    opt.step()


@oc.fastres_only
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_complex_and_integer_params_raise_naming_index_and_dtype(name, dtype):
    """Raised at construction or at the first step: the message names the param's index (2) and dtype."""
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        _bad_dtype_case(name, dtype)
    msg = str(info.value)
    assert str(dtype).replace("torch.", "") in msg, f"dtype not named: {msg}"
    assert re.search(r"\b2\b", msg), f"param index 2 not named: {msg}"


@oc.fastres_only
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_non_dense_param_works_like_torch_or_raises_clearly(name):
    """A param with gaps in memory (a strided view made a leaf): torch steps it; fastres either steps it to
    torch's numbers or raises a ValueError naming the param and saying it is not dense."""
    base = torch.randn(4, 6, device=DEVICE)
    p = torch.nn.Parameter(base[:, ::2])  # non-contiguous, non-dense leaf
    q = torch.nn.Parameter(p.detach().clone())
    assert not p.is_contiguous()
    a, b = oc.fastres_cls(name)([p], lr=0.1), oc.torch_cls(name)([q], lr=0.1)
    g = torch.randn(4, 3, device=DEVICE)
    p.grad, q.grad = g.clone(), g.clone()
    try:
        a.step()
    except ValueError as exc:
        assert "dense" in str(exc) and "param 0" in str(exc), str(exc)
        return
    b.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# clip_grad_norm_
# ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["L2", "Linf"])
def test_clip_grad_norm_error_if_nonfinite_like_torch(norm_type, bad):
    def make():
        ps = _params(3)
        for i, p in enumerate(ps):
            p.grad = torch.ones_like(p) * (i + 1)
        ps[1].grad[2] = bad
        return ps

    expected = _torch_error(lambda: torch.nn.utils.clip_grad_norm_(make(), 1.0, norm_type, error_if_nonfinite=True))
    assert isinstance(expected, RuntimeError)
    with pytest.raises(RuntimeError, match=re.escape(str(expected))):
        oc.clip_grad_norm_impl()(make(), 1.0, norm_type, error_if_nonfinite=True)


# ---------------------------------------------------------------------------
# Every constructor argument against torch.optim's: signature, checks, messages, stored types
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_signature_is_torchs(name):
    """Same parameter names, kinds (positional / keyword-only) and defaults as torch.optim's constructor."""
    import inspect

    def sig(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert sig(oc.fastres_cls(name)) == sig(oc.torch_cls(name))


PROBE_VALUES = [-1.0, 0, 0.0, 0.5, 1.0, 1.5, math.nan, torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([0.1, 0.2]),
                True, None]
PROBE_BETAS = [(b0, b1) for b0 in (0.9, torch.tensor(0.9), torch.tensor([0.9]), -0.1, torch.tensor([0.9, 0.8]))
               for b1 in (0.999, torch.tensor(0.99))]


def _constructor_outcome(cls, kwargs):
    """What the constructor does: its exception (type and message) or the param groups it stored (types kept)."""
    try:
        opt = cls([torch.nn.Parameter(torch.randn(3))], **kwargs)
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome
        return ("raises", type(exc).__name__, str(exc))

    def stored(v):
        if isinstance(v, tuple):
            return tuple(stored(x) for x in v)
        return (type(v).__name__, v.dtype, tuple(v.shape), v.tolist()) if isinstance(v, torch.Tensor) else (type(v).__name__, repr(v))

    return ("ok", [{k: stored(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _probe_cases():
    import inspect

    for name in oc.OPTIMIZERS:
        params = inspect.signature(oc.torch_cls(name)).parameters
        for arg in list(params)[1:]:
            yield pytest.param(name, arg, id=f"{name}-{arg}")


@oc.fastres_only
@pytest.mark.parametrize("name, arg", list(_probe_cases()))
def test_each_argument_is_checked_and_stored_like_torch(name, arg):
    """Each constructor argument, over a grid of values (negative, zero, NaN, int, 0-d / 1-element / 2-element
    tensors, bool, None; betas mixing floats and tensors), alone and with foreach=True, fused=True or
    capturable=True: fastres raises torch's exception with torch's message, or stores exactly what torch
    stores in param_groups (same types: tensors stay tensors, ints stay ints).

    One deliberate difference is left out: differentiable=True without fused=True, which torch accepts
    and fastres refuses with its own ValueError (test_differentiable_true_raises_value_error)."""
    import inspect

    params = inspect.signature(oc.torch_cls(name)).parameters
    values = PROBE_BETAS if arg == "betas" else PROBE_VALUES
    companions = [{}] + [{flag: True} for flag in ("foreach", "fused", "capturable") if flag in params and flag != arg]
    checked = 0
    for companion in companions:
        for value in values:
            kwargs = dict(companion, **{arg: value})
            differentiable = kwargs.get("differentiable")
            if differentiable is not None and not kwargs.get("fused"):
                if isinstance(differentiable, torch.Tensor) and differentiable.numel() != 1 or bool(differentiable):
                    continue
            expected = _constructor_outcome(oc.torch_cls(name), kwargs)
            got = _constructor_outcome(oc.fastres_cls(name), kwargs)
            assert got == expected, f"{name}({kwargs}): torch {expected}, fastres {got}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(lr=torch.tensor(1e-3), foreach=True), id="tensor-lr-foreach"),
        pytest.param(dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), id="tensor-betas-foreach"),
        pytest.param(dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.99))), id="2-element-beta"),
        pytest.param(dict(fused=True, foreach=True), id="fused-and-foreach"),
        pytest.param(dict(fused=True, differentiable=True), id="fused-and-differentiable"),
    ],
)
def test_adam_tensor_hyperparameters_raise_torchs_error(name, kwargs):
    expected = _torch_error(lambda: oc.torch_cls(name)(_params(), **kwargs))
    assert expected is not None, f"torch.optim.{name}({kwargs}) does not raise: fix the case"
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        oc.fastres_cls(name)(_params(), **kwargs)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("extra", [{}, dict(foreach=False), dict(capturable=True, foreach=True), dict(fused=True)],
                         ids=["default", "foreach=False", "capturable-foreach", "fused"])
def test_tensor_betas_stay_tensors_in_param_groups_and_state_dict(name, extra):
    """torch keeps tensor betas (as 0-d tensors) in param_groups; so does fastres: equal state_dicts."""
    kwargs = dict(lr=1e-2, betas=(torch.tensor(0.8), torch.tensor([0.99])), **extra)
    a = oc.fastres_cls(name)(_params(), **copy.deepcopy(kwargs))
    b = oc.torch_cls(name)(_params(), **copy.deepcopy(kwargs))
    for opt in (a, b):
        assert all(isinstance(beta, torch.Tensor) and beta.dim() == 0 for beta in opt.param_groups[0]["betas"])
    ga, gb = a.state_dict()["param_groups"][0], b.state_dict()["param_groups"][0]
    assert sorted(ga) == sorted(gb)
    for key, value in gb.items():
        if key == "betas":
            assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(ga[key], value)), ga[key]
        else:
            assert ga[key] == value and type(ga[key]) is type(value), (key, ga[key], value)
