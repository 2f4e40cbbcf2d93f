"""Fused conv + BatchNorm + ReLU and the fused residual block against PyTorch.

Every comparison is three-way: the fused module, the plain PyTorch module in
the same dtype, and the plain module in float64 (the oracle). The rule
(flash-attention's): the fused error against float64 may be at most twice
PyTorch's own error in the same dtype, plus ``ATOL[dtype]`` of the value's
scale, on outputs, every gradient and the running statistics.

Shapes stress tails and strides: batch 1 and 3, 1/3/5 input channels, 8 and
17 output channels (not multiples of the 16-wide tiles), 7x7 and 8x8, stride
1 and 2, with and without downsample, both memory formats.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import fastres
from fastres.reference import nn as ref
from fastres.testing import count_launches, saved_tensor_bytes

from optim_cases import DEVICE

# Of the scale (max |float64 value|): fp32 GEMMs in another order, bf16/fp16 rounding of activations.
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# On a GPU fp32 convs use TF32 in both torch (cuDNN's default) and fastres.
if DEVICE.type == "cuda":
    ATOL[torch.float32] = 4e-3


def _randomize_bn(module: nn.Module, generator: torch.Generator) -> None:
    """BN weights and running statistics away from their 1/0 defaults, so mistakes show."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def _make_block(cin, cout, stride, downsample, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    proj = ref.downsample(cin, cout, stride) if downsample else None
    block = ref.ResidualBlock(cin, cout, stride, proj)
    _randomize_bn(block, generator)
    return block


def _check(name, fused, same_dtype, oracle, dtype):
    oracle = oracle.double()
    scale = oracle.abs().max().item() + 1e-30
    err_fused = (fused.double() - oracle).abs().max().item() / scale
    err_torch = (same_dtype.double() - oracle).abs().max().item() / scale
    bound = 2 * err_torch + ATOL[dtype]
    assert err_fused <= bound, (
        f"{name}: fused error {err_fused:.3g} (of scale {scale:.3g}) > 2 x torch's {err_torch:.3g} + {ATOL[dtype]:g}; "
        f"{int(((fused.double() - oracle).abs() > bound * scale).sum())} of {oracle.numel()} elements differ")


def _run(model, x, steps, grad_seed, train=True):
    """Forward/backward ``steps`` times; returns outputs, input grad, param grads (summed), buffers."""
    model.train(train)
    x = x.clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(grad_seed)
    outs = []
    for _ in range(steps):
        out = model(x)
        dout = torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
        out.backward(dout)
        outs.append(out.detach())
    return (torch.stack(outs), x.grad, {n: p.grad for n, p in model.named_parameters()},
            dict(model.named_buffers()))


def _compare_training(fused_model, plain_model, x, dtype, steps=2, memory_format=torch.contiguous_format):
    oracle = copy.deepcopy(plain_model).double()
    plain = copy.deepcopy(plain_model).to(dtype)
    fused = fastres.convert(copy.deepcopy(plain_model)).to(dtype) if fused_model is None else fused_model.to(dtype)
    xs = x.to(memory_format=memory_format)
    results = {"fused": _run(fused, xs.to(dtype), steps, 7), "torch": _run(plain, xs.to(dtype), steps, 7),
               "oracle": _run(oracle, xs.double(), steps, 7)}
    (out_f, dx_f, grads_f, bufs_f), (out_t, dx_t, grads_t, bufs_t), (out_o, dx_o, grads_o, bufs_o) = (
        results["fused"], results["torch"], results["oracle"])
    _check("output", out_f, out_t, out_o, dtype)
    _check("input grad", dx_f, dx_t, dx_o, dtype)
    for name in grads_o:
        _check(f"{name}.grad", grads_f[name], grads_t[name], grads_o[name], dtype)
    for name in bufs_o:
        if name.endswith("num_batches_tracked"):
            assert bufs_f[name].item() == bufs_o[name].item() == steps, name
        else:
            _check(name, bufs_f[name], bufs_t[name], bufs_o[name], dtype)
    # Eval mode with the running statistics just learned.
    for m in (fused, plain, oracle):
        m.eval()
    with torch.no_grad():
        _check("eval output", fused(xs.to(dtype)), plain(xs.to(dtype)), oracle(xs.double()), dtype)
    return fused


BLOCKS = [
    # batch, in, out, size, stride, downsample, memory format
    pytest.param(3, 5, 17, 7, 2, True, torch.channels_last, id="n3-c5-k17-7x7-s2-down-cl"),
    pytest.param(1, 8, 8, 8, 1, False, torch.contiguous_format, id="n1-c8-k8-8x8-s1-identity-nchw"),
    pytest.param(3, 3, 8, 8, 1, True, torch.contiguous_format, id="n3-c3-k8-8x8-s1-down-nchw"),
    pytest.param(2, 17, 17, 7, 1, False, torch.channels_last, id="n2-c17-k17-7x7-s1-identity-cl"),
    # One output channel: channels_last and contiguous strides differ only in that size-1 dimension.
    pytest.param(2, 3, 1, 6, 1, True, torch.channels_last, id="n2-c3-k1-6x6-s1-down-cl"),
]


@pytest.mark.parametrize("n,cin,cout,size,stride,down,memory_format", BLOCKS)
def test_residual_block_matches_pytorch_fp32(n, cin, cout, size, stride, down, memory_format):
    block = _make_block(cin, cout, stride, down, seed=cin * 100 + cout)
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(1))
    _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32, memory_format=memory_format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_residual_block_low_precision(dtype):
    block = _make_block(8, 16, 2, True, seed=3)
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    _compare_training(None, block.to(DEVICE), x.to(DEVICE), dtype, memory_format=torch.channels_last)


def test_residual_block_autocast_bf16():
    """Under autocast the fused block runs in bf16 with fp32 parameters and statistics, as eager does."""
    block = _make_block(8, 8, 1, False, seed=4).to(DEVICE)
    fused = fastres.convert(copy.deepcopy(block))
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE, memory_format=torch.channels_last)
    oracle = copy.deepcopy(block).double()
    outs, grads = [], []
    for model, inp, autocast in ((fused, x, True), (block, x, True), (oracle, x.double(), False)):
        inp = inp.clone().requires_grad_(True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(inp)
        out.float().sum().backward()
        outs.append(out)
        grads.append([inp.grad] + [p.grad for p in model.parameters()])
    # CUDA's autocast keeps BatchNorm in the input dtype (bf16 out), CPU's runs it in fp32; fused follows CUDA's.
    assert outs[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in fused.parameters())
    _check("autocast output", outs[0], outs[1], outs[2], torch.bfloat16)
    for i, (gf, gt, go) in enumerate(zip(*grads)):
        _check(f"autocast grad {i}", gf, gt, go, torch.bfloat16)
    _check("autocast running_var", fused.bn2.running_var, block.bn2.running_var, oracle.bn2.running_var, torch.bfloat16)


@pytest.mark.parametrize("down", [False, True], ids=["identity", "downsample"])
def test_momentum_none_is_a_cumulative_average(down):
    """72 channels in 2 x 6 x 6: two channel columns and two row tiles per launch, so several
    programs finalize BatchNorm's statistics in one launch and the last of them advances
    num_batches_tracked after all have read it; with a downsample, conv1's and the projection's
    BNs do so in one paired launch, each with its own counters."""
    block = _make_block(40 if down else 72, 72, 2 if down else 1, down, seed=5)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    x = torch.randn(2, 40 if down else 72, 11 if down else 6, 11 if down else 6,
                    generator=torch.Generator().manual_seed(4))
    _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32, steps=3)


@pytest.mark.parametrize("down", [False, True], ids=["identity", "downsample"])
def test_batchnorm_without_running_stats_uses_batch_statistics_always(down):
    """track_running_stats=False: batch statistics in training and eval, nothing to update."""
    block = ref.ResidualBlock(8, 8, 2, ref.downsample(8, 8, 2)) if down else ref.ResidualBlock(8, 8)
    for name in ("bn1", "bn2"):
        setattr(block, name, nn.BatchNorm2d(8, track_running_stats=False))
    if down:
        block.downsample[1] = nn.BatchNorm2d(8, track_running_stats=False)
    x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(6))
    _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32)


@pytest.mark.parametrize("cin,cout,size,stride,down,group,momentum", [
    pytest.param(8, 8, 14, 1, False, 2, 0.1, id="identity-groups-of-2"),
    pytest.param(8, 16, 24, 2, True, 2, 0.1, id="downsample-groups-of-2"),
    pytest.param(72, 72, 6, 1, False, 2, None, id="72ch-momentum-none-groups-of-2"),
])
def test_multi_level_reductions_match_pytorch(cin, cout, size, stride, down, group, momentum):
    """The in-launch reductions that run in levels: BatchNorm's statistics and backward sums (groups of
    ``group`` partials, then groups of the groups, ... : the 8-channel cases' 7 tiles take levels of 4, 2
    and 1; the 72-channel one, two column tiles and momentum=None, has 2 tiles, one level), the
    fused gradients' per-program weight-gradient sums (groups, then the groups: more of them than one load
    holds, so the second level loops). Planned as for 12 SMs, so the fused gradients run several programs
    per channel column and the weight gradients several splits. Default plans take one level at these
    sizes."""
    from fastres.launchers import conv as conv_launchers

    block = _make_block(cin, cout, stride, down, seed=cin + cout)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    x = torch.randn(2, cin, size, size, generator=torch.Generator().manual_seed(8))
    with conv_launchers.planned_with(_finalize_block_t=lambda n, c: group, _grads_group=lambda p: 2,
                                     _num_sms=lambda device: 12):
        _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32, steps=2,
                          memory_format=torch.channels_last)


STEMS = [
    pytest.param(2, 3, 16, 8, 1, id="n2-c3-k16-8x8-s1"),
    pytest.param(1, 1, 17, 7, 2, id="n1-c1-k17-7x7-s2"),
]


@pytest.mark.parametrize("n,cin,cout,size,stride", STEMS)
def test_conv_bn_relu_matches_pytorch(n, cin, cout, size, stride):
    torch.manual_seed(cout)
    plain = ref.ConvBNReLU(cin, cout, stride)
    _randomize_bn(plain, torch.Generator().manual_seed(cin))
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(5))
    fused = _compare_training(None, plain.to(DEVICE), x.to(DEVICE), torch.float32)
    assert type(fused) is fastres.nn.ConvBNReLU


def test_functional_conv_bn_relu_without_input_grad():
    """The stem's input needs no gradient: no data-gradient launch, and the same parameter grads."""
    torch.manual_seed(0)
    conv, bn = ref.conv3x3(3, 8).to(DEVICE), nn.BatchNorm2d(8).to(DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    out = fastres.functional.conv_bn_relu(x, conv, bn)
    with count_launches() as launches:
        out.sum().backward()
    assert "_conv_kernel" not in launches
    grads = [conv.weight.grad.clone(), bn.weight.grad.clone()]
    conv.weight.grad = bn.weight.grad = None
    bn.running_mean.zero_(), bn.running_var.fill_(1)
    torch.relu(bn(conv(x))).sum().backward()
    torch.testing.assert_close(grads[0], conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], bn.weight.grad, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_is_read_in_place():
    """A strided view (every other column) is read through its strides, with the same result."""
    block = _make_block(8, 8, 1, False, seed=6).to(DEVICE)
    fused = fastres.convert(copy.deepcopy(block))
    wide = torch.randn(2, 8, 7, 14, device=DEVICE)
    x = wide[:, :, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- launches and memory


@pytest.mark.parametrize("down,forward,backward", [(False, 3, 3), (True, 3, 5)], ids=["identity", "downsample"])
def test_block_launch_counts(down, forward, backward):
    """BatchNorm's finalizes and the weight gradients' split sums run inside the launches that
    produce their partials: one launch per conv forward and per tail; a stride-1 conv's data and
    weight gradients share one launch (``_conv_grads_kernel``); a downsampling block's conv1 and
    projection share one forward launch (x read once) and one data-gradient launch, and take
    separate weight-gradient launches."""
    block = fastres.convert(_make_block(8, 16 if down else 8, 2 if down else 1, down, seed=7)).to(DEVICE)
    x = torch.randn(2, 8, 8, 8, device=DEVICE, requires_grad=True)
    with count_launches() as launches:
        out = block(x)
    assert sum(launches.values()) == forward, dict(launches)
    with count_launches() as launches:
        out.sum().backward()
    assert sum(launches.values()) == backward, dict(launches)
    block.eval()
    with torch.no_grad(), count_launches() as launches:
        block(x)
    # One conv each: BN (scale and shift from the running statistics), residual and ReLU live in the epilogues.
    assert launches["_conv_kernel"] == (3 if down else 2) and sum(launches.values()) == (3 if down else 2)


def test_separate_grads_run_the_unfused_launches_with_the_same_gradients():
    """``separate_grads()`` (the lease runner's A/B of the fused gradient kernel) takes a data- and a
    weight-gradient launch per conv, and the gradients agree with the fused launches'."""
    from fastres.launchers import conv as conv_launchers

    block = fastres.convert(_make_block(8, 8, 1, False, seed=8)).to(DEVICE)
    x = torch.randn(2, 8, 6, 7, device=DEVICE).to(memory_format=torch.channels_last)
    grads = []
    for separate in (False, True):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = block(xi)
        with contextlib.ExitStack() as stack:
            if separate:
                stack.enter_context(conv_launchers.separate_grads())
            launches = stack.enter_context(count_launches())
            out.sum().backward()
        expected = {"_bn_relu_backward_kernel": 1, "_conv_kernel": 2, "_conv_wgrad_kernel": 2} if separate else \
            {"_bn_relu_backward_kernel": 1, "_conv_grads_kernel": 2}
        assert dict(launches) == expected
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    assert conv_launchers.grads_fusable(block.conv1.weight, 1, 1)  # restored after the block
    for fused, separate in zip(*grads):
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)


def test_weight_grads_keep_the_parameters_memory_format_and_are_deterministic():
    """channels_last weights get channels_last grads (autograd copies nothing); the split
    weight-gradient sums and BatchNorm reductions give bitwise the same grads every run."""
    block = fastres.convert(_make_block(16, 16, 1, False, seed=8)).to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_(True)
    runs = []
    for _ in range(2):
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).square().sum().backward()
        runs.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for p in block.parameters():
        assert p.grad.stride() == p.stride(), (p.shape, p.grad.stride(), p.stride())
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("down,bound", [(False, 0.61), (True, 0.75)], ids=["identity", "downsample"])
def test_block_saves_less_for_backward_than_eager(down, bound):
    """Eager keeps x, y1, relu(bn1(y1)), y2, (yd,) and the output; fused keeps x, y1, y2 (, yd).

    With a stride-2 downsample x is twice an output's size: 7 units against 5.
    """
    block = _make_block(8, 16 if down else 8, 2 if down else 1, down, seed=8).to(DEVICE)
    fused = fastres.convert(copy.deepcopy(block))
    x0 = torch.randn(2, 8, 8, 8, device=DEVICE, requires_grad=True)
    eager_bytes = saved_tensor_bytes(lambda: block(x0 * 1))
    fused_bytes = saved_tensor_bytes(lambda: fused(x0 * 1))
    assert 0 < fused_bytes <= bound * eager_bytes, (fused_bytes, eager_bytes)


# ----------------------------------------------------------------- errors


def _stem():
    return fastres.nn.ConvBNReLU(3, 8).to(DEVICE)


def _same_error(call_fused, call_plain):
    """Both raise the same exception type with the same message (the fused path runs PyTorch's ops for
    inputs the kernels do not take: tests/test_torch_answers.py)."""
    with pytest.raises(Exception) as plain_error:
        call_plain()
    with pytest.raises(Exception) as fused_error:
        call_fused()
    assert type(fused_error.value) is type(plain_error.value)
    assert str(fused_error.value) == str(plain_error.value)


def test_wrong_rank_gives_torchs_error():
    x = torch.randn(3, 8, 8, device=DEVICE)
    _same_error(lambda: _stem()(x), lambda: ref.ConvBNReLU(3, 8).to(DEVICE)(x))


def test_wrong_channel_count_gives_torchs_error():
    x = torch.randn(2, 5, 8, 8, device=DEVICE)
    _same_error(lambda: _stem()(x), lambda: ref.ConvBNReLU(3, 8).to(DEVICE)(x))


def test_unsupported_conv_in_block_runs_the_plain_forward():
    block = fastres.nn.ResidualBlock(8, 8).to(DEVICE)
    block.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False).to(DEVICE)
    x = torch.randn(2, 8, 8, 8, device=DEVICE)
    with pytest.warns(fastres.FusionWarning, match=r"conv2 has dilation=\(2, 2\)"):
        out = block(x)
    torch.testing.assert_close(out, ref.ResidualBlock.forward(block, x))


@pytest.mark.parametrize("k1,k2,kd", [(3, 5, 1), (1, 3, 3)], ids=["5x5-conv2-1x1-projection", "1x1-conv1"])
def test_block_with_other_kernel_sizes_is_fused(k1, k2, kd):
    """conv1 and conv2 of any size (padding keeping the size), a projection of another size than conv1
    (separate launches: conv_pair needs equal weights), all fused and matching PyTorch."""
    torch.manual_seed(k1 * 10 + k2)
    block = ref.ResidualBlock(4, 8, 2, nn.Sequential(nn.Conv2d(4, 8, kd, 2, kd // 2, bias=False), nn.BatchNorm2d(8)))
    block.conv1 = nn.Conv2d(4, 8, k1, 2, k1 // 2, bias=False)
    block.conv2 = nn.Conv2d(8, 8, k2, 1, k2 // 2, bias=False)
    _randomize_bn(block, torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastres.FusionWarning)
        with count_launches() as launches:
            _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32, steps=1,
                              memory_format=torch.channels_last)
    assert launches["_conv_kernel"] > 0


def test_one_value_per_channel_gives_torchs_error():
    x = torch.randn(1, 3, 1, 1, device=DEVICE)
    _same_error(lambda: _stem()(x), lambda: ref.ConvBNReLU(3, 8).to(DEVICE)(x))


def test_empty_batch_and_integer_input():
    """An empty batch gives torch's empty output; an integer input torch's error."""
    assert _stem()(torch.randn(0, 3, 8, 8, device=DEVICE)).shape == (0, 8, 8, 8)
    x = torch.ones(2, 3, 8, 8, dtype=torch.int64, device=DEVICE)
    _same_error(lambda: _stem()(x), lambda: ref.ConvBNReLU(3, 8).to(DEVICE)(x))


def test_mixed_devices():
    stem = _stem()
    stem.bn.running_var = torch.ones(8, device="meta")
    with pytest.raises(RuntimeError, match="running_var is on meta"):
        stem(torch.randn(2, 3, 8, 8, device=DEVICE))


def test_identity_block_needs_matching_shapes():
    with pytest.raises(ValueError, match="identity residual needs stride 1"):
        fastres.nn.ResidualBlock(8, 16)


# ----------------------------------------------------------------- state dicts


def test_state_dicts_load_either_way():
    plain = ref.ResidualBlock(8, 16, 2, ref.downsample(8, 16, 2))
    fused = fastres.nn.ResidualBlock(8, 16, 2, fastres.nn.downsample(8, 16, 2))
    assert list(plain.state_dict()) == list(fused.state_dict())
    assert [k for k in plain.state_dict() if k.startswith("downsample")] == [
        "downsample.0.weight", "downsample.1.weight", "downsample.1.bias", "downsample.1.running_mean",
        "downsample.1.running_var", "downsample.1.num_batches_tracked"]
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())


def test_block_under_torch_compile():
    """torch.compile(fullgraph=True) of a fused block (its op in the graph): same numbers, running
    statistics and grads. On CPU the compiled graph uses the "aot_eager" backend (no C++ toolchain needed)."""
    block = fastres.convert(_make_block(8, 8, 1, False, seed=9)).to(DEVICE)
    twin = copy.deepcopy(block)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    x = torch.randn(2, 8, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    outs = []
    for model in (block, compiled):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().sum().backward()
        outs.append((out, xi.grad, block.conv1.weight.grad if model is block else twin.conv1.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.bn2.running_var, block.bn2.running_var)
