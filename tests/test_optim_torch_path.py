"""``fastres.optim`` on its torch path: CPU tensors without the interpreter, and float64 params anywhere.

There each optimizer runs torch.optim's own fastest implementation of the
update (fastres/optim/_torch_path.py): fused for SGD, Adam, AdamW, Adagrad on
CPU, chunked foreach for RMSprop and Adadelta. These tests hold it to torch:
bitwise against the implementation it calls, within the parity tolerances
against torch's default for-loop, and with GradScaler's attributes.

The test session sets TRITON_INTERPRET=1 (tests/conftest.py), under which CPU
tensors take the interpreted kernels; ``oc.torch_path_on_cpu()`` switches
fastres' path decision off the interpreter for one test (see there); that a
process without TRITON_INTERPRET decides "torch" for CPU tensors is
tests/test_package.py::test_backend_decision_on_cpu.
"""

from __future__ import annotations

import copy

import pytest
import torch

import optim_cases as oc

pytestmark = oc.fastres_only

CPU = oc.CPU


@pytest.fixture
def torch_path():
    with oc.torch_path_on_cpu():
        yield


def _torch_flags(name: str, device: torch.device) -> dict:
    from fastres.optim import _torch_path

    how = _torch_path.implementation(oc.fastres_cls(name)._rule, device)
    return dict(fused=True) if how == "fused" else dict(foreach=True)


def _awkward_params(dtype=torch.float32, device=CPU, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (3,), (127,), (1025,), (5000,), (16, 33), (8, 3, 3, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in shapes]


def _set_grads(params_lists, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    grads = [oc.random_grad(p.shape, p.dtype, gen) for p in params_lists[0]]
    for params in params_lists:
        for p, g in zip(params, grads):
            p.grad = (g * scale).to(p.device)


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_runs_torchs_implementation_bitwise(name, torch_path, monkeypatch):
    """fastres on CPU equals, bit for bit, torch.optim with the implementation fastres says it calls (fused or
    foreach), with every state tensor, over 3 steps; foreach in several chunks; no kernel launch."""
    from fastres.optim import _torch_path
    from fastres.testing import count_launches

    monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", 2000)  # several chunks from these small tensors
    options = oc.FULL_STATE_OPTIONS[name]
    a, b = _awkward_params(), _awkward_params()
    fr = oc.fastres_cls(name)(a, **copy.deepcopy(options))
    ref = oc.torch_cls(name)(b, **copy.deepcopy(options), **_torch_flags(name, CPU))
    for step in range(3):
        _set_grads([a, b], seed=step)
        with count_launches() as launches:
            fr.step()
        ref.step()
        assert sum(launches.values()) == 0, dict(launches)
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"step {step}: param {i}"
            assert set(fr.state[p]) == set(ref.state[q])
            for key, value in ref.state[q].items():
                assert torch.equal(fr.state[p][key], value), f"step {step}: param {i} state[{key!r}]"
                assert fr.state[p][key].dtype == value.dtype and fr.state[p][key].device == value.device


PARITY_OPTIONS = {
    "SGD": [dict(lr=0.1), dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
            dict(lr=torch.tensor(0.1), momentum=0.9, dampening=0.5)],
    "RMSprop": [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2, maximize=True)],
    "Adam": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, maximize=True),
             dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.8), torch.tensor(0.99)), decoupled_weight_decay=True,
                  weight_decay=0.1)],
    "AdamW": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1)],
    "Adagrad": [dict(lr=0.1), dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5, weight_decay=1e-2,
                                   maximize=True)],
    "Adadelta": [dict(lr=1.0), dict(lr=1.0, rho=0.5, weight_decay=0.1, maximize=True)],
}


def _skip_some_grads(step, gi, pi, grad):
    """Params 0 and 3 of group 0 get no grad on the first step: their first step comes later (SGD's buffer)."""
    return None if step == 1 and gi == 0 and pi in (0, 3) else grad


@pytest.mark.parametrize(
    "name, options",
    [pytest.param(n, o, id=f"{n}-{i}") for n, opts in PARITY_OPTIONS.items() for i, o in enumerate(opts)],
)
def test_parity_with_torch_fp32(name, options, torch_path):
    """Against torch's default (for-loop) within the parity tolerances: awkward shapes, params without grads
    and params whose first gradient comes on a later step."""
    oc.run_parity(name, options, oc.awkward(), device=CPU, steps=4, check_launches=False, grad_hook=_skip_some_grads)


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_parity_with_torch_float64(name):
    """float64 params take the torch path on every device (CUDA included): torch's numbers in float64."""
    oc.run_parity(name, oc.FULL_STATE_OPTIONS[name], oc.awkward(), dtype=torch.float64, steps=4,
                  references=["direct"], check_launches=False)


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_grad_scaler_attributes(name, torch_path):
    """grad_scale unscales inside the step (torch's fused kernels, or out of place before foreach); found_inf=1
    skips the whole step, step counts included."""
    options = oc.FULL_STATE_OPTIONS[name]
    a, b = _awkward_params(), _awkward_params()
    fr = oc.fastres_cls(name)(a, **copy.deepcopy(options))
    ref = oc.torch_cls(name)(b, **copy.deepcopy(options))
    for step in range(2):
        _set_grads([a], seed=step, scale=2.0**10)
        _set_grads([b], seed=step)
        fr.grad_scale, fr.found_inf = torch.tensor(2.0**10), torch.tensor(0.0)
        fr.step()
        ref.step()
    oc.compare_optimizers(fr, a, ref, b, kind="master", where="after 2 unscaled steps")
    snap = oc.state_snapshot(fr, a)
    fr.found_inf = torch.tensor(1.0)
    fr.step()
    oc.assert_unchanged(fr, a, snap, "step with found_inf=1")


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_every_dtype_matches_torchs_for_loop(name, dtype, torch_path):
    """Issue #19, item 5: on the CPU path every optimizer in every dtype torch supports gives the update of
    torch's for-loop implementation (torch's CPU default, right for every dtype), params and every state
    tensor, over 3 steps. 16-bit params step through the for-loop itself (bitwise): torch 2.13's fused CPU
    SGD leaves the vectorised part of a bf16/fp16 tensor unchanged and its fused AdamW reaches inf in fp16;
    float32/float64 take the fused or foreach implementations, a few ulps from the for-loop."""
    options = oc.FULL_STATE_OPTIONS[name]
    a, b = _awkward_params(dtype), _awkward_params(dtype)
    fr = oc.fastres_cls(name)(a, **copy.deepcopy(options))
    ref = oc.torch_cls(name)(b, **copy.deepcopy(options), foreach=False)
    tol = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}.get(
        dtype, dict(rtol=0, atol=0))
    for step in range(3):
        _set_grads([a, b], seed=step)
        fr.step()
        ref.step()
        for i, (p, q) in enumerate(zip(a, b)):
            torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name} {dtype} step {step}: param {i}: {m}")
            for key, value in ref.state[q].items():
                torch.testing.assert_close(fr.state[p][key], value, **tol,
                                           msg=lambda m: f"{name} {dtype} step {step}: param {i} {key}: {m}")
