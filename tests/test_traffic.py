"""The compulsory-traffic model (fastres.testing.traffic) and the guard on a
ResNet-20 training step's launch count and traffic against eager PyTorch."""

from __future__ import annotations

import pytest
import torch

from fastres import _backend
from fastres.models import resnet20
from fastres.optim import SGD
from fastres.reference import nn as ref
from fastres.testing import stub_launches
from fastres.testing import traffic as T

# Measured today (batch 512, 3x32x32, channels_last, fp32, planned for 132 SMs;
# `python -m fastres.testing.traffic`): 63 Triton launches + 15 aten ops = 78
# kernels, 4.243 GB against eager's 7.266 GB (0.584x; bf16 0.597x); a stride-1
# 3x3 conv's data and weight gradients share one launch that reads dY once.
# (Before that, planned for the interpreter's 8 SMs: 79 + 15, 0.687x, with a
# downsampling block's conv1 and projection sharing their forward and
# data-gradient launches; 83 + 15, 0.708x; and 146 + 39 = 185, 0.707x, before
# BatchNorm's finalizes and the split sums moved into the producing launches.)
# The goals are 110 kernels and 0.6x.
MAX_TRITON_LAUNCHES = 63
MAX_KERNELS_PER_STEP = 78  # Triton launches + the aten ops around them (pooling, classifier, loss, optimizer table upload)
MAX_TRAFFIC_RATIO = 0.590  # fastres bytes / eager bytes, whole step
# The modeled GPU time (fastres.testing.gpu_model, H200 constants; `python -m fastres.testing.traffic --time`),
# fp32 at batch 512: fastres 1.386 ms against eager's 2.089 ms (0.663; bf16 0.887 against 1.324 ms, 0.670),
# the worst serial tail 11.0 us (a first-stage fused-gradients launch's two-level weight-gradient sums; the
# stride-2 weight gradient's split sum, 11.8 us when one program summed its 30 slices, is 3.8 us up a tree).
# Issue 18's goals are 0.6 and no tail over 10 us or 10% of its launch: not met (README, "Modeled GPU time").
MAX_MODELED_RATIO = 0.67
MAX_SERIAL_TAIL_US = 11.5

needs_interpreter = pytest.mark.skipif(not _backend.INTERPRET, reason="learning roles needs Triton's interpreter")
CL = torch.channels_last


@pytest.fixture(scope="module")
def roles() -> T.LaunchRoles:
    return T.learn_launch_roles()


# --------------------------------------------------------------------------- the eager twin


def _op_traffic(fn) -> T.Traffic:
    with T.OpTraffic() as mode:
        fn()
    return mode.traffic


def test_op_traffic_counts_distinct_bytes_per_op():
    a, b = torch.randn(64, 32), torch.randn(64, 32)  # 8 KiB each
    out = torch.empty(64, 32)
    cases = [
        (lambda: a + b, T.Traffic(ops=1, read=16384, written=8192)),
        (lambda: a + a, T.Traffic(ops=1, read=8192, written=8192)),  # one distinct input
        (lambda: a.add_(b), T.Traffic(ops=1, read=16384, written=8192)),  # in place: a read and written
        (lambda: torch.add(a, b, out=out), T.Traffic(ops=1, read=16384, written=8192)),  # out= is not read
        (lambda: out.copy_(a), T.Traffic(ops=1, read=8192, written=8192)),  # copy_ does not read its target
        (lambda: a.t().reshape(-1), T.Traffic(ops=1, read=8192, written=8192)),  # the copy, not the views
        (lambda: a[:, :16].sum(), T.Traffic(ops=1, read=4096, written=4)),  # a strided slice: its elements only
        (lambda: a + torch.ones(32).expand(64, 32), T.Traffic(ops=2, read=8192 + 128, written=8192 + 128)),
        (lambda: (a.view(-1), a.t(), a.detach(), torch.empty(10), torch.zeros_like(a)), T.Traffic(ops=1, written=8192)),
    ]
    for i, (fn, expected) in enumerate(cases):
        assert _op_traffic(fn) == expected, f"case {i}"


def test_fake_eager_step_counts_what_a_real_step_does():
    """FakeTensorMode runs none of the arithmetic but dispatches the same ops and sizes."""
    fake = T.eager_step_traffic(2, 8, None)
    torch.manual_seed(0)
    model = ref.resnet20().to(memory_format=CL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x, y = torch.randn(2, 3, 8, 8).to(memory_format=CL), torch.randint(0, 10, (2,))
    real = T.training_step_traffic(model, optimizer, x, y)
    assert fake.components == real.components
    assert all(t.ops and t.bytes for t in real.components.values())


# --------------------------------------------------------------------------- launches


@needs_interpreter
def test_roles_explain_every_byte_they_were_learned_from(roles):
    assert roles.conflicts == []
    assert roles.unattributed == 0
    assert len(roles.roles) >= 15  # every conv, BN, elementwise and optimizer variant of the step


@needs_interpreter
@pytest.mark.slow
def test_roles_predict_every_launch_of_a_resnet20_step_exactly(roles):
    """Roles learned on the one-block-per-stage net at batch 2, 4x4 give, for every
    launch of a ResNet-20 training step at batch 3, 6x6 (forward, backward,
    optimizer step), the bytes the interpreter records."""
    torch.manual_seed(1)
    model = resnet20().to(memory_format=CL)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(3, 3, 6, 6).to(memory_format=CL), torch.randint(0, 10, (3,))
    with stub_launches():  # the optimizer's first step is special: record a later one
        T.train_step(model, optimizer, x, y, None)
    with T.record_launches() as records:
        T.train_step(model, optimizer, x, y, None)
    assert {r.kernel for r in records} >= {"_conv_kernel", "_conv_wgrad_kernel", "_sgd_kernel"}
    for i, record in enumerate(records):
        assert record.unattributed == 0, f"launch {i} {record.kernel}"
        assert roles.bytes_of(record.launch) == (record.read, record.written), f"launch {i} {record.kernel}"
    # the recording itself, against the optimizer's documented traffic: SGD with
    # momentum reads param, grad and buffer and writes param and buffer (fp32)
    n = sum(p.numel() for p in model.parameters())
    (sgd,) = [r for r in records if r.kernel == "_sgd_kernel"]
    assert sgd.written == 8 * n
    assert 12 * n < sgd.read < 12 * n + 8192  # + its two int64 tables


def test_recording_compiled_kernels_is_refused():
    if _backend.INTERPRET:
        pytest.skip("kernels are interpreted here")
    with pytest.raises(T.TrafficUnavailable, match="TRITON_INTERPRET=1"):
        with T.record_launches():
            model = resnet20().cuda()
            model(torch.randn(2, 3, 8, 8, device="cuda"))


# --------------------------------------------------------------------------- the guard


@needs_interpreter
def test_resnet20_step_launches_and_traffic_against_eager(roles):
    fused = T.fastres_step_traffic(roles, 512, 32, None)
    eager = T.eager_step_traffic(512, 32, None)
    total, eager_total = fused.total(), eager.total()
    assert total.launches <= MAX_TRITON_LAUNCHES
    assert total.kernels <= MAX_KERNELS_PER_STEP
    assert total.bytes / eager_total.bytes <= MAX_TRAFFIC_RATIO
    # what the model must see: every component moves memory, the activations dominate
    for name in T.COMPONENTS:
        assert fused.components[name].bytes > 0 and eager.components[name].bytes > 0
    assert fused.components["optimizer step"].launches == 1
    assert eager_total.bytes > 5e9
    # The modeled GPU time: every launch has one, the step is a guarded fraction of eager's, and no launch
    # ends with a long serial tail (the finalizes used to walk up to 256 dependent loads in one program).
    from fastres.testing import gpu_model as G

    assert len(total.times) == total.launches + total.ops and len(eager_total.times) == eager_total.ops
    fused_ms = sum(t.us(G.H200) for t in total.times) / 1e3
    eager_ms = sum(t.us(G.H200) for t in eager_total.times) / 1e3
    assert fused_ms / eager_ms <= MAX_MODELED_RATIO, (fused_ms, eager_ms)
    worst = max(total.times, key=lambda t: t.tail_us(G.H200))
    assert worst.tail_us(G.H200) <= MAX_SERIAL_TAIL_US, (worst.name, worst.tail_round_trips, worst.tail_bytes)


# --------------------------------------------------------------------------- the modeled GPU time


def test_gpu_model_counts_a_launch_and_a_finalize():
    """A launch costs launch_us + max(bytes, flops) time + its serial tail; a finalize over 8192 partials
    in groups of 128 walks 2 levels, in groups of 16 four, where one program over all walked 64 loads."""
    from fastres.testing import gpu_model as G

    m = G.H200
    t = G.LaunchTime("k", read=4_300_000, written=0, flops=0.0, compute="bf16", tail_round_trips=2, tail_bytes=100_000)
    assert t.body_us(m) == pytest.approx(1.0)
    assert t.tail_us(m) == pytest.approx(2 * m.l2_round_trip_us + 1.0)
    assert t.us(m) == pytest.approx(m.launch_us + 1.0 + t.tail_us(m))
    t.flops = 2 * m.tensor_flops_per_us["bf16"]  # compute-bound now: 2 us
    assert t.body_us(m) == pytest.approx(2.0)
    # ResNet-20's first-stage forward conv at batch 512: 8192 row tiles, groups of 128 (16 channels). The
    # finalize used to walk 2 x 8192 / 64 = 256 dependent loads in one program.
    trips, nbytes = G._finalize(8192, 128, 2 * 16 * 4)
    assert trips == 2 + 2  # a group: arrival and one load; the 64 groups: arrival and one load
    assert nbytes == 128 * 128 + 64 * 128
    # ResNet-18's (64 channels, groups of 16): 512, 32 and 2 groups, then the 2.
    trips, nbytes = G._finalize(8192, 16, 2 * 64 * 4)
    assert trips == 4 * 2 and nbytes == (16 + 16 + 16 + 2) * 512


def test_gpu_model_eager_conv_flops():
    """Eager convolution flops, forward and each gradient a backward computes, from the aten op's arguments."""
    from fastres.testing import gpu_model as G

    x, w = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 3, 3)
    out = torch.ops.aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    fwd = G.op_flops(torch.ops.aten.convolution.default, (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {}, out)
    assert fwd == 2 * out.numel() * 3 * 9
    args = (out, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    assert G.op_flops(torch.ops.aten.convolution_backward.default, args, {}, None) == 2 * fwd
    args = args[:-1] + ([False, True, False],)  # the stem: no input gradient
    assert G.op_flops(torch.ops.aten.convolution_backward.default, args, {}, None) == fwd
