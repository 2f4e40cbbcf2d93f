"""NaN and Inf through the fused block and stem as through PyTorch (issue #19, item 1).

torch's ReLU keeps NaN (``relu(nan) = nan``; Triton's default ``tl.maximum`` is maxnum and gave 0), its
ReLU backward passes the gradient wherever the value is not ``<= 0`` (so at NaN too), and BatchNorm's
statistics of a batch holding NaN or Inf are NaN. A fused module must give the same NaN, +Inf and -Inf
positions as the plain module with the same weights, in every output, gradient and running statistic,
so that divergence stays visible (a NaN loss, GradScaler's inf checks, NaN running statistics showing in
eval outputs).

Each case puts one NaN or Inf in the input or in one conv weight (the centre tap, which every output
pixel reads; in eval also a corner tap, which reads the zero padding at the border) and compares the
fused module with the plain one in the same dtype: which elements are NaN, +Inf and -Inf must match
exactly, and the finite ones must agree within the dtype's tolerance. Training runs one forward and
backward (output, input gradient, every parameter gradient, every running statistic) and then eval mode
with the running statistics it left; eval mode on fresh statistics shows positions (a NaN input pixel
spreads to a 5x5 patch of one sample's output, not to the whole batch).
Shapes are tiny: the interpreter runs every kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastres
from fastres.reference import nn as ref

from optim_cases import DEVICE

# numpy (under the interpreter) says when it computes NaN: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# Finite elements: relative to the largest finite torch value (fp32 sums in another order; bf16 roundings).
RTOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
if DEVICE.type == "cuda":
    RTOL[torch.float32] = 5e-3  # TF32, as cuDNN

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# Where the NaN or Inf goes: one input pixel (sample 0, channel 1, row 2, column 2), or the centre tap of
# the first conv's weight [output 1, input 0].
KINDS = ["nan-input", "inf-input", "neginf-input", "nan-weight", "inf-weight"]
# Eval also puts it in a corner tap, which reads the zero padding at the border: torch computes 0 * NaN
# there (NaN), so masked loads must not skip that product.
EVAL_KINDS = KINDS + ["nan-cornerweight"]


def _value(kind: str) -> float:
    return {"nan": float("nan"), "inf": float("inf"), "neginf": float("-inf")}[kind.split("-")[0]]


def _randomize_bn(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def _block(down: bool) -> nn.Module:
    torch.manual_seed(11 if down else 12)
    block = ref.ResidualBlock(4, 6, 2, ref.downsample(4, 6, 2)) if down else ref.ResidualBlock(4, 4)
    _randomize_bn(block, 3)
    return block


def _stem() -> nn.Module:
    torch.manual_seed(13)
    stem = ref.ConvBNReLU(3, 5)
    _randomize_bn(stem, 4)
    return stem


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return model.conv1 if hasattr(model, "conv1") else model.conv


def _pair(plain: nn.Module, kind: str, dtype: torch.dtype):
    """(plain, fused) in ``dtype`` on DEVICE, with the weight corrupted for a ``*-weight`` kind."""
    plain = copy.deepcopy(plain).to(DEVICE, dtype)
    if kind.endswith("weight"):
        tap = 0 if "corner" in kind else 1
        with torch.no_grad():
            _first_conv(plain).weight[1, 0, tap, tap] = _value(kind)
    fused = fastres.convert(copy.deepcopy(plain))
    assert type(fused) is not type(plain)
    return plain, fused


def _input(channels: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(2, channels, 6, 6, generator=torch.Generator().manual_seed(5))
    if kind.endswith("input"):
        x[0, 1, 2, 2] = _value(kind)
    return x.to(DEVICE, dtype)


def _assert_same_nonfinite(name: str, fused: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> None:
    """The same NaN, +Inf and -Inf elements; the finite ones close."""
    assert fused.shape == plain.shape, (name, fused.shape, plain.shape)
    fused, plain = fused.detach().double().cpu(), plain.detach().double().cpu()
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        f, p = test(fused), test(plain)
        if not torch.equal(f, p):
            only_torch = (p & ~f).nonzero().tolist()
            only_fused = (f & ~p).nonzero().tolist()
            raise AssertionError(
                f"{name}: {what} at {int(p.sum())} of {p.numel()} elements in torch, {int(f.sum())} in fastres; "
                f"{len(only_torch)} only in torch (first {only_torch[:4]}), {len(only_fused)} only in fastres "
                f"(first {only_fused[:4]})")
    finite = torch.isfinite(plain)
    if finite.any():
        scale = plain[finite].abs().max().item() + 1e-30
        err = (fused[finite] - plain[finite]).abs().max().item() / scale
        assert err <= RTOL[dtype], f"{name}: finite elements differ by {err:.3g} of their scale {scale:.3g}"


def _train_step(model: nn.Module, x: torch.Tensor):
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device, out.dtype)
    out.backward(dout)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


def _compare_training_then_eval(plain: nn.Module, fused: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    (out_p, dx_p, grads_p, bufs_p), (out_f, dx_f, grads_f, bufs_f) = _train_step(plain, x), _train_step(fused, x)
    assert torch.isnan(out_p).any(), "the case puts no NaN in torch's output: it tests nothing"
    _assert_same_nonfinite("output", out_f, out_p, dtype)
    _assert_same_nonfinite("input grad", dx_f, dx_p, dtype)
    for name in grads_p:
        _assert_same_nonfinite(f"{name}.grad", grads_f[name], grads_p[name], dtype)
    for name in bufs_p:
        if name.endswith("num_batches_tracked"):
            assert bufs_f[name].item() == bufs_p[name].item() == 1, name
        else:
            _assert_same_nonfinite(name, bufs_f[name], bufs_p[name], dtype)
    plain.eval(), fused.eval()
    with torch.no_grad():  # the NaN running statistics show in eval outputs, as in torch
        _assert_same_nonfinite("eval output after training", fused(x), plain(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nan-input", "inf-input", "nan-weight"])  # Inf weights: eval below
@pytest.mark.parametrize("down", [False, True], ids=["identity", "downsample"])
def test_block_training_keeps_nan_and_inf(down, kind, dtype):
    plain, fused = _pair(_block(down), kind, dtype)
    _compare_training_then_eval(plain, fused, _input(4, kind, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", EVAL_KINDS)
@pytest.mark.parametrize("down", [False, True], ids=["identity", "downsample"])
def test_block_eval_keeps_nan_and_inf_positions(down, kind, dtype):
    """Eval mode, running statistics as loaded: a NaN or Inf stays local (conv neighbourhoods), so the
    positions, not only their presence, are compared."""
    plain, fused = _pair(_block(down), kind, dtype)
    plain.eval(), fused.eval()
    x = _input(4, kind, dtype)
    with torch.no_grad():
        out_p, out_f = plain(x), fused(x)
    nonfinite = ~torch.isfinite(out_p)
    assert nonfinite.any(), "the case puts no NaN or Inf in torch's output: it tests nothing"
    if kind.endswith("input"):
        assert not nonfinite[1].any(), "sample 1 never reads the NaN/Inf pixel of sample 0"
    _assert_same_nonfinite("eval output", out_f, out_p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nan-input", "nan-weight"])
def test_stem_keeps_nan_and_inf(kind, dtype):
    """``ConvBNReLU`` (the ResNet stem): training forward and backward, running statistics, then eval."""
    plain, fused = _pair(_stem(), kind, dtype)
    _compare_training_then_eval(plain, fused, _input(3, kind, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stem_eval_keeps_nan_positions(dtype):
    plain, fused = _pair(_stem(), "nan-input", dtype)
    plain.eval(), fused.eval()
    x = _input(3, "nan-input", dtype)
    with torch.no_grad():
        out_p, out_f = plain(x), fused(x)
    # One NaN pixel: the 3x3 neighbourhood in every channel of sample 0.
    assert int(torch.isnan(out_p).sum()) == 9 * 5
    _assert_same_nonfinite("eval output", out_f, out_p, dtype)


def test_one_nan_weight_gives_a_nan_loss_and_nan_running_statistics():
    """The issue's report, end to end on a small fused ResNet: one NaN conv weight, torch's loss is NaN, so
    must fastres's be, and its eval logits after the step (NaN running statistics) too."""
    torch.manual_seed(0)
    plain = ref.ResNet(ref.ResidualBlock, [1, 1], widths=(4, 4)).to(DEVICE)
    with torch.no_grad():
        plain.layer2[0].conv2.weight[0, 0, 1, 1] = float("nan")
    fused = fastres.convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = torch.tensor([1, 2], device=DEVICE)
    for model in (plain, fused):
        loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isnan(loss), type(model).__module__
        loss.backward()
        assert torch.isnan(model.layer2[0].bn2.running_mean).any()
        model.eval()
        with torch.no_grad():
            assert torch.isnan(model(x)).all(), type(model).__module__
