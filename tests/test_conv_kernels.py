"""Kernel-level paths of the conv launchers that the model-level tests do not choose by themselves.

* 64-bit offsets (``IDX64``): the launchers take them only when some tensor reaches 2**31 elements, far
  beyond test shapes, so the limit is lowered to force them.
* The phase-split data gradient of a strided conv: every output phase gets exactly its taps, also with
  odd sizes (phases of different sizes) and without padding.
"""

from __future__ import annotations

import pytest
import torch

from fastres.launchers import conv as L
from fastres.launchers.core import kernel_name
from fastres.testing import observe_launches

from optim_cases import DEVICE


def _clear_plans() -> None:
    for fn in (L._plan_conv, L._plan_wgrad, L._plan_tail):
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
    """The IDX64 variants of all four kernels (conv, data gradient, weight gradient, tail) against PyTorch."""
    from test_conv_block import _compare_training, _make_block

    block = _make_block(5, 8, 2, True, seed=11)
    x = torch.randn(2, 5, 7, 7, generator=torch.Generator().manual_seed(3))
    seen: dict[str, set] = {}

    def observe(kernel, grid, args, meta):
        seen.setdefault(kernel_name(kernel), set()).add(meta["IDX64"])

    with observe_launches(observe):
        _compare_training(None, block.to(DEVICE), x.to(DEVICE), torch.float32, memory_format=torch.channels_last)
    assert seen == {name: {True} for name in ("_conv_kernel", "_conv_wgrad_kernel", "_bn_relu_apply_kernel",
                                              "_bn_relu_backward_kernel")}


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
