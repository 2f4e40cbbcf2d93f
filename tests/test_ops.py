"""fastres as PyTorch operators (``torch.ops.fastres.*``, ``fastres/ops.py``).

* ``torch.library.opcheck`` on every op (schema and mutations, fake against real
  outputs, autograd registration, AOT dispatch with dynamic shapes), contiguous
  and channels_last, fp32 and bf16, training and eval;
* ``torch.compile(fullgraph=True)`` of a fastres ResNet: one graph, no break,
  and eager's outputs, gradients and running statistics;
* ``torch.export.export`` of an eval-mode fastres model.

On CPU the kernels run under the interpreter and the compiled graphs use the
"aot_eager" backend (Inductor's CPU backend needs a C++ toolchain and minutes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastres
from fastres import functional as F
from fastres import ops  # noqa: F401  (the ops are registered on import)

from optim_cases import DEVICE

CL = torch.channels_last
BACKEND = "inductor" if DEVICE.type == "cuda" else "aot_eager"
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _bn(channels: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
        bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
    return bn.to(DEVICE)


def _input(shape, dtype, memory_format, gen):
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype).to(memory_format=memory_format)
    return x.requires_grad_(True)


def _bn_args(bn: nn.BatchNorm2d) -> tuple:
    return F._bn_op_args(F._bn_config(bn, "test").args)


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_opcheck_conv_bn_relu(dtype, memory_format):
    gen = torch.Generator().manual_seed(1)
    conv_weight = (0.3 * torch.randn(5, 3, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    bn = _bn(5, gen)
    x = _input((2, 3, 5, 5), dtype, memory_format, gen)
    _opcheck(torch.ops.fastres.conv_bn_relu.default, (x, conv_weight, *_bn_args(bn), 2, 1))


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format), (torch.bfloat16, CL)])
def test_opcheck_conv_bn_relu_max_pool(dtype, memory_format):
    gen = torch.Generator().manual_seed(4)
    conv_weight = (0.3 * torch.randn(5, 3, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    bn = _bn(5, gen)
    x = _input((2, 3, 6, 4), dtype, memory_format, gen)
    _opcheck(torch.ops.fastres.conv_bn_relu.default, (x, conv_weight, *_bn_args(bn), 1, 1, None, 2))


@pytest.mark.parametrize("dtype, memory_format, residual", [
    (torch.float32, torch.contiguous_format, True), (torch.bfloat16, CL, False), (torch.float32, CL, True)])
def test_opcheck_conv_bn_relu_conv(dtype, memory_format, residual):
    """A pre-activation block's conv1 -> BN -> ReLU -> conv2 (+ residual): conv1 3x3 stride 2, conv2 1x1."""
    gen = torch.Generator().manual_seed(6)
    w1 = (0.3 * torch.randn(5, 3, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    w2 = (0.3 * torch.randn(4, 5, 1, 1, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    bn = _bn(5, gen)
    x = _input((2, 3, 7, 6), dtype, memory_format, gen)
    res = _input((2, 4, 4, 3), dtype, torch.contiguous_format, gen) if residual else None
    _opcheck(torch.ops.fastres.conv_bn_relu_conv.default, (x, w1, *_bn_args(bn), w2, 2, 1, 0, None, res))


@pytest.mark.parametrize("dtype, memory_format, down", [
    (torch.float32, torch.contiguous_format, False), (torch.bfloat16, CL, True), (torch.float32, CL, True)])
def test_opcheck_preact_block(dtype, memory_format, down):
    """A pre-activation block: identity (3x3 stride 1) or a 1x1 stride-2 projection of relu(bn0(x))."""
    gen = torch.Generator().manual_seed(7)
    cin, cout, stride = (3, 5, 2) if down else (4, 4, 1)
    w1 = (0.3 * torch.randn(cout, cin, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    w2 = (0.3 * torch.randn(cout, cout, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    wd = (0.3 * torch.randn(cout, cin, 1, 1, generator=gen)).to(DEVICE, dtype).requires_grad_(True) if down else None
    bn0, bn1 = _bn(cin, gen), _bn(cout, gen)
    x = _input((2, cin, 6, 5), dtype, memory_format, gen)
    _opcheck(torch.ops.fastres.preact_block.default,
             (x, *_bn_args(bn0), w1, *_bn_args(bn1), w2, wd, stride, 1, 1, 0))


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format), (torch.bfloat16, CL)])
def test_opcheck_bn_relu(dtype, memory_format):
    gen = torch.Generator().manual_seed(8)
    x = _input((2, 5, 3, 4), dtype, memory_format, gen)
    _opcheck(torch.ops.fastres.bn_relu.default, (x, *_bn_args(_bn(5, gen))))


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format), (torch.bfloat16, CL)])
def test_opcheck_conv_bn_without_relu(dtype, memory_format):
    gen = torch.Generator().manual_seed(9)
    conv_weight = (0.3 * torch.randn(5, 3, 1, 1, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    x = _input((2, 3, 5, 4), dtype, memory_format, gen)
    _opcheck(torch.ops.fastres.conv_bn_relu.default, (x, conv_weight, *_bn_args(_bn(5, gen)), 1, 0, None, 0, False))


def test_conv_bn_relu_rejects_a_pool_it_cannot_take():
    gen = torch.Generator().manual_seed(4)
    conv_weight = torch.randn(5, 3, 3, 3, generator=gen).to(DEVICE)
    bn = _bn(5, gen)
    for pool, shape in ((3, (2, 3, 6, 6)), (2, (2, 3, 5, 6))):
        x = _input(shape, torch.float32, torch.contiguous_format, gen)
        with pytest.raises(ValueError, match=r"pool must be 0 or 2 .* got pool=%d over \d+x\d+" % pool):
            torch.ops.fastres.conv_bn_relu(x, conv_weight, *_bn_args(bn), 1, 1, None, pool)
    with pytest.raises(ValueError, match="pool=2 needs relu=True"):
        torch.ops.fastres.conv_bn_relu(_input((2, 3, 6, 6), torch.float32, torch.contiguous_format, gen), conv_weight,
                                       *_bn_args(bn), 1, 1, None, 2, False)


def test_residual_block_rejects_after_relu_with_a_projection():
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(4, 4, 3, 3, generator=gen).to(DEVICE)
    wd = torch.randn(4, 4, 1, 1, generator=gen).to(DEVICE)
    bn1, bn2, bnd = _bn(4, gen), _bn(4, gen), _bn(4, gen)
    x = _input((2, 4, 5, 5), torch.float32, CL, gen)
    with pytest.raises(ValueError, match="after_relu=True takes a tensor or identity shortcut, not a projection"):
        torch.ops.fastres.residual_block(x, w1, *_bn_args(bn1), w1, *_bn_args(bn2), wd, *_bn_args(bnd), 1, None,
                                         1, 1, 0, None, None, True)


@pytest.mark.parametrize("dtype, memory_format, down", [
    (torch.float32, torch.contiguous_format, False), (torch.float32, CL, True),
    (torch.bfloat16, torch.contiguous_format, True), (torch.bfloat16, CL, False)])
def test_opcheck_residual_block(dtype, memory_format, down):
    gen = torch.Generator().manual_seed(2)
    cin, cout, stride = (3, 4, 2) if down else (4, 4, 1)
    w1 = (0.3 * torch.randn(cout, cin, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    w2 = (0.3 * torch.randn(cout, cout, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    bn1, bn2 = _bn(cout, gen), _bn(cout, gen)
    bn1.momentum = None  # the cumulative average: num_batches_tracked is read and written
    if down:
        wd = (0.3 * torch.randn(cout, cin, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
        down_args = (wd, *_bn_args(_bn(cout, gen)))
    else:
        down_args = (None,) * 7 + (0.0,)
    x = _input((2, cin, 5, 5), dtype, memory_format, gen)
    _opcheck(torch.ops.fastres.residual_block.default, (x, w1, *_bn_args(bn1), w2, *_bn_args(bn2), *down_args, stride))


@pytest.mark.parametrize("shortcut", ["residual", "down_input", "identity after relu", "residual after relu"])
def test_opcheck_residual_block_other_shortcuts(shortcut):
    """Issue 20's shortcuts: a tensor (its gradient returned) and a 1x1 stride-2 projection of another tensor
    than x (a bottleneck's block input; its gradient returned), conv1 1x1 with padding 0; x or a tensor added
    after the second ReLU (ResNet-9's residual)."""
    gen = torch.Generator().manual_seed(4)
    dtype = torch.float32
    w1 = (0.3 * torch.randn(4, 4, 1, 1, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    w2 = (0.3 * torch.randn(6, 4, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
    bn1, bn2 = _bn(4, gen), _bn(6, gen)
    x = _input((2, 4, 5, 5), dtype, CL, gen)
    if shortcut == "identity after relu":
        w2 = (0.3 * torch.randn(4, 4, 3, 3, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
        bn2 = _bn(4, gen)
        down_args, stride, extra = (None,) * 7 + (0.0,), 1, (None, None, True)
    elif shortcut.startswith("residual"):
        down_args, stride = (None,) * 7 + (0.0,), 1
        extra = (torch.randn(2, 6, 5, 5, generator=gen).to(DEVICE).to(memory_format=CL).requires_grad_(True), None,
                 shortcut.endswith("after relu"))
    else:
        wd = (0.3 * torch.randn(6, 3, 1, 1, generator=gen)).to(DEVICE, dtype).requires_grad_(True)
        down_args, stride = (wd, *_bn_args(_bn(6, gen))), 2
        extra = (None, _input((2, 3, 5, 5), dtype, CL, gen))
    _opcheck(torch.ops.fastres.residual_block.default,
             (x, w1, *_bn_args(bn1), w2, *_bn_args(bn2), *down_args, stride, None, 0, 1, 0, *extra))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_opcheck_eval(dtype, memory_format):
    gen = torch.Generator().manual_seed(3)
    conv_weight = (0.3 * torch.randn(4, 4, 3, 3, generator=gen)).to(DEVICE, dtype)
    bn = _bn(4, gen).eval()
    x = _input((2, 4, 5, 5), dtype, memory_format, gen).detach()
    residual = torch.randn(2, 4, 5, 5, generator=gen).to(DEVICE, dtype).to(memory_format=memory_format)
    for res, relu in ((None, True), (residual, True), (None, False)):
        _opcheck(torch.ops.fastres.conv_bn_eval.default,
                 (x, conv_weight, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps,
                  1, 1, res, relu))


def test_opcheck_backward_ops():
    """The backward ops on their own: schema (nothing mutated), fake against real outputs."""
    gen = torch.Generator().manual_seed(4)
    model = fastres.nn.ResidualBlock(3, 4, stride=2, downsample=fastres.reference.nn.downsample(3, 4, 2))
    model = model.to(DEVICE).to(memory_format=CL)
    x = _input((2, 3, 5, 5), torch.float32, CL, gen).detach()
    args = (x, model.conv1.weight, *_bn_args(model.bn1), model.conv2.weight, *_bn_args(model.bn2),
            model.downsample[0].weight, *_bn_args(model.downsample[1]), 2)
    with torch.no_grad():
        out, y1, s1, y2, s2, yd, sd = torch.ops.fastres.residual_block(*args)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)  # contiguous: autograd's grads need not be channels_last
    for input_grad in (True, False):
        bwd = (dout, x, model.conv1.weight.detach(), model.bn1.weight.detach(), model.bn1.bias.detach(), model.bn1.eps,
               y1, s1, model.conv2.weight.detach(), model.bn2.weight.detach(), y2, s2,
               model.downsample[0].weight.detach(), model.downsample[1].weight.detach(), yd, sd, 2, input_grad)
        torch.library.opcheck(torch.ops.fastres.residual_block_backward.default, bwd,
                              test_utils=("test_schema", "test_faketensor"))


def _small_resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # ResNet-8 (one block a stage): the stem, an identity block and two downsampling blocks, as in ResNet-20
    model = fastres.ResNet(layers=(1, 1, 1)).to(DEVICE).to(memory_format=CL)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return model


def _train_step(model, x, y):
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return out


@pytest.mark.slow
def test_resnet_compiles_fullgraph_with_eager_numbers():
    """torch.compile(fullgraph=True) of a fastres ResNet: two training steps and an eval
    forward give eager's outputs, every gradient and every buffer; dynamo sees one graph."""
    eager = _small_resnet(5)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=BACKEND)
    gen = torch.Generator().manual_seed(6)
    for step in range(2):
        x = torch.randn(3, 3, 6, 6, generator=gen).to(DEVICE).to(memory_format=CL)
        y = torch.randint(0, 10, (3,), generator=gen).to(DEVICE)
        out_eager = _train_step(eager, x, y)
        out_compiled = _train_step(compiled, x, y)
        torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}.grad: {m}")
    for (name, b), c in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    eager.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_dynamo_sees_one_graph_without_breaks():
    model = _small_resnet(7)
    x = torch.randn(2, 3, 4, 4).to(DEVICE).to(memory_format=CL)
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    calls = {str(node.target) for g in explanation.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert {"fastres.conv_bn_relu", "fastres.residual_block"} <= calls, calls


def test_export_of_an_eval_model():
    """torch.export of an eval-mode model: the fused eval op in the graph (under no_grad; with grad
    enabled eval-mode calls that need gradients take PyTorch's ops), eager's output."""
    model = _small_resnet(8).eval()
    x = torch.randn(2, 3, 6, 6).to(DEVICE).to(memory_format=CL)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        targets = {str(node.target) for node in exported.graph.nodes}
        assert "fastres.conv_bn_eval.default" in targets, targets
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_compiled_optimizer_step_gives_the_eager_step(name):
    """torch.compile(optimizer.step) does not break: it runs fastres's step (one launch) as it is."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(shape, generator=gen).to(DEVICE).requires_grad_(True) for shape in ((7,), (3, 5))]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    eager, compiled = (getattr(fastres.optim, name)(ps, **kwargs) for ps in (params, twins))
    compiled_step = torch.compile(compiled.step, backend=BACKEND)
    for _ in range(2):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            q.grad = p.grad.clone()
        eager.step()
        compiled_step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
