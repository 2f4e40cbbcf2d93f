"""``fastres.optim`` as a ``torch.optim.Optimizer``: state, state_dict, param groups,
zero_grad, closures, GradScaler / AMP, capturable, mixed dtypes, NaN/Inf.

torch.optim is the reference throughout; tolerances are optim_cases.tolerance.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

import optim_cases as oc
from optim_cases import DEVICE

FP32 = torch.float32


def _spec():
    """Two groups (the second with its own lr), awkward small shapes, one param without grads."""
    return [
        oc.group(oc.P(()), oc.P((1025,)), oc.P((5,), grad=False)),
        oc.group(oc.P((8, 3, 3, 3)), oc.P((3,)), lr=0.003),
    ]


def _build(cls, options, spec, values, *, device=DEVICE):
    params = oc.make_params(values, device)
    return cls(oc.param_arg(spec, params, device), **copy.deepcopy(options)), params


def _drive(pairs, spec, first_step, last_step, *, seed=0, dtype=FP32):
    """Same gradients for every (optimizer, params) pair; step them all."""
    for step in range(first_step, last_step + 1):
        grads = oc.step_grads(spec, dtype, seed, step)
        for opt, params in pairs:
            oc.set_grads(params, grads)
            opt.step()


def _compare(fr, ref, where, kind="master"):
    (fr_opt, fr_params), (ref_opt, ref_params) = fr, ref
    oc.compare_optimizers(fr_opt, oc.flat(fr_params), ref_opt, oc.flat(ref_params), kind=kind, where=where)


def _copy_params(params):
    return [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in params]


# ---------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------
def _assert_same_state_dict_layout(fr_sd, torch_sd, where):
    assert sorted(fr_sd) == sorted(torch_sd), where
    assert sorted(fr_sd["state"]) == sorted(torch_sd["state"]), (
        f"{where}: state indices fastres {sorted(fr_sd['state'])} vs torch {sorted(torch_sd['state'])}"
    )
    for index, st in torch_sd["state"].items():
        assert sorted(fr_sd["state"][index]) == sorted(st), (
            f"{where}: state[{index}] keys fastres {sorted(fr_sd['state'][index])} vs torch {sorted(st)}"
        )
    assert len(fr_sd["param_groups"]) == len(torch_sd["param_groups"])
    for gi, (ga, gb) in enumerate(zip(fr_sd["param_groups"], torch_sd["param_groups"])):
        assert sorted(ga) == sorted(gb), f"{where}: param_groups[{gi}] keys fastres {sorted(ga)} vs torch {sorted(gb)}"
        for key, value in gb.items():
            if key in ("foreach", "fused"):  # accepted and ignored by fastres: stored values may differ
                continue
            mine = ga[key]
            if isinstance(value, torch.Tensor) or isinstance(mine, torch.Tensor):
                assert float(mine) == float(value), f"{where}: param_groups[{gi}][{key!r}]: {mine!r} vs {value!r}"
            else:
                assert mine == value, f"{where}: param_groups[{gi}][{key!r}]: fastres {mine!r} vs torch {value!r}"


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_state_dict_round_trips(name):
    """fastres -> torch, torch -> fastres and fastres -> (torch.save/load) -> fastres: training continues
    exactly as it would have without the round trip; state_dict layouts are torch's."""
    _state_dict_round_trips(name, DEVICE)


@oc.fastres_only
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_state_dict_round_trips_on_the_torch_path(name):
    """The same on fastres' torch path (CPU tensors without the interpreter: torch.optim's implementations)."""
    with oc.torch_path_on_cpu():
        _state_dict_round_trips(name, oc.CPU)


@oc.fastres_only
@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_state_dict_moves_between_kernel_and_torch_paths(name):
    """A state_dict of the kernel path (DEVICE: CUDA, or CPU under the interpreter) loads into an optimizer on
    the torch path (CPU) and one of the torch path loads into the kernel path; each continues like torch.optim
    loaded with the same state."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=5)
    kernels = _build(oc.fastres_cls(name), options, spec, values)  # plans its path at its first step
    _drive([kernels], spec, 1, 2, seed=5)
    with oc.torch_path_on_cpu():
        current = [[p.detach() for p in ps] for ps in kernels[1]]
        on_torch_path = _build(oc.fastres_cls(name), options, spec, current, device=oc.CPU)
        on_torch_path[0].load_state_dict(copy.deepcopy(kernels[0].state_dict()))
        _drive([on_torch_path], spec, 3, 3, seed=5)  # plans: torch path, kept after the switch ends
    back = _build(oc.fastres_cls(name), options, spec, [[p.detach() for p in ps] for ps in on_torch_path[1]])
    back[0].load_state_dict(copy.deepcopy(on_torch_path[0].state_dict()))
    ref = _build(oc.torch_cls(name), options, spec, [[p.detach() for p in ps] for ps in on_torch_path[1]])
    ref[0].load_state_dict(copy.deepcopy(on_torch_path[0].state_dict()))
    _drive([back, ref], spec, 4, 4, seed=5)
    _compare(back, ref, "kernel path loaded from the torch path vs torch.optim loaded alike")
    _drive([kernels], spec, 3, 4, seed=5)
    _compare(back, kernels, "kernels -> torch path -> kernels vs kernels throughout")


def _state_dict_round_trips(name, device):
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=3)
    a = _build(oc.fastres_cls(name), options, spec, values, device=device)  # fastres, never reloaded
    b = _build(oc.torch_cls(name), options, spec, values, device=device)  # torch, never reloaded
    _drive([a, b], spec, 1, 3, seed=3)
    _compare(a, b, "before the round trips")
    _assert_same_state_dict_layout(a[0].state_dict(), b[0].state_dict(), "state_dict after 3 steps")

    # c: torch loading fastres' state; d: fastres loading torch's; e: fastres loading fastres' via bytes.
    c = _build(oc.torch_cls(name), options, spec, [[p.detach() for p in ps] for ps in a[1]], device=device)
    c[0].load_state_dict(copy.deepcopy(a[0].state_dict()))
    d = _build(oc.fastres_cls(name), options, spec, [[p.detach() for p in ps] for ps in b[1]], device=device)
    d[0].load_state_dict(copy.deepcopy(b[0].state_dict()))
    buf = io.BytesIO()
    torch.save(a[0].state_dict(), buf)
    buf.seek(0)
    e = _build(oc.fastres_cls(name), options, spec, [[p.detach() for p in ps] for ps in a[1]], device=device)
    e[0].load_state_dict(torch.load(buf, weights_only=True))
    for label, (opt, _) in (("torch<-fastres", c), ("fastres<-torch", d), ("fastres<-fastres", e)):
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in a[0].param_groups], label

    _drive([a, b, c, d, e], spec, 4, 6, seed=3)
    _compare(a, b, "fastres vs torch after 6 steps")
    _compare(a, c, "fastres vs torch loaded from fastres")
    _compare(d, b, "fastres loaded from torch vs torch")
    _compare(e, a, "fastres loaded from fastres vs fastres")
    _assert_same_state_dict_layout(d[0].state_dict(), b[0].state_dict(), "state_dict after loading torch's")


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_load_state_dict_into_an_optimizer_that_already_stepped(name):
    """Loading replaces the state tensors of an optimizer that has run: the next steps use the loaded ones."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=4)
    a = _build(oc.fastres_cls(name), options, spec, values)
    b = _build(oc.fastres_cls(name), options, spec, values)
    _drive([a], spec, 1, 3, seed=4)
    _drive([b], spec, 1, 2, seed=99)  # b has its own (different) history
    with torch.no_grad():
        for pa, pb in zip(oc.flat(a[1]), oc.flat(b[1])):
            pb.copy_(pa)
    b[0].load_state_dict(copy.deepcopy(a[0].state_dict()))
    _drive([a, b], spec, 4, 6, seed=4)
    _compare(b, a, "reloaded vs original")


def test_state_keys_and_dtypes_match_torch_for_every_optimizer():
    """State keys per param exactly torch's (SGD without momentum: no state; Adagrad: state from __init__)."""
    spec = [oc.group(oc.P((3,)), oc.P((4,), grad=False))]
    values = oc.initial_values(spec, FP32, seed=5)
    cases = [(n, o) for n, o in oc.FULL_STATE_OPTIONS.items()] + [
        ("SGD", dict(lr=0.1)),
        ("RMSprop", dict(lr=1e-2)),
        ("Adam", dict(lr=1e-2)),
    ]
    for name, options in cases:
        a = _build(oc.fastres_cls(name), options, spec, values)
        b = _build(oc.torch_cls(name), options, spec, values)
        for p, q in zip(oc.flat(a[1]), oc.flat(b[1])):  # before any step (Adagrad creates state at init)
            assert sorted(a[0].state.get(p, {})) == sorted(b[0].state.get(q, {})), f"{name} {options} at init"
        _drive([a, b], spec, 1, 2, seed=5)
        _compare(a, b, f"{name} {options}")


# ---------------------------------------------------------------------------
# param groups, zero_grad, closures
# ---------------------------------------------------------------------------
def _torch_steps_after_add_param_group(name: str) -> bool:
    """Whether this torch's optimizer steps a group added after construction: torch.optim.Adagrad of
    torch 2.11 creates its state in __init__ only and raises KeyError('sum') (2.13's does not)."""
    p = torch.zeros(1, requires_grad=True)
    q = torch.zeros(1, requires_grad=True)
    opt = oc.torch_cls(name)([p], lr=0.1)
    opt.add_param_group({"params": [q]})
    p.grad, q.grad = torch.ones(1), torch.ones(1)
    try:
        opt.step()
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_add_param_group(name):
    """A group added after a few steps gets its own hyperparameters; then two launches per step."""
    if not _torch_steps_after_add_param_group(name):
        pytest.skip(f"torch {torch.__version__}'s {name} cannot step a group added after construction "
                    "(KeyError), so there is nothing to compare against")
    first = [oc.group(oc.P((3,)), oc.P((1025,)))]
    added = [oc.group(oc.P(()), oc.P((8, 3, 3, 3)))]
    options = oc.FULL_STATE_OPTIONS[name]
    overrides = {"lr": options.get("lr", 1e-2) * 0.5, "weight_decay": 0.05}
    values = oc.initial_values(first, FP32, seed=6)
    extra = oc.initial_values(added, FP32, seed=7)
    sides = [_build(oc.fastres_cls(name), options, first, values), _build(oc.torch_cls(name), options, first, values)]
    _drive(sides, first, 1, 2, seed=6)
    both = [first[0], oc.group(*added[0].params, **overrides)]
    for opt, params in sides:
        new = oc.make_params(extra, DEVICE)[0]
        opt.add_param_group(dict(params=new, **overrides))
        params.append(new)
    for step in range(3, 6):
        grads = oc.step_grads(both, FP32, 6, step)
        for i, (opt, params) in enumerate(sides):
            oc.set_grads(params, grads)
            with oc.count_launches_or_none() as launches:
                opt.step()
            if i == 0 and launches is not None:
                assert sum(launches.values()) == 2, f"step {step}: {dict(launches)}"
        _compare(sides[0], sides[1], f"step {step} after add_param_group")
    assert sides[0][0].param_groups[1]["lr"] == overrides["lr"]


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adadelta"])
def test_zero_grad(name):
    """set_to_none=False zeroes grads in place (and a zero-grad step matches torch's);
    set_to_none=True (the default) leaves no grads: the step launches nothing and changes nothing."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=8)
    a = _build(oc.fastres_cls(name), options, spec, values)
    b = _build(oc.torch_cls(name), options, spec, values)
    _drive([a, b], spec, 1, 2, seed=8)
    grads_before = [p.grad for p in oc.flat(a[1])]
    for opt, _ in (a, b):
        opt.zero_grad(set_to_none=False)
    for p, g in zip(oc.flat(a[1]), grads_before):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is g and not p.grad.any(), "zero_grad(set_to_none=False) must zero the same tensor"
    for opt, _ in (a, b):
        opt.step()  # a step with all-zero gradients (weight decay, momentum and step counts still act)
    _compare(a, b, "after a step with zeroed grads")

    a[0].zero_grad()
    assert all(p.grad is None for p in oc.flat(a[1]))
    snap = oc.state_snapshot(a[0], oc.flat(a[1]))
    with oc.count_launches_or_none() as launches:
        a[0].step()
    if launches is not None:
        assert sum(launches.values()) == 0, f"no grads, yet {dict(launches)}"
    oc.assert_unchanged(a[0], oc.flat(a[1]), snap, "step without grads")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_grads_present_on_some_steps_only(name):
    """The set of params with grads changes from step to step (and back): torch's numbers every time."""

    def hook(step, gi, pi, grad):
        if (step + gi + pi) % 3 == 0:
            return None
        return grad

    oc.run_parity(name, oc.FULL_STATE_OPTIONS[name], _spec(), steps=6, grad_hook=hook)


def test_step_with_closure():
    """step(closure) calls the closure once with grad enabled and returns its loss; step() returns None."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(DEVICE)
    model_b = copy.deepcopy(model_a)
    opt_a = oc.fastres_cls("Adam")(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    x = torch.randn(7, 5, device=DEVICE)
    calls = []

    def make_closure(model, opt, tag):
        def closure():
            calls.append(tag)
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        return closure

    with torch.no_grad():  # step must enable grad for the closure itself
        for _ in range(3):
            loss_a = opt_a.step(make_closure(model_a, opt_a, "a"))
            loss_b = opt_b.step(make_closure(model_b, opt_b, "b"))
            assert isinstance(loss_a, torch.Tensor)
            torch.testing.assert_close(loss_a, loss_b)
    assert calls == ["a", "b"] * 3
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-6, atol=1e-6)
    assert opt_a.step() is None


# ---------------------------------------------------------------------------
# Params and state replaced between steps (no stale cached pointers)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["param_data", "state_tensors"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_storage_replaced_between_steps(name, what):
    """``p.data = new`` or ``opt.state[p][key] = new`` between steps: the next step updates the new
    tensors (as torch does), not stale cached pointers to the old ones."""

    def mutate(step, opt, params):
        if step != 2:
            return
        with torch.no_grad():
            for p in oc.flat(params):
                if p.grad is None:  # (params without grads must stay as they were)
                    continue
                if what == "param_data":
                    p.data = p.data.clone() * 0.5
                else:
                    st = opt.state[p]
                    for key, value in list(st.items()):
                        if key != "step" and isinstance(value, torch.Tensor):
                            st[key] = value.clone() * 0.5

    oc.run_parity(name, oc.FULL_STATE_OPTIONS[name], _spec(), steps=4, between_steps=mutate)


@pytest.mark.parametrize(
    "name", ["SGD", pytest.param("Adam", marks=pytest.mark.skipif(oc.SANITY, reason="torch's fused CPU Adam mixes layouts"))]
)
def test_channels_last_params(name):
    """Dense but non-contiguous params (channels_last conv weights), with grads of either layout."""
    values = oc.initial_values([oc.group(oc.P((8, 3, 3, 3)), oc.P((4, 5, 1, 3)))], FP32, seed=9)[0]
    sides = []
    for cls in (oc.fastres_cls(name), oc.torch_cls(name)):
        ps = [torch.nn.Parameter(v.clone().to(DEVICE).contiguous(memory_format=torch.channels_last)) for v in values]
        sides.append((cls(ps, **oc.FULL_STATE_OPTIONS[name]), [ps]))
    for step in range(1, 4):
        gen = torch.Generator().manual_seed(step)
        grads = [oc.random_grad(v.shape, FP32, gen) for v in values]
        for opt, (ps,) in sides:
            for i, (p, g) in enumerate(zip(ps, grads)):
                g = g.to(DEVICE)
                # param 0: grad in the param's layout; param 1: a contiguous grad (layouts differ)
                p.grad = g.contiguous(memory_format=torch.channels_last) if i == 0 else g.contiguous()
            with warnings.catch_warnings():  # fastres may warn that it relays out param 1's grad
                warnings.simplefilter("ignore")
                opt.step()
        _compare(sides[0], sides[1], f"step {step}")
        for p in sides[0][1][0]:
            assert p.is_contiguous(memory_format=torch.channels_last), "the param's layout must not change"


# ---------------------------------------------------------------------------
# GradScaler / AMP
# ---------------------------------------------------------------------------
AMP_NAMES = [n for n in oc.OPTIMIZERS if not oc.SANITY or n in oc.TORCH_FUSED - {"SGD"}]


@pytest.mark.parametrize("name", AMP_NAMES)
def test_grad_scale_attributes_unscale_in_the_step(name):
    """``opt.grad_scale`` / ``opt.found_inf`` set (as GradScaler does): scaled grads give the unscaled step."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    assert getattr(oc.fastres_cls(name), "_step_supports_amp_scaling", False) or oc.SANITY
    values = oc.initial_values(spec, FP32, seed=10)
    a = _build(oc.fastres_cls(name), options, spec, values)
    b = _build(oc.torch_cls(name), options, spec, values)
    scale = 1024.0  # a power of two: scaling and unscaling are exact
    for step in range(1, 4):
        grads = oc.step_grads(spec, FP32, 10, step)
        oc.set_grads(a[1], grads, scale=scale)
        oc.set_grads(b[1], grads)
        a[0].grad_scale = torch.tensor(scale, device=DEVICE)
        a[0].found_inf = torch.tensor(0.0, device=DEVICE)
        a[0].step()
        b[0].step()
        _compare(a, b, f"step {step}")


@pytest.mark.parametrize("name", AMP_NAMES)
def test_found_inf_skips_the_whole_step(name):
    """found_inf != 0: no param, no state tensor and no step count changes; later steps continue normally."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=11)
    a = _build(oc.fastres_cls(name), options, spec, values)
    b = _build(oc.torch_cls(name), options, spec, values)
    _drive([a, b], spec, 1, 2, seed=11)
    # The skipped step: infinite/NaN scaled grads and found_inf = 1.
    grads = oc.step_grads(spec, FP32, 11, 100)
    oc.set_grads(a[1], grads, scale=2.0**16)
    a[1][0][1].grad[3] = math.inf
    a[1][1][0].grad.view(-1)[0] = math.nan
    snap = oc.state_snapshot(a[0], oc.flat(a[1]))
    a[0].grad_scale = torch.tensor(2.0**16, device=DEVICE)
    a[0].found_inf = torch.tensor(1.0, device=DEVICE)
    with oc.count_launches_or_none() as launches:
        a[0].step()
    oc.assert_unchanged(a[0], oc.flat(a[1]), snap, "step with found_inf=1")
    if launches is not None:
        assert sum(launches.values()) <= 2, dict(launches)
    del a[0].grad_scale, a[0].found_inf
    _drive([a, b], spec, 3, 4, seed=11)  # no attributes: plain steps again
    _compare(a, b, "after the skipped step")


@pytest.mark.parametrize("name", oc.OPTIMIZERS)
def test_grad_scaler_end_to_end(name):
    """torch.amp.GradScaler driving fastres vs driving torch.optim: same params, state and scale,
    including an overflow step (skipped, scale backs off) and scale growth."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=12)
    sides = [_build(oc.fastres_cls(name), options, spec, values), _build(oc.torch_cls(name), options, spec, values)]
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, growth_interval=2) for _ in sides]
    for step in range(1, 7):
        grads = oc.step_grads(spec, FP32, 12, step)
        for (opt, params), scaler in zip(sides, scalers):
            scaler.scale(torch.ones((), device=DEVICE))  # what scaler.scale(loss) does first
            oc.set_grads(params, grads, scale=scaler.get_scale())
            if step == 3:
                params[1][1].grad[1] = math.inf
            scaler.step(opt)
            scaler.update()
            assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"step {step}"
        _compare(sides[0], sides[1], f"step {step}")
    # The step counts show the skipped step (torch: 5 of 6).
    st = sides[0][0].state[sides[0][1][0][0]]
    if "step" in st:
        assert float(st["step"]) == 5.0
    # A plain step after the scaler's steps (attributes gone) still matches.
    _drive(sides, spec, 7, 7, seed=12)
    _compare(sides[0], sides[1], "plain step after GradScaler steps")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_grad_scaler_unscale_then_clip(name):
    """scaler.unscale_(opt) + clip_grad_norm_ + scaler.step(opt): the optimizer gets grad_scale=None."""
    spec, options = _spec(), oc.FULL_STATE_OPTIONS[name]
    values = oc.initial_values(spec, FP32, seed=13)
    sides = [_build(oc.fastres_cls(name), options, spec, values), _build(oc.torch_cls(name), options, spec, values)]
    clips = [oc.clip_grad_norm_impl(), torch.nn.utils.clip_grad_norm_]
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8) for _ in sides]
    for step in range(1, 4):
        grads = oc.step_grads(spec, FP32, 13, step)
        norms = []
        for (opt, params), scaler, clip in zip(sides, scalers, clips):
            scaler.scale(torch.ones((), device=DEVICE))
            oc.set_grads(params, grads, scale=scaler.get_scale())
            scaler.unscale_(opt)
            norms.append(clip(oc.flat(params), 1.0))
            scaler.step(opt)
            scaler.update()
        torch.testing.assert_close(norms[0], norms[1], rtol=2e-6, atol=1e-6)
        _compare(sides[0], sides[1], f"step {step}")


# ---------------------------------------------------------------------------
# capturable, mixed dtypes, NaN / Inf
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(oc.CAPTURABLE))
def test_capturable_tensor_lr_changed_in_place(name):
    """capturable=True with a 0-d tensor lr that a scheduler updates in place (fill_): picked up each step."""
    options = dict(oc.FULL_STATE_OPTIONS[name], capturable=True)
    options["lr"] = torch.tensor(options["lr"])
    run = oc.run_parity(
        name, options, _spec()[:1], steps=5,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )
    lr = run.fr_opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(float(options["lr"]) * 0.25)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_two_dtypes_in_one_group(name):
    """fp32 and bf16 params in one group: two launches per step, each with its dtype's numbers."""
    run = oc.run_parity(
        name, oc.FULL_STATE_OPTIONS[name], oc.mixed_dtypes(torch.float32, torch.bfloat16), steps=3
    )
    assert all(sum(c.values()) == 2 for c in run.launches)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("name", [n for n in oc.OPTIMIZERS if not (oc.SANITY and n in oc.TORCH_FUSED)])
def test_nan_and_inf_gradients_behave_like_torch(name):
    """Without a GradScaler non-finite grads are used as they are: NaN/Inf reach params and state as in torch."""

    def hook(step, gi, pi, grad):
        grad = grad.clone()
        if step == 2 and (gi, pi) == (0, 1):
            grad[3], grad[5], grad[7] = math.nan, math.inf, -math.inf
        if step == 3 and (gi, pi) == (1, 0):
            grad.view(-1)[0] = math.inf
        if step == 3 and (gi, pi) == (0, 0):
            grad.fill_(math.nan)
        return grad

    run = oc.run_parity(name, oc.FULL_STATE_OPTIONS[name], _spec(), steps=4, grad_hook=hook, equal_nan=True)
    assert not oc.isfinite_all([p for p in oc.flat(run.fr_params)]), "the bad grads must show in the params"


def test_params_without_grads_get_no_state_and_no_launch():
    """A group whose params all lack grads is skipped (no launch, no state), as torch skips them."""
    spec = [oc.group(oc.P((3,)), oc.P((1025,))), oc.group(oc.P((4,), grad=False), oc.P((), grad=False), lr=0.5)]
    run = oc.run_parity("Adam", dict(lr=1e-2), spec, steps=2)
    for p in run.fr_params[1]:
        assert not run.fr_opt.state.get(p)
    assert all(sum(c.values()) == 1 for c in run.launches)


def test_new_grad_addresses_upload_only_the_tensor_table():
    """zero_grad(set_to_none=True) gives new grads each step: only the address table is
    rebuilt; the chunk table and the (always zero) counters are kept; a new size rebuilds all."""
    from fastres.launchers.multi_tensor import TableCache

    cache = TableCache()
    params = [torch.randn(5, device=DEVICE), torch.randn(300, device=DEVICE)]
    first = cache.tables([params, [torch.randn_like(p) for p in params]], None, None, 128)
    grads = [torch.randn_like(p) for p in params]
    second = cache.tables([params, grads], None, None, 128)
    assert second.tensor_table is not first.tensor_table
    assert second.chunk_table is first.chunk_table and second.counters is first.counters
    assert second.tensor_table[:, 1].tolist() == [g.data_ptr() for g in grads]
    assert cache.tables([params, grads], None, None, 128) is second
    third = cache.tables([params[:1], grads[:1]], None, None, 128)
    assert third.chunk_table is not first.chunk_table and third.n_programs == 1
