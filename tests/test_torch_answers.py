"""The fused path gives PyTorch's answer, or it does not run (issue #19, items 2, 3, 4 and 6).

Each test builds a plain module (``fastres.reference.nn``) and its fused twin with the same weights, does
to both what a user might (a replaced ReLU, a hook, pruning, a BatchNorm of the wrong size, a gradient
penalty, an odd input), and checks that the fused one gives the plain one's output, gradients and
buffers, or raises the plain one's error (same type, same message). Where the kernels step aside for a
module's structure they say why once (``fastres.FusionWarning``), and take the kernels again when the
structure is back to what they fuse. The CPU path (PyTorch's ops, no interpreter) is covered by the
cases that differ there.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import fastres
import optim_cases as oc
from fastres.reference import nn as ref
from fastres.testing import count_launches

from optim_cases import DEVICE

RTOL = 1e-4 if DEVICE.type == "cpu" else 5e-3  # TF32 on the GPU, as cuDNN


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def _block(down: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    block = ref.ResidualBlock(4, 6, 2, ref.downsample(4, 6, 2)) if down else ref.ResidualBlock(4, 4)
    _randomize_bn(block, seed)
    return block.to(DEVICE)


def _input(channels: int = 4, size: int = 5, seed: int = 1, **kwargs) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE, **kwargs)


def _close(name: str, fused: torch.Tensor, plain: torch.Tensor) -> None:
    assert fused.shape == plain.shape, (name, fused.shape, plain.shape)
    scale = plain.detach().abs().max().item() + 1e-12
    err = (fused.detach() - plain.detach()).abs().max().item() / scale
    assert err <= RTOL, f"{name}: relative error {err:.3g} > {RTOL:g}"


def _step(model: nn.Module, x: torch.Tensor):
    """One forward and backward: output, input grad, param grads, buffers (copies)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, out.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, {n: b.clone() for n, b in model.named_buffers()}


def _compare(plain: nn.Module, fused: nn.Module, x: torch.Tensor, train: bool = True) -> None:
    """Output, input grad, param grads and buffers of a training step (or in eval mode: a forward under
    no_grad, which takes the eval kernels, and one with gradients, which takes PyTorch's ops) agree."""
    plain.train(train), fused.train(train)
    if not train:
        with torch.no_grad():
            _close("eval output (no_grad)", fused(x), plain(x))
    (out_p, dx_p, grads_p, bufs_p), (out_f, dx_f, grads_f, bufs_f) = _step(plain, x), _step(fused, x)
    _close("output", out_f, out_p)
    _close("input grad", dx_f, dx_p)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        _close(f"{name}.grad", grads_f[name], grads_p[name])
    for name in bufs_p:
        _close(name, bufs_f[name].double(), bufs_p[name].double())


def _fused(plain: nn.Module) -> nn.Module:
    fused = fastres.convert(copy.deepcopy(plain))
    assert type(fused).__module__.startswith("fastres.") and type(fused) is not type(plain)
    return fused


def _same_error(call_fused, call_plain) -> BaseException:
    """Both raise: the same exception type and message; returns the fused one."""
    with pytest.raises(Exception) as plain_error:
        call_plain()
    with pytest.raises(Exception) as fused_error:
        call_fused()
    assert type(fused_error.value) is type(plain_error.value), (fused_error.value, plain_error.value)
    assert str(fused_error.value) == str(plain_error.value)
    return fused_error.value


def _fusion_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, fastres.FusionWarning)]


@pytest.fixture
def torch_path():
    """CPU tensors take PyTorch's ops (as without TRITON_INTERPRET) for one test."""
    with oc.torch_path_on_cpu():
        yield


# ------------------------------------------------------------------ item 2: double backward


@pytest.mark.parametrize("down", [False, True], ids=["identity", "downsample"])
def test_gradient_penalty_matches_pytorch(down):
    """``autograd.grad(..., create_graph=True)`` through a fused block gives a gradient with a graph, and
    a gradient penalty on it (WGAN-GP, R1) gives torch's second-order gradients for every parameter."""
    plain = _block(down, seed=3)
    fused = _fused(plain)
    results = []
    for model in (plain, fused):
        x = _input(seed=4).requires_grad_(True)
        out = model(x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        assert grad_x.requires_grad and grad_x.grad_fn is not None, type(model)
        penalty = (grad_x.flatten(1).norm(dim=1) - 1).square().mean() + out.mean()
        penalty.backward()
        results.append((grad_x.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}))
    (gx_p, dx_p, grads_p), (gx_f, dx_f, grads_f) = results
    _close("first-order input grad", gx_f, gx_p)
    _close("penalty's input grad", dx_f, dx_p)
    for name in grads_p:
        _close(f"penalty's {name}.grad", grads_f[name], grads_p[name])


def test_gradient_penalty_through_the_stem():
    torch.manual_seed(5)
    plain = ref.ConvBNReLU(3, 5).to(DEVICE)
    fused = _fused(plain)
    grads = []
    for model in (plain, fused):
        x = _input(3, seed=6).requires_grad_(True)
        (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    for i, (f, p) in enumerate(zip(*grads)):
        _close(f"grad {i}", f, p)


# ------------------------------------------------------------------ item 3: what users attach to the children


class _StandardizedConv2d(nn.Conv2d):
    """Weight standardisation: a conv subclass with its own forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def _standardized(conv: nn.Conv2d) -> nn.Conv2d:
    new = _StandardizedConv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=False).to(DEVICE)
    new.load_state_dict(conv.state_dict())
    return new


def _replace_relu(block):
    block.relu = nn.LeakyReLU(0.1)


def _standardize_conv1(block):
    block.conv1 = _standardized(block.conv1)


def _hook_conv1_output(block):
    block.conv1.register_forward_hook(lambda module, args, out: out * 0.5)


def _pre_hook_bn1(block):
    block.bn1.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))


def _prune_conv1(block):
    prune.l1_unstructured(block.conv1, "weight", amount=0.5)


def _weight_norm_conv2(block):
    parametrizations.weight_norm(block.conv2)


def _group_norm_bn2(block):
    torch.manual_seed(7)
    block.bn2 = nn.GroupNorm(2, block.conv2.out_channels).to(DEVICE)


def _batchnorm_subclass_bn1(block):
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    bn = MyBN(block.bn1.num_features).to(DEVICE)
    bn.load_state_dict(block.bn1.state_dict())
    block.bn1 = bn


def _custom_downsample(block):
    torch.manual_seed(8)
    block.downsample = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 6, 1, bias=False),
                                     nn.BatchNorm2d(6)).to(DEVICE)


def _hook_downsample_bn(block):
    block.downsample[1].register_forward_hook(lambda module, args, out: out.flip(-1))


CHANGES = [
    pytest.param(_replace_relu, False, "relu is a torch.nn.modules.activation.LeakyReLU", id="leaky-relu"),
    pytest.param(_standardize_conv1, False, "conv1 is a", id="conv-subclass"),
    pytest.param(_hook_conv1_output, False, "conv1 has hooks", id="conv1-forward-hook"),
    pytest.param(_pre_hook_bn1, False, "bn1 has hooks", id="bn1-pre-hook"),
    pytest.param(_prune_conv1, False, "conv1 has hooks", id="pruning"),
    pytest.param(_weight_norm_conv2, False, "conv2 has parametrizations (weight)", id="weight-norm"),
    pytest.param(_group_norm_bn2, False, "bn2 is a torch.nn.modules.normalization.GroupNorm", id="group-norm"),
    pytest.param(_batchnorm_subclass_bn1, False, "bn1 is a", id="batchnorm-subclass"),
    pytest.param(_custom_downsample, True, "downsample is not a plain nn.Sequential", id="custom-downsample"),
    pytest.param(_hook_downsample_bn, True, "downsample.1 has hooks", id="downsample-bn-hook"),
]


@pytest.mark.parametrize("change,down,reason", CHANGES)
def test_changed_children_run_the_plain_forward(change, down, reason):
    """A replaced, subclassed, hooked, pruned or parametrised child: the fused block runs the plain forward
    (torch's answer in training and eval, hooks applied), says why once, with no kernel launched."""
    plain = _block(down, seed=9)
    fused = _fused(plain)
    change(plain)
    change(fused)
    x = _input(seed=10)
    with warnings.catch_warnings(record=True) as record, count_launches() as launches:
        warnings.simplefilter("always")
        _compare(plain, fused, x, train=True)
        _compare(plain, fused, x, train=False)
    assert sum(launches.values()) == 0, dict(launches)
    said = _fusion_warnings(record)
    assert len(said) == 1 and reason in said[0] and "ResidualBlock" in said[0], said


def test_hooks_fire_and_the_kernels_return_when_they_go():
    """Forward hooks, pre-hooks and full backward hooks on the children fire as in the plain block; once
    removed, the block launches its kernels again."""
    plain = _block(seed=11)
    fused = _fused(plain)
    calls = {"plain": [], "fused": []}
    handles = []
    for key, model in (("plain", plain), ("fused", fused)):
        seen = calls[key]
        handles += [model.conv1.register_forward_hook(lambda m, a, o, seen=seen: seen.append("conv1 forward")),
                    model.bn1.register_forward_pre_hook(lambda m, a, seen=seen: seen.append("bn1 pre")),
                    model.conv2.register_full_backward_hook(lambda m, gi, go, seen=seen: seen.append("conv2 backward"))]
    x = _input(seed=12)
    with pytest.warns(fastres.FusionWarning, match="conv1 has hooks"):
        _compare(plain, fused, x)
    assert calls["fused"] == calls["plain"] == ["conv1 forward", "bn1 pre", "conv2 backward"]
    for handle in handles:
        handle.remove()
    with count_launches() as launches:
        _compare(plain, fused, x)
    assert sum(launches.values()) > 0


def test_global_module_hooks_fire_on_the_children():
    plain = _block(seed=13)
    fused = _fused(plain)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        with pytest.warns(fastres.FusionWarning, match="global module hooks"):
            fused(_input(seed=14))
        fused_calls, seen[:] = list(seen), []
        plain(_input(seed=14))
    finally:
        handle.remove()
    assert fused_calls == seen and "Conv2d" in seen


def test_stem_with_a_replaced_relu_or_a_hooked_bn():
    torch.manual_seed(15)
    plain = ref.ResNet(ref.ResidualBlock, [1], widths=(4,)).to(DEVICE)
    fused = _fused(plain)
    for model in (plain, fused):
        model.relu = nn.LeakyReLU(0.2)  # the stem's (and only the stem's: the blocks have their own) ReLU
    x = _input(3, seed=16)
    with pytest.warns(fastres.FusionWarning, match="ResNet runs PyTorch's ops.*relu is a"):
        _compare(plain, fused, x)
    stem_p, stem_f = ref.ConvBNReLU(3, 4).to(DEVICE), None
    stem_f = _fused(stem_p)
    for model in (stem_p, stem_f):
        model.bn.register_forward_hook(lambda m, a, o: o - 1)
    with pytest.warns(fastres.FusionWarning, match="ConvBNReLU runs PyTorch's ops.*bn has hooks"):
        _compare(stem_p, stem_f, x)


def test_warned_once_per_module_and_reason():
    fused = _fused(_block(seed=17))
    fused.relu = nn.ReLU6()
    x = _input(seed=18)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            fused(x)
        fused.relu = nn.ELU()
        fused(x)
    said = _fusion_warnings(record)
    assert len(said) == 2 and "ReLU6" in said[0] and "ELU" in said[1], said


def test_a_stepped_aside_block_compiles_in_one_graph():
    """torch.compile(fullgraph=True) of a block that runs the plain forward (a replaced ReLU): no graph
    break for the warning (said by eager calls only), torch's answer."""
    plain = _block(seed=18)
    fused = _fused(plain)
    for model in (plain, fused):
        model.relu = nn.LeakyReLU(0.1)
    compiled = torch.compile(fused, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    x = _input(seed=19)
    _close("compiled output", compiled(x), plain(x))


# ------------------------------------------------------------------ item 4: per-channel tensors of the wrong length


def _bn_of(block, features):
    bn = nn.BatchNorm2d(features).to(DEVICE)
    _randomize_bn(bn, 19)
    return bn


def _short_bn1(block):
    block.bn1 = _bn_of(block, 4)  # conv1 has 6 outputs


def _long_bn2(block):
    block.bn2 = _bn_of(block, 8)


def _short_running_var(block):
    block.bn2.running_var = torch.ones(5, device=DEVICE)


def _short_weight(block):
    block.downsample[1].weight = nn.Parameter(torch.ones(3, device=DEVICE))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("change", [_short_bn1, _long_bn2, _short_running_var, _short_weight],
                         ids=["bn1-4-of-6", "bn2-8-of-6", "running-var-5-of-6", "downsample-weight-3-of-6"])
def test_batchnorm_of_the_wrong_size_gets_torchs_error_and_no_kernel_runs(change, train):
    """A BatchNorm (or one of its tensors) with another length than its conv's output channels: torch's
    error, raised before any kernel reads or writes a per-channel tensor (nothing launched, every buffer
    and its neighbour in memory unchanged)."""
    plain = _block(down=True, seed=20)
    fused = _fused(plain)
    change(plain)
    change(fused)
    plain.train(train), fused.train(train)
    # Every buffer of the fused block lives at the start of a larger tensor, so that a write past its end shows.
    arenas = {}
    for name, module in fused.named_modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point():
                arena = torch.full((buf.numel() + 16,), 7.0, device=DEVICE)
                arena[:buf.numel()] = buf
                module._buffers[key] = arena[:buf.numel()]
                arenas[f"{name}.{key}"] = arena
    x = _input(seed=21)
    with warnings.catch_warnings(), count_launches() as launches, torch.no_grad():  # eval: the kernel path
        warnings.simplefilter("ignore", fastres.FusionWarning)
        error = _same_error(lambda: fused(x), lambda: plain(x))
    assert isinstance(error, RuntimeError)
    assert sum(launches.values()) == 0, dict(launches)
    for name, arena in arenas.items():
        assert (arena[-16:] == 7.0).all(), f"written past {name}"
    for (name, b), c in zip(fused.named_buffers(), plain.buffers()):  # what torch updated before raising
        assert torch.equal(b, c), name


def test_a_strided_running_mean_runs_the_plain_forward():
    """A running_mean that is a strided view (torch updates it in place through its strides): the
    kernels address per-channel tensors as contiguous, so the plain forward runs, with torch's result."""
    plain = _block(seed=22)
    fused = _fused(plain)
    for model in (plain, fused):
        model.bn1.running_mean = torch.zeros(8, device=DEVICE)[::2]
    with pytest.warns(fastres.FusionWarning, match=r"bn1.running_mean has shape \(4,\) \(not contiguous\)"):
        _compare(plain, fused, _input(seed=23))
    assert fused.bn1.running_mean._base.abs().sum() > 0


# ------------------------------------------------------------------ item 6: inputs and settings


def test_eps_zero_in_training_gets_torchs_error_and_runs_in_eval():
    plain = _block(seed=24)
    fused = _fused(plain)
    for model in (plain, fused):
        model.bn2.eps = 0.0
    x = _input(seed=25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastres.FusionWarning)
        error = _same_error(lambda: fused(x), lambda: plain(x))
    assert isinstance(error, ValueError) and "eps" in str(error)
    plain.eval(), fused.eval()
    with torch.no_grad(), count_launches() as launches:
        _close("eval output", fused(x), plain(x))
    assert sum(launches.values()) == 2, dict(launches)  # eval with eps=0 is fused, as torch computes it


def test_input_smaller_than_the_kernel_gets_torchs_error():
    conv, bn = nn.Conv2d(3, 4, 3, bias=False).to(DEVICE), nn.BatchNorm2d(4).to(DEVICE)
    x = _input(3, size=2, seed=26)
    _same_error(lambda: fastres.functional.conv_bn_relu(x, conv, bn), lambda: torch.relu(bn(conv(x))))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: ref.ResidualBlock(4, 4), id="identity"),
    pytest.param(lambda: ref.ResidualBlock(4, 6, 2, ref.downsample(4, 6, 2)), id="downsample"),
    pytest.param(lambda: ref.ConvBNReLU(4, 6), id="stem"),
    pytest.param(lambda: ref.ResNet(ref.ResidualBlock, [1, 1], widths=(4, 6)), id="resnet"),
])
def test_meta_tensors_give_torchs_shapes(make):
    """Deferred initialisation and shape inference run modules on the meta device."""
    plain = make()
    fused = _fused(plain).to("meta")
    plain = plain.to("meta")
    channels = 3 if isinstance(plain, ref.ResNet) else 4
    x = torch.empty(2, channels, 6, 6, device="meta")
    for train in (True, False):
        plain.train(train), fused.train(train)
        out_p, out_f = plain(x), fused(x)
        assert out_f.device.type == "meta" and out_f.shape == out_p.shape and out_f.dtype == out_p.dtype


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_non_contiguous_views_in_both_modes(train):
    """A strided view (every other column) and a permuted one: the identity residual is read with the
    output's strides in eval, so another layout is copied into it; training reads it through its strides."""
    plain = _block(seed=27)
    fused = _fused(plain)
    wide = _input(size=10, seed=28)
    for x in (wide[:, :, :5, ::2], wide[:, :, :5, :5].transpose(2, 3)):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        _compare(plain, fused, x, train=train)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-path", "cpu-path"])
@pytest.mark.parametrize("case", ["bf16-input-fp32-weights", "fp32-input-bf16-bn"])
def test_mixed_dtypes_get_torchs_error_on_every_path(case, kernels):
    """Dtypes torch refuses together are refused on the kernel path as on the CPU path (code that runs on
    a GPU does not fail on a laptop); autocast, which casts them, runs fused."""
    if not kernels and DEVICE.type != "cpu":
        pytest.skip("the CPU path is the CPU's")
    plain = _block(seed=29)
    fused = _fused(plain)
    x = _input(seed=30)
    if case == "bf16-input-fp32-weights":
        x = x.bfloat16()
    else:
        plain.bn1.bfloat16(), fused.bn1.bfloat16()
    with oc.torch_path_on_cpu() if not kernels else warnings.catch_warnings():
        error = _same_error(lambda: fused(x), lambda: plain(x))
    assert isinstance(error, RuntimeError)


def test_autocast_casts_the_weights_and_runs_fused():
    plain = _block(seed=31)
    fused = _fused(plain)
    x = _input(seed=32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), count_launches() as launches:
        out = fused(x)
    assert out.dtype == torch.bfloat16 and sum(launches.values()) == 3, dict(launches)


CONFIGS = [
    pytest.param(lambda b: setattr(b, "bn1", nn.BatchNorm2d(4, affine=False)), "bn1 has no affine", id="affine-false"),
    pytest.param(lambda b: setattr(b, "conv2", nn.Conv2d(4, 4, 3, padding=1, bias=True)), "conv2 has bias=True",
                 id="conv-bias"),
    pytest.param(lambda b: setattr(b, "conv1", nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)),
                 "conv1 has groups=2", id="groups"),
    pytest.param(lambda b: setattr(b, "conv2", nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)),
                 "conv2 has dilation=(2, 2)", id="dilation"),
    pytest.param(lambda b: setattr(b, "conv2", nn.Conv2d(4, 4, (3, 1), padding=(1, 0), bias=False)),
                 "different for height and width", id="3x1"),  # any square kernel fuses (test_conv_block)
    pytest.param(lambda b: setattr(b, "conv1", nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)),
                 "padding_mode='reflect'", id="reflect-padding"),
    pytest.param(lambda b: setattr(b, "conv1", nn.Conv2d(4, 4, 3, padding="same", bias=False)), "padding='same'",
                 id="same-padding"),
]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-path", "cpu-path"])
@pytest.mark.parametrize("change,reason", CONFIGS)
def test_configurations_the_kernels_do_not_take_run_pytorchs_ops(change, reason, kernels):
    """What the kernels do not compute (no affine, a conv bias, groups, dilation, other kernel sizes and
    paddings) runs PyTorch's ops: torch's answer on the CPU path, and on the kernel path with a warning."""
    if not kernels and DEVICE.type != "cpu":
        pytest.skip("the CPU path is the CPU's")
    plain = _block(seed=33)
    torch.manual_seed(34)
    change(plain)
    plain = plain.to(DEVICE)
    fused = _fused(plain)
    x = _input(seed=35)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with oc.torch_path_on_cpu() if not kernels else count_launches() as launches:
            _compare(plain, fused, x, train=True)
            _compare(plain, fused, x, train=False)
    said = _fusion_warnings(record)
    if kernels:
        assert sum(launches.values()) == 0, dict(launches)
        assert len(said) == 1 and reason in said[0], said
    else:
        assert said == []  # nothing to say: the CPU path is PyTorch's ops anyway


@pytest.mark.parametrize("make_input", [
    pytest.param(lambda: _input()[0], id="rank-3"),
    pytest.param(lambda: _input(5), id="5-channels-for-4"),
    pytest.param(lambda: _input().long(), id="integer"),
    pytest.param(lambda: torch.randn(1, 4, 1, 1, device=DEVICE), id="one-value-per-channel"),
])
def test_inputs_the_kernels_do_not_take_get_torchs_error(make_input):
    plain = _block(seed=36)
    fused = _fused(plain)
    x = make_input()
    _same_error(lambda: fused(x), lambda: plain(x))


def test_empty_batch_gives_torchs_empty_output():
    plain = _block(seed=37)
    fused = _fused(plain)
    x = torch.randn(0, 4, 5, 5, device=DEVICE)
    for train in (True, False):
        plain.train(train), fused.train(train)
        out_p, out_f = plain(x), fused(x)
        assert out_f.shape == out_p.shape == (0, 4, 5, 5)
