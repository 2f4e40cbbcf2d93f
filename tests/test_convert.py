"""``fastres.convert`` on ResNets written in plain PyTorch (issue 20): the zoo of ``fastres/testing/zoo.py``.

Each model is converted and held to the plain model by the three-way rule of ``test_conv_block``
(outputs, every gradient and the running statistics over two steps, then eval outputs, against float64);
its ``state_dict`` keys stay the same, and a training step runs no aten convolution or batch norm for
what the report says was fused.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.testing import zoo
from fastres.testing import count_launches
from optim_cases import DEVICE
from test_conv_block import _compare_training, _randomize_bn

# What the report leaves unfused, by model (the rest must run no aten conv or batch norm).
UNFUSED = {
    "kuangliu_resnet18": 0,
    "option_a_resnet20": 0,
    "torchvision_style": 0,
    "resnet9": 0,
    # pre-activation: the stem conv (no BN after it)
    "preact_resnet18": 1,
    "bottleneck": 0,
}


@pytest.fixture
def no_onednn_on_cpu():
    """oneDNN's weight gradient of a 1x1 stride-2 conv on channels_last CPU tensors is wrong in about a third
    of runs under torch 2.13 (the same inputs, different results; PyTorch's own CPU convolution is right):
    for the tests whose fused side leaves such a conv to aten. Off on CPU, for both sides."""
    if DEVICE.type != "cpu":
        yield
        return
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = zoo.SMALL[name]()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    return model.to(DEVICE)


class _AtenConvBN(TorchDispatchMode):
    """Counts aten convolutions and batch norms (forward and backward), and 2-D max-pools apart."""

    NAMES = ("convolution", "batch_norm")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.max_pools = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(n in func.__name__ for n in self.NAMES):
            self.count += 1
        self.max_pools += func.__name__.startswith("max_pool2d")  # not adaptive_max_pool2d
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("no_onednn_on_cpu")
@pytest.mark.parametrize("name", list(zoo.SMALL))
def test_converted_zoo_model_matches_pytorch_and_runs_fastres_kernels(name):
    """Three-way parity over two steps and eval; the state_dict keys in their order, loading either way; the
    report's unfused modules are the only aten convolutions and batch norms of a training step."""
    model = _model(name)
    size = 16 if name == "resnet9" else 8  # ResNet-9 max-pools three times: 8x8 leaves BatchNorms 2 values each
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _compare_training(None, model, x, torch.float32, steps=2, memory_format=torch.channels_last)

    converted = fastres.convert(copy.deepcopy(model))
    assert list(converted.state_dict()) == list(model.state_dict())
    converted.load_state_dict(model.state_dict())
    model.load_state_dict(converted.state_dict())
    rows = converted.fastres_report
    assert len(rows) == sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    unfused = [row for row in rows if row.op is None]
    assert len(unfused) == UNFUSED[name], "\n".join(map(str, unfused))
    assert all(row.why for row in unfused)
    x = torch.randn(2, 3, size // 2, size // 2, device=DEVICE).to(memory_format=torch.channels_last)
    with count_launches() as launches, _AtenConvBN() as aten:
        converted(x).sum().backward()
    assert sum(launches.values()) > 0
    # Each unfused conv or BN is an aten op forward and one backward (the first conv: no input grad).
    assert aten.count <= 2 * len(unfused), aten.count
    assert (aten.count == 0) == (not unfused)
    assert aten.max_pools == 0  # ResNet-9's 2x2 max-pools run in the chains' BN-ReLU passes, both ways


def test_report_names_every_conv_and_batchnorm(capsys):
    model = _model("preact_resnet18")
    converted = fastres.convert(model, report=True)
    text = capsys.readouterr().out
    assert text.startswith("fastres.convert: 10 of 11 convs and BatchNorms fused")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            assert name in text
    assert "-> pre-activation block 'layers.1'" in text and "-> BN-ReLU" in text
    assert "conv1 " in text and "no BatchNorm2d alone takes its output" in text
    assert fastres.convert(converted) is converted  # a second convert changes nothing


def test_reference_classes_still_convert_in_place():
    from fastres.reference import nn as ref

    model = ref.resnet20()
    assert fastres.convert(model) is model and type(model) is fastres.ResNet
    assert all(row.op for row in model.fastres_report)


def test_untraceable_model_comes_back_as_it_is_with_the_reason():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # torch.fx cannot trace a branch on a tensor's value
                return torch.relu(self.bn(self.conv(x)))
            return x

    model = DataDependent()
    assert fastres.convert(model) is model
    assert all(row.op is None and "torch.fx cannot trace" in row.why for row in model.fastres_report)


def test_module_with_hooks_runs_whole_and_its_hooks_fire():
    model = _model("kuangliu_resnet18")
    seen = []
    model.layers[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    converted = fastres.convert(model)
    converted(torch.randn(2, 3, 4, 4, device=DEVICE))
    assert seen == [(2, 4, 4, 4)]
    unfused = {row.path for row in converted.fastres_report if row.op is None}
    assert "layers.0.conv1" in unfused and "layers.1.conv1" not in unfused


def test_sync_batchnorm_before_and_after_convert():
    """convert after convert_sync_batchnorm matches the SyncBatchNorms; convert_sync_batchnorm after convert
    replaces the modules the graph reads (by path, on every call). One process: they act as BatchNorm2d."""
    model = _model("torchvision_style")
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    expected = copy.deepcopy(model)(x)
    before = fastres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    after = nn.SyncBatchNorm.convert_sync_batchnorm(fastres.convert(copy.deepcopy(model)))
    for converted in (before, after):
        assert any(type(m) is nn.SyncBatchNorm for m in converted.modules())
        assert all(row.op for row in converted.fastres_report)
        torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)


def test_converted_model_under_torch_compile():
    model = _model("option_a_resnet20")
    converted = fastres.convert(copy.deepcopy(model))
    twin = copy.deepcopy(converted)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    x = torch.randn(2, 3, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    outs = []
    for m in (converted, compiled):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        outs.append((out, xi.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert isinstance(converted, torch.fx.GraphModule)


def test_ddp_wrapped_after_convert(tmp_path):
    """DistributedDataParallel around a converted model (one gloo rank in this process): outputs and
    gradients within twice the plain model's fp32 error of float64, plus 1e-5 of their scale."""
    import torch.distributed as dist

    model = _model("torchvision_style")
    plain, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(fastres.convert(model))
        outs = [m(xi) for m, xi in ((wrapped, x), (plain, x), (oracle, x.double()))]
        for out in outs:
            out.square().sum().backward()
    finally:
        dist.destroy_process_group()
    pairs = [("output", *outs)] + [(name, q.grad, p.grad, r.grad) for (name, p), q, r in
                                   zip(plain.named_parameters(), wrapped.module.parameters(), oracle.parameters())]
    for name, fused, eager, exact in pairs:
        bound = 2 * (eager.double() - exact).abs().max() + 1e-5 * exact.abs().max()
        assert (fused.double() - exact).abs().max() <= bound, name


class _PoolSpellings(nn.Module):
    """conv-BN-ReLU chains followed by max-pools spelled four ways: ``nn.MaxPool2d(2)``,
    ``F.max_pool2d(x, kernel_size=2, stride=2)``, ``torch.max_pool2d(x, 2)`` and a 3x3 pool the kernels do not
    fuse (its chain is fused, the pool stays aten)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = zoo.conv_bn(3, 4)
        self.pool = nn.MaxPool2d(2)
        self.b = zoo.conv_bn(4, 5)
        self.c = zoo.conv_bn(5, 6)
        self.d = zoo.conv_bn(6, 3)
        self.wide = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x):
        x = self.pool(self.a(x))
        x = torch.nn.functional.max_pool2d(self.b(x), kernel_size=2, stride=2)
        x = torch.max_pool2d(self.c(x), 2)
        return self.wide(self.d(x))


@pytest.mark.parametrize("size", [16, 12])
def test_max_pool_after_a_chain_fuses_however_spelled(size):
    """Three-way parity over two steps and eval. 16: every pool's input is even-sized and fuses (no aten
    max-pool in a training step but the 3x3 one, forward and backward); 12 gives a 3x3 ReLU output to the
    third pool, which floor mode crops: that one runs aten's pool after the fused chain."""
    torch.manual_seed(0)
    model = _PoolSpellings()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    model = model.to(DEVICE)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _compare_training(None, model, x, torch.float32, steps=2, memory_format=torch.channels_last)
    converted = fastres.convert(copy.deepcopy(model))
    ops = {row.path: row.op for row in converted.fastres_report}
    assert ops["a.0"] == ops["b.1"] == ops["c.0"] == "conv-BN-ReLU-max-pool chain"
    assert ops["d.0"] == "conv-BN-ReLU chain"
    with _AtenConvBN() as aten:
        converted(x.to(memory_format=torch.channels_last)).sum().backward()
    assert aten.count == 0
    assert aten.max_pools == (2 if size == 16 else 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resnet9_stage_fused_both_ways(dtype):
    """A ResNet-9 stage (conv-BN-ReLU, 2x2 max-pool, ``x + res2(res1(x))``) in fp32 and bf16 with odd widths,
    batch 1, NCHW: the pool and the post-ReLU join fused (the join is one residual-block op, no aten add),
    three-way parity over two steps and eval."""
    torch.manual_seed(3)
    model = nn.Sequential(zoo.conv_bn(3, 5), nn.MaxPool2d(2), zoo.Residual(5))
    _randomize_bn(model, torch.Generator().manual_seed(4))
    model = model.to(DEVICE)
    x = torch.randn(1, 3, 6, 10, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _compare_training(None, model, x, dtype, steps=2)
    converted = fastres.convert(copy.deepcopy(model)).to(dtype)
    assert {row.op for row in converted.fastres_report} == {"conv-BN-ReLU-max-pool chain", "residual join '2'"}
    with count_launches() as launches:
        converted(x.to(dtype)).sum().backward()
    assert launches["_bn_relu_apply_kernel"] == 2 and launches["_bn_relu_backward_kernel"] == 2


def test_gradient_penalty_through_a_post_relu_join():
    """create_graph=True through ResNet-9's residual (added after the ReLU): torch's second-order gradients."""
    torch.manual_seed(6)
    plain = zoo.Residual(4)
    _randomize_bn(plain, torch.Generator().manual_seed(7))
    plain = plain.to(DEVICE)
    _assert_same_second_order_grads(plain, fastres.convert(copy.deepcopy(plain)), (2, 4, 5, 5), seed=8)


def _assert_same_second_order_grads(plain: nn.Module, fused: nn.Module, shape: tuple, seed: int) -> None:
    """A gradient penalty (``create_graph=True``, then the squared input gradient's backward) gives the plain
    model's input and parameter gradients, to fp32's precision of each gradient's scale."""
    grads = []
    for model in (plain, fused):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE).requires_grad_(True)
        (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    for i, (f, p) in enumerate(zip(*grads)):
        assert (f - p).abs().max() <= 1e-5 * p.abs().max(), f"grad {i}"


class _ChainThenConv(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv (no add after it), then a pre-activation block with a projection, whose
    first BN therefore follows a conv (a chain: conv -> BN -> ReLU, the ReLU's output read by two convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                                  nn.Conv2d(5, 6, 1, bias=False))
        self.block = zoo.PreActBlock(6, 7, stride=2)

    def forward(self, x):
        return self.block(self.head(x))


@pytest.mark.usefixtures("no_onednn_on_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("part", ["head", "both"])
def test_chain_then_conv_fused_both_ways(dtype, part):
    """conv1 -> BN -> ReLU -> conv2 (a chain into a 1x1 conv; the pre-activation block's inner half with its
    residual sum in conv2's epilogue) as one op: three-way parity over two steps and eval, batch 1, odd
    sizes, NCHW; no aten conv or batch norm but the projection's."""
    torch.manual_seed(9)
    model = _ChainThenConv() if part == "both" else _ChainThenConv().head
    _randomize_bn(model, torch.Generator().manual_seed(10))
    model = model.to(DEVICE)
    x = torch.randn(1, 3, 7, 9, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    _compare_training(None, model, x, dtype, steps=2)
    converted = fastres.convert(copy.deepcopy(model)).to(dtype)
    ops = {row.path: row.op for row in converted.fastres_report}
    if part == "head":
        assert set(ops.values()) == {"conv-BN-ReLU-conv"}
    else:
        assert ops["head.0"] == ops["head.1"] == ops["head.3"] == ops["block.bn1"] == "conv-BN-ReLU chain"
        assert ops["block.conv1"] == ops["block.bn2"] == ops["block.conv2"] == "conv-BN-ReLU-conv + residual"
        assert ops["block.shortcut.0"] is None
    with _AtenConvBN() as aten:
        converted(x.to(dtype)).sum().backward()
    assert aten.count == (0 if part == "head" else 2)  # the projection's conv, forward and backward


def test_a_grouped_conv_after_a_chain_leaves_the_chain_fused_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False))
    rows = {row.path: row for row in fastres.convert(model).fastres_report}
    assert rows["0"].op == rows["1"].op == "conv-BN-ReLU chain"
    assert rows["3"].op is None and rows["3"].why == "it follows a conv-BN-ReLU chain, but 3 has groups=2"


class _InputNorm(nn.Module):
    """BatchNorm -> ReLU of the network input (no conv before it), then a pre-activation block with an
    identity shortcut written with ``F.relu`` and ``torch.add``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.block = zoo.PreActBlock(4, 4)

    def forward(self, x):
        return self.block(self.conv(self.relu(self.bn(x))))


def test_batchnorm_of_a_non_conv_input_fused():
    """A BN -> ReLU of the network input (``bn_relu``) and a pre-activation block with an identity shortcut
    (``preact_block``): three-way parity in fp32 over two steps and eval, batch 1, odd sizes, NCHW; no aten
    conv or batch norm but the 1x1 conv between them (no BN after it)."""
    torch.manual_seed(12)
    model = _InputNorm()
    _randomize_bn(model, torch.Generator().manual_seed(13))
    model = model.to(DEVICE)
    x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    _compare_training(None, model, x, torch.float32, steps=2)
    converted = fastres.convert(copy.deepcopy(model))
    ops = {row.path: row.op for row in converted.fastres_report}
    assert ops["bn"] == "BN-ReLU" and ops["conv"] is None
    assert {ops[k] for k in ("block.bn1", "block.conv1", "block.bn2", "block.conv2")} == {"pre-activation block 'block'"}
    with _AtenConvBN() as aten, count_launches() as launches:
        converted(x).sum().backward()
    assert aten.count == 2  # the 1x1 conv, forward and backward
    assert launches["_bn_stats_kernel"] == 2 and launches["_bn_grad_apply_kernel"] == 2


@pytest.mark.parametrize("part", ["bn_relu", "preact_block"])
def test_bf16_batchnorms_of_non_conv_inputs_are_as_accurate_as_torchs(part):
    """bf16: gradients through two BatchNorms of a few dozen pixels each are noise for torch too (its errors
    against float64 reach 16-46% on some seeds, the fused ops' as well, each the worse by turns), so one
    seed's three-way rule says little. Over 8 seeds, the fused error of every output and gradient is at
    most twice torch's in the median (measured: 0.8-1.0x for BN -> ReLU, 0.9-1.8x for the block, whose
    BN1 statistics come from the unrounded conv output)."""
    import statistics

    from test_conv_block import _run

    ratios: dict[str, list] = {}
    for seed in range(8):
        torch.manual_seed(seed)
        model = (nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Conv2d(3, 4, 1, bias=False))
                 if part == "bn_relu" else nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), zoo.PreActBlock(4, 4)))
        _randomize_bn(model, torch.Generator().manual_seed(seed + 100))
        model = model.to(DEVICE)
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed + 200)).to(DEVICE)
        converted = fastres.convert(copy.deepcopy(model))
        assert sum(row.op is not None for row in converted.fastres_report) == (1 if part == "bn_relu" else 4)
        fused = _run(converted.to(torch.bfloat16), x.to(torch.bfloat16), 2, 7)
        plain = _run(copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16), 2, 7)
        exact = _run(copy.deepcopy(model).double(), x.double(), 2, 7)
        items = [("output", fused[0], plain[0], exact[0]), ("input grad", fused[1], plain[1], exact[1])]
        items += [(name, fused[2][name], plain[2][name], exact[2][name]) for name in exact[2]]
        for name, f, p, e in items:
            scale = e.abs().max().item()
            err_f = (f.double() - e).abs().max().item() / scale
            err_p = (p.double() - e).abs().max().item() / scale
            ratios.setdefault(name, []).append(err_f / max(err_p, 1e-3))
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    assert all(m <= 2.0 for m in medians.values()), medians


def test_gradient_penalty_through_a_preact_block_and_a_bn_relu():
    """create_graph=True through the fused pre-activation block and BN -> ReLU: torch's second-order grads."""
    torch.manual_seed(15)
    plain = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), zoo.PreActBlock(3, 6, 2))
    _randomize_bn(plain, torch.Generator().manual_seed(16))
    plain = plain.to(DEVICE)
    fused = fastres.convert(copy.deepcopy(plain))
    assert all(row.op for row in fused.fastres_report)
    _assert_same_second_order_grads(plain, fused, (2, 3, 6, 6), seed=17)


def test_gradient_penalty_through_a_chain_into_a_conv_with_a_residual():
    """create_graph=True through conv_bn_relu_conv with a tensor residual (whose gradient is dout itself)."""
    torch.manual_seed(21)
    plain = _ChainThenConv()
    _randomize_bn(plain, torch.Generator().manual_seed(22))
    plain = plain.to(DEVICE)
    fused = fastres.convert(copy.deepcopy(plain))
    assert {row.op for row in fused.fastres_report} >= {"conv-BN-ReLU-conv + residual"}
    _assert_same_second_order_grads(plain, fused, (2, 3, 6, 6), seed=23)


class _ConvBNNoReLU(nn.Module):
    """conv -> BN with no ReLU after it, twice (a 1x1 stride-2 one), between other ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 1, stride=2, bias=False), nn.BatchNorm2d(5)

    def forward(self, x):
        # tanh between them: a BN whose every path to the output ends in a BN would have a zero bias gradient
        return torch.sigmoid(self.bn2(self.conv2(torch.tanh(self.bn(self.conv(x))))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_bn_without_relu_fused_both_ways(dtype):
    """A conv -> BN with no ReLU outside a residual join (``conv_bn_relu`` with ``relu=False``): three-way parity
    over two steps and eval, batch 1, odd sizes, NCHW; no aten conv or batch norm in a training step."""
    torch.manual_seed(18)
    model = _ConvBNNoReLU()
    _randomize_bn(model, torch.Generator().manual_seed(19))
    model = model.to(DEVICE)
    x = torch.randn(1, 3, 7, 5, generator=torch.Generator().manual_seed(20)).to(DEVICE)
    _compare_training(None, model, x, dtype, steps=2)
    converted = fastres.convert(copy.deepcopy(model)).to(dtype)
    assert {row.op for row in converted.fastres_report} == {"conv-BN chain"}
    with _AtenConvBN() as aten:
        converted(x.to(dtype)).sum().backward()
    assert aten.count == 0
