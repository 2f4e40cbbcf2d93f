"""Kernel-level paths of the conv launchers that the model-level tests do not choose by themselves.

* 64-bit offsets (``IDX64``): the launchers take them only when some tensor reaches 2**31 elements, far
  beyond test shapes, so the limit is lowered to force them.
* The phase-split data gradient of a strided conv: every output phase gets exactly its taps, also with
  odd sizes (phases of different sizes) and without padding.
* The weight gradient's split sum (a binary tree over the splits): split counts that are not powers of
  two, and programs arriving in any order, which the interpreter (programs in grid order) never does.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
import triton
import triton.language as tl

from fastres.kernels.conv import _to_tf32
from fastres.launchers import conv as L
from fastres.launchers.core import kernel_name
from fastres.testing import observe_launches

from optim_cases import DEVICE


def _clear_plans() -> None:
    """Every cached launch plan (each launcher's, the fused gradients' too)."""
    for fn in vars(L).values():
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


@pytest.fixture
def int64_offsets(monkeypatch):
    monkeypatch.setattr(L, "INT32_LIMIT", 0)
    _clear_plans()
    yield
    _clear_plans()


def _data_grad(dy, w, stride, padding, out_hw, dtype):
    dx, _ = L.conv(dy, w, stride, padding, dtype=dtype, transposed=True, out_hw=out_hw)
    return dx


@pytest.mark.parametrize("size,stride,padding", [(7, 2, 1), (8, 2, 1), (9, 2, 0), (7, 3, 1)],
                         ids=["7x7-s2", "8x8-s2", "9x9-s2-nopad", "7x7-s3"])
def test_strided_data_gradient_by_phase_matches_pytorch(size, stride, padding):
    g = torch.Generator().manual_seed(size * 10 + stride)
    x = torch.randn(2, 5, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    ho = (size + 2 * padding - 3) // stride + 1
    dy = torch.randn(2, 6, ho, ho, generator=g, dtype=torch.float64)
    expected = torch.nn.grad.conv2d_input(x.shape, w, dy, stride=stride, padding=padding)
    fmt = torch.channels_last
    got = _data_grad(dy.float().to(DEVICE, memory_format=fmt), w.float().to(DEVICE, memory_format=fmt),
                     stride, padding, (size, size), torch.float32)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_int64_offsets_give_the_same_results(int64_offsets):
    """The IDX64 variants of all five kernels (conv, data gradient, weight gradient, both gradients, tail) against
    PyTorch."""
    from test_conv_block import _compare_training, _make_block

    block = _make_block(5, 8, 2, True, seed=11)
    x = torch.randn(2, 5, 7, 7, generator=torch.Generator().manual_seed(3))
    seen: dict[str, set] = {}

    def observe(kernel, grid, args, meta):
        seen.setdefault(kernel_name(kernel), set()).add(meta["IDX64"])

    with observe_launches(observe):
        _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32, memory_format=torch.channels_last)
    assert seen == {name: {True} for name in ("_conv_kernel", "_conv_wgrad_kernel", "_conv_grads_kernel",
                                              "_bn_relu_apply_kernel", "_bn_relu_backward_kernel")}


def test_offsets_are_32_bit_below_the_limit():
    _clear_plans()
    plan = L._plan_conv((512, 64, 32, 32), (65536, 1, 2048, 64), (64, 64, 3, 3), (576, 1, 192, 64), 1, 1, False,
                        None, torch.bfloat16, "cuda", False, L.PRO_NONE, L.EPI_STATS, False, False, False, True, False)
    assert plan.meta["IDX64"] is False
    # An element offset of 2**31 or more in one tensor (2**32 elements here): 64-bit.
    plan = L._plan_conv((4096, 64, 128, 128), (2**20, 1, 8192, 64), (64, 64, 3, 3), (576, 1, 192, 64), 1, 1,
                        False, None, torch.bfloat16, "cuda", False, L.PRO_NONE, L.EPI_STATS, False, False, False, True,
                        False)
    assert plan.meta["IDX64"] is True


# ----------------------------------------------------------------- both gradients in one launch


def _grads_reference(g, y2, coefs, x, w, x_stats, ey, ey_stats, bn_weight, residual):
    """float64 dX (through the epilogue), dW and the epilogue BN's backward of ``conv_grads``."""
    dy = g * coefs[0, None, :, None, None] + y2 * coefs[2, None, :, None, None] + coefs[1, None, :, None, None]
    xp = x if x_stats is None else torch.relu(x * x_stats[0, None, :, None, None] + x_stats[1, None, :, None, None])
    dx = torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1)
    dw = torch.nn.grad.conv2d_weight(xp, w.shape, dy, padding=1)
    bn = None
    if ey is not None:
        s = ey_stats[:, None, :, None, None]
        dx = dx * (ey * s[0] + s[1] > 0)
        x_hat = (ey - s[2]) * s[3]
        sum_g, sum_gx = dx.sum((0, 2, 3)), (dx * x_hat).sum((0, 2, 3))
        m = dx.numel() / dx.shape[1]
        coef_g = bn_weight * ey_stats[3]
        coef_y = -coef_g * ey_stats[3] * sum_gx / m
        bn = (torch.stack([coef_g, -coef_g * sum_g / m - coef_y * ey_stats[2], coef_y]), sum_gx, sum_g)
    if residual is not None:
        dx = dx + residual
    return dx, dw, bn


@pytest.mark.parametrize("n,k,c,h,w,channels_last,dtype,mode", [
    (2, 16, 16, 5, 7, True, torch.float32, "relu_grad"),  # conv2 of a block: BN+ReLU on X, ReLU mask on dX
    (1, 1, 1, 4, 4, False, torch.float32, "residual"),  # batch 1, one channel in and out, NCHW
    (3, 20, 33, 6, 5, True, torch.float32, "both_x"),  # three channel columns, C and K not multiples of 16
    (2, 8, 5, 16, 17, True, torch.float32, "residual"),  # more row tiles than programs
    (2, 64, 17, 3, 9, True, torch.bfloat16, "relu_grad"),  # the widest dY one tile takes
], ids=["block-conv2", "batch1-1ch-nchw", "odd-channels", "many-tiles", "k64-bf16"])
def test_conv_grads_matches_pytorch(n, k, c, h, w, channels_last, dtype, mode):
    """``conv_grads`` (dX and dW of a 3x3 stride-1 conv in one launch) against float64 PyTorch."""
    gen = torch.Generator().manual_seed(n * 1000 + k * 10 + c)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    g, y2, x, ey, residual = rand(n, k, h, w), rand(n, k, h, w), rand(n, c, h, w), rand(n, c, h, w), rand(n, c, h, w)
    wt = rand(k, c, 3, 3)
    coefs = rand(3, k)
    x_stats = torch.stack([rand(c), rand(c)]) if mode in ("relu_grad", "both_x") else None
    ey_stats = torch.stack([rand(c), rand(c), rand(c), rand(c).abs() + 0.5]) if mode == "relu_grad" else None
    bn_weight = rand(c)
    use_ey, use_res = mode == "relu_grad", mode in ("residual", "both_x")
    # The kernel sees the operands rounded to dtype: so does the reference.
    g, y2, x, ey, residual, wt = (t.to(dtype).double() for t in (g, y2, x, ey, residual, wt))
    expected = _grads_reference(g, y2, coefs, x, wt, x_stats, ey if use_ey else None, ey_stats, bn_weight,
                                residual if use_res else None)

    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def dev(t):
        t = t.to(DEVICE)
        return t.to(dtype, memory_format=fmt) if t.dim() == 4 else t.float()

    def run():
        bn = L.BatchNormArgs(dev(bn_weight), dev(bn_weight), None, None, None, None, 1e-5)
        return L.conv_grads(dev(g), dev(wt), dev(x), dy2=dev(y2), dy_pro=dev(coefs),
                            x_pro=None if x_stats is None else dev(x_stats),
                            epilogue=L.EPI_RELU_GRAD if use_ey else L.EPI_NONE, ey=dev(ey) if use_ey else None,
                            bn=bn if use_ey else None, stats=dev(ey_stats) if use_ey else None,
                            residual=dev(residual) if use_res else None)

    dx, extra, dw = run()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative to the largest value; bf16 rounds its output

    def close(got, want, what):
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= tol * max(want.abs().max().item(), 1e-12), f"{what}: max error {err:.3g}"

    close(dx, expected[0], "dx")
    close(dw, expected[1], "dW")
    assert dx.stride() == x.to(memory_format=fmt).stride() and dw.stride() == wt.to(memory_format=fmt).stride()
    if use_ey:
        coef_ref, dweight_ref, dbias_ref = expected[2]
        close(extra.packed, coef_ref, "BN backward coefficients")
        close(extra.dweight, dweight_ref, "BN weight grad")
        close(extra.dbias, dbias_ref, "BN bias grad")
    else:
        assert extra is None
    # Partials are summed in program order: a second launch gives the same bits.
    dx2, _, dw2 = run()
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2)


def test_conv_grads_rejects_what_it_cannot_take():
    dy, x = torch.randn(1, 65, 4, 4, device=DEVICE), torch.randn(1, 3, 4, 4, device=DEVICE)
    coefs = torch.randn(3, 65, device=DEVICE)
    with pytest.raises(ValueError, match=r"at most 64 output channels, got shape \(65, 3, 3, 3\)"):
        L.conv_grads(dy, torch.randn(65, 3, 3, 3, device=DEVICE), x, dy2=dy, dy_pro=coefs)
    with pytest.raises(ValueError, match=r"x has shape \(1, 3, 5, 4\)"):
        L.conv_grads(dy[:, :8], torch.randn(8, 3, 3, 3, device=DEVICE), torch.randn(1, 3, 5, 4, device=DEVICE),
                     dy2=dy[:, :8], dy_pro=coefs[:, :8])
    assert not L.grads_fusable(torch.empty(8, 3, 1, 1), 1, 0) and not L.grads_fusable(torch.empty(8, 3, 3, 3), 2, 1)


def test_tf32_follows_torchs_fp32_precision_switch():
    """torch's per-op precision API (``cudnn.conv.fp32_precision``) decides TF32 as cuDNN's convs see it;
    reading the legacy ``allow_tf32`` would raise once conv and RNN were set apart."""
    cudnn = torch.backends.cudnn
    if getattr(getattr(cudnn, "conv", None), "fp32_precision", None) is None:
        pytest.skip("this torch has no fp32_precision API")
    cuda = torch.device("cuda")  # dot_precision only reads the device's type
    old = cudnn.conv.fp32_precision
    try:
        cudnn.conv.fp32_precision = "ieee"
        with pytest.raises(RuntimeError):
            cudnn.allow_tf32  # what fastres used to read
        assert L.dot_precision(torch.float32, cuda) == "ieee"
        cudnn.conv.fp32_precision = "tf32"
        assert L.dot_precision(torch.float32, cuda) == "tf32"
        assert L.dot_precision(torch.bfloat16, cuda) == "ieee"
        assert L.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        cudnn.conv.fp32_precision = old


@triton.jit
def _tf32_round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _to_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_tf32_rounding_is_round_to_nearest_ties_away():
    """``_to_tf32`` keeps 10 mantissa bits, rounding to nearest with ties away from zero (cuDNN's
    ``cvt.rna.tf32.f32``), where the tensor cores alone would truncate; carries into the exponent;
    infinities and NaN unchanged. Checked against an exact integer model of the rounding."""
    specials = torch.tensor([1.0 + 2**-11, 1.0 + 2**-11 + 2**-23, 1.0 + 2**-11 - 2**-23, -(1.0 + 2**-11),
                             2.0 - 2**-23, 3.4028234663852886e38, -2.0**-130, float("inf"), -float("inf"),
                             float("nan"), 0.0, -0.0])
    x = torch.cat([specials, torch.randn(500, generator=torch.Generator().manual_seed(0)) * 1e3])
    x_d, out_d = x.to(DEVICE), torch.empty_like(x, device=DEVICE)
    _tf32_round_kernel[(1,)](x_d, out_d, x.numel(), BLOCK=512)
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    magnitude = bits & 0x7FFFFFFF
    rounded = ((magnitude + 0x1000) & 0x7FFFE000) | (bits & 0x80000000)
    finite = (bits & 0x7F800000) != 0x7F800000
    expected = torch.where(finite, rounded, bits).to(torch.int32)  # wraps to the same 32 bits
    got = out_d.cpu().view(torch.int32)
    same = (got == expected) | (got.view(torch.float32).isnan() & x.isnan())
    assert same.all(), (x[~same][:4], got.view(torch.float32)[~same][:4])
    assert got.view(torch.float32)[0] == 1.0 + 2**-10  # the tie rounds away from zero (truncation: 1.0)
    assert got.view(torch.float32)[6] == -2.0**-130  # a subnormal keeps its top 10 bits


@pytest.mark.parametrize("channels", [16, 64, 65, 80])
def test_fused_gradients_never_plan_a_second_wave(channels):
    """At most one persistent program per SM in all: with 65-80 input channels (5 columns of dX) the grid
    was cdiv(132, 5) * 5 = 135 programs on 132 SMs, three of them a second wave that doubles the launch."""
    _clear_plans()
    cl = lambda n, c, h, w: (h * w * c, 1, w * c, c)  # noqa: E731  (channels_last strides)
    dy_shape, x_shape = (512, 64, 16, 16), (512, channels, 16, 16)
    w_shape = (64, channels, 3, 3)
    plan = L._plan_grads(dy_shape, cl(*dy_shape), x_shape, cl(*x_shape), w_shape, cl(*w_shape), cl(*w_shape),
                         torch.bfloat16, "cuda", False, 132, 90, L.PRO_BN_RELU, L.EPI_RELU_GRAD, False)
    programs, n_cols = plan.grid
    assert n_cols == -(-channels // L.GRADS_BLOCK_N)
    assert programs * n_cols <= 132 and programs >= 1


def _bn_case(n, c, h, w, gen, channels_last=True, dtype=torch.float32, y=None):
    """Random y (channels_last) and its packed BatchNorm statistics (NaNs in y left out) and weight."""
    if y is None:
        y = torch.randn(n, c, h, w, generator=gen)
    y = y.to(DEVICE, dtype)
    if channels_last:
        y = y.to(memory_format=torch.channels_last)
    finite = y.float().nan_to_num(0.0)
    mean, var = finite.mean((0, 2, 3)), finite.var((0, 2, 3), unbiased=False)
    invstd = (var + 1e-5).rsqrt()
    weight = torch.rand(c, generator=gen).to(DEVICE) + 0.5
    bias = 0.1 * torch.randn(c, generator=gen).to(DEVICE)
    scale = weight * invstd
    stats = torch.stack([scale, bias - mean * scale, mean, invstd]).contiguous()
    return y, stats, weight


def _pool_case(n, c, h, w, channels_last, dtype, gen):
    """y with ties (a window of equal values, a window of zeros after the ReLU) and NaNs (one window with
    one NaN, one with two), and its packed BatchNorm statistics and weight."""
    y = torch.randn(n, c, h, w, generator=gen)
    y[0, 0, 0, :2] = y[0, 0, 1, :2] = 0.75  # four equal maxima: the first takes the gradient
    y[0, -1, -2:, -2:] = -3.0  # negative after BN (weight > 0): the ReLU's zeros tie
    y[-1, 0, -2, -1] = float("nan")
    y[-1, -1, 0, 0] = y[-1, -1, 1, 1] = float("nan")  # two NaNs: the last takes it, as torch's scan
    return _bn_case(n, c, h, w, gen, channels_last, dtype, y)


@pytest.mark.parametrize("n, c, h, w, channels_last, dtype", [
    (2, 3, 4, 6, True, torch.float32), (1, 1, 2, 2, False, torch.float32), (3, 70, 6, 2, True, torch.bfloat16),
    (2, 5, 4, 4, False, torch.bfloat16)])
def test_bn_relu_max_pool_matches_pytorch(n, c, h, w, channels_last, dtype):
    """The fused BN -> ReLU -> 2x2 max-pool and its backward against torch's ops on the kernels' own BN
    statistics: the pooled values exactly (both take the max of the same stored values), the gradient
    routed to the same window element (torch's first maximum, last NaN) and BatchNorm's sums."""
    gen = torch.Generator().manual_seed(n * 100 + c)
    y, stats, weight = _pool_case(n, c, h, w, channels_last, dtype, gen)
    out = L.bn_relu_apply(y, stats, pool=2)
    pre = y.float().detach().requires_grad_(True)
    act = torch.relu(pre * stats[0, :, None, None] + stats[1, :, None, None]).to(dtype)
    ref = torch.nn.functional.max_pool2d(act, 2)
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    dout = torch.randn(ref.shape, generator=gen).to(DEVICE, dtype)
    ref.backward(dout)
    g, coefs, _ = L.bn_relu_backward(dout, y, stats, weight, pool=2)
    g_ref = pre.grad / stats[0, :, None, None]  # the gradient at BN's output: d(pre) / scale
    assert g.stride() == y.stride()
    torch.testing.assert_close(g.float(), g_ref, rtol=1e-6, atol=1e-6)
    assert ((g.float() != 0) == (g_ref != 0)).all()  # the same element of each window
    torch.testing.assert_close(coefs.dbias, g_ref.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    xhat = (y.float() - stats[2, :, None, None]) * stats[3, :, None, None]  # NaN where y is: as torch's
    torch.testing.assert_close(coefs.dweight, (g_ref * xhat).sum((0, 2, 3)), rtol=1e-4, atol=1e-4, equal_nan=True)


@contextlib.contextmanager
def _programs_along_axis1_in(order):
    """The interpreter runs a launch's programs of each axis-0 index in ``order(n)`` along axis 1 (a list,
    a permutation of range(n)) instead of 0 .. n - 1: the arrivals a GPU may make."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.set_grid_idx
    builder.set_grid_idx = lambda x, y, z: original(x, order(builder.grid_dim[1])[y], z)
    try:
        yield
    finally:
        del builder.set_grid_idx


ORDERS = {
    "grid": lambda n: list(range(n)),
    "reversed": lambda n: list(range(n))[::-1],
    "shuffled": lambda n: random.Random(n).sample(range(n), n),
}


@pytest.mark.parametrize("n,c,k,size,kernel,stride,splits", [
    (3, 5, 12, 11, 1, 1, 12),  # 363 rows: one tile, 12 splits (a level with a node alone)
    (2, 3, 7, 19, 3, 2, 7),  # 3x3 stride 2, 200 rows: nine tiles of 7 splits
])
def test_split_weight_gradient_is_the_same_in_any_arrival_order(n, c, k, size, kernel, stride, splits):
    """Every split count and arrival order gives torch's weight gradient (float64 reference), and the same
    bits: the tree adds the same two sums at each node whichever sibling arrives later."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(n, c, size, size, generator=g).to(DEVICE).to(memory_format=torch.channels_last)
    weight = torch.randn(k, c, kernel, kernel, generator=g).to(DEVICE)
    padding = kernel // 2
    out = (size + 2 * padding - kernel) // stride + 1
    dy = torch.randn(n, k, out, out, generator=g).to(DEVICE).to(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), stride, padding)
    results = {}
    with L.planned_with(_num_sms=lambda device: 132):
        plan = L._plan_wgrad(tuple(dy.shape), dy.stride(), tuple(x.shape), x.stride(), tuple(weight.shape),
                             weight.stride(), stride, padding, x.dtype, x.device.type, False, 132, L.PRO_NONE,
                             L.PRO_NONE)
        assert plan.grid[1] == splits
        for name, order in ORDERS.items():
            with _programs_along_axis1_in(order):
                results[name] = L.conv_wgrad(dy, x, weight, stride, padding)
    for name, grad in results.items():
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert torch.equal(grad, results["grid"]), name


def test_row_kernels_with_partials_take_longer_tiles_while_every_sm_keeps_eight_programs():
    """The tail backward and the BatchNorm statistics grow their row tiles (fewer partials, a shorter
    finalize) only while a launch keeps TAIL_PARTIAL_PROGRAMS_PER_SM programs per SM."""
    def backward_plan(shape):
        return L._plan_tail(shape, 2, L.RES_TENSOR, True, 0, True, 132, (shape, (1, 1, 1, 1)))

    first = backward_plan((512, 64, 32, 32))  # ResNet-18's first stage, bf16: 256-row tiles, 2048 programs
    assert first.meta["BLOCK_M"] == 256 and first.grid == (2048, 1)
    second = backward_plan((512, 128, 16, 16))  # 128 rows: 256 would leave 1024 programs, under 8 x 132
    assert second.meta["BLOCK_M"] == 128 and second.grid == (1024, 2)
    last = backward_plan((512, 512, 4, 4))  # too few rows to grow: the elementwise kernels' 64-row tiles
    assert last.meta["BLOCK_M"] == L._tail_tiles(512, 2)[0] == 64
    assert L._plan_tail((512, 64, 32, 32), 2, L.RES_TENSOR, False, 0, True, 132,
                        ((512, 64, 32, 32), (1, 1, 1, 1))).meta["BLOCK_M"] == 64  # the apply writes no partials
    rows = L._plan_rows((512, 64, 32, 32), 2, True, 132, ((512, 64, 32, 32), (1, 1, 1, 1)))
    assert rows.meta["BLOCK_M"] == 256


@pytest.mark.parametrize("grown", [False, True], ids=["64-row-tiles", "256-row-tiles"])
def test_tail_backward_and_bn_statistics_match_pytorch_with_longer_tiles(grown, monkeypatch):
    """Longer row tiles (here two of 256 rows, the second partial, against seven of 64) give torch's
    BatchNorm sums and statistics: the per-thread sums run four times as many loop steps."""
    if grown:
        monkeypatch.setattr(L, "TAIL_PARTIAL_PROGRAMS_PER_SM", 0)
    _clear_plans()
    gen = torch.Generator().manual_seed(11)
    y, stats, weight = _bn_case(5, 64, 9, 9, gen)
    res, res_stats, res_weight = _bn_case(5, 64, 9, 9, gen)
    dout = torch.randn(y.shape, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    plan = L._plan_tail(tuple(y.shape), 4, L.RES_BN, True, 0, True, L._num_sms(y.device),
                        (tuple(y.shape), y.stride()), (tuple(res.shape), res.stride()),
                        (tuple(dout.shape), dout.stride()))
    assert plan.meta["BLOCK_M"] == (256 if grown else 64)
    g, coefs, res_coefs = L.bn_relu_backward(dout, y, stats, weight, residual=res, residual_stats=res_stats,
                                             residual_bn_weight=res_weight)

    def channel(v):
        return v[:, None, None]

    pre = y * channel(stats[0]) + channel(stats[1]) + res * channel(res_stats[0]) + channel(res_stats[1])
    clear = pre.abs() > 1e-5  # the kernel rounds the pre-activation its own way (fused multiply-adds)
    assert torch.equal(g[clear], torch.where(pre > 0, dout, 0.0)[clear])
    for c, t, st in ((coefs, y, stats), (res_coefs, res, res_stats)):  # the sums of the kernel's own g
        xhat = (t.double() - channel(st[2]).double()) * channel(st[3]).double()
        torch.testing.assert_close(c.dbias.double(), g.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.dweight.double(), (g.double() * xhat).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)

    bn = L.BatchNormArgs(weight, 0.1 * weight, None, None, None, 0.1, 1e-5)
    packed = L.bn_stats(y, bn)
    var, mean = torch.var_mean(y.double(), (0, 2, 3), unbiased=False)
    torch.testing.assert_close(packed[2].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[3].double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)
    _clear_plans()
