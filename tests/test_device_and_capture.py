"""Which device launches go to, and what a CUDA graph capture may share (issue #18, items 3, 6, 9).

What only a GPU shows (a second device, a real capture) is stood in for: the
device-index reads and ``torch.cuda.device`` of ``fastres.launchers.core`` are
replaced by fakes (a second device), and ``core.capturing`` by one that says a
capture is underway. Kernel bodies are skipped (``stub_launches``): these tests
check where launches go and which buffers they get, not numbers.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.launchers import core, multi_tensor, workspace
from fastres.launchers.core import observe_launches
from fastres.optim._base import FusedOptimizer
from fastres.testing import stub_launches

_Captured = workspace._CapturedWorkspace


# ------------------------------------------------------------------ a fake second device


class FakeDevices:
    """Tensors report CUDA device ``tensor_index``; ``current`` is the current device; ``entered`` lists
    the devices made current by the guard (``torch.cuda.device``), which sets ``current`` inside."""

    def __init__(self, tensor_index: int, current: int) -> None:
        self.tensor_index, self.current, self.entered = tensor_index, current, []

    @contextlib.contextmanager
    def device(self, index: int):
        self.entered.append(index)
        saved, self.current = self.current, index
        try:
            yield
        finally:
            self.current = saved


@pytest.fixture
def fake_devices(monkeypatch):
    def install(tensor_index: int, current: int) -> FakeDevices:
        fake = FakeDevices(tensor_index, current)
        monkeypatch.setattr(core, "_tensor_device", lambda t: fake.tensor_index)
        monkeypatch.setattr(core, "_current_device", lambda: fake.current)
        monkeypatch.setattr(core, "_device", fake.device)
        return fake

    return install


def _launch_devices(fake: FakeDevices, calls: list):
    """An observer recording the current (fake) device at each launch."""
    return observe_launches(lambda kernel, grid, args, meta: calls.append(fake.current))


def test_fused_ops_launch_on_the_tensors_device(fake_devices) -> None:
    """Forward and backward of both fused ops run with the tensors' device current: the guard is entered
    once per op call when another device is current, and not at all when the tensors' device is."""
    torch.manual_seed(0)
    block = fastres.nn.ResidualBlock(4, 4)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(4)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    fake = fake_devices(tensor_index=1, current=0)
    launches: list[int] = []
    with stub_launches(), _launch_devices(fake, launches):
        fastres.functional.conv_bn_relu(fastres.functional.residual_block(x, block), conv, bn).sum().backward()
    assert fake.entered == [1] * 4  # residual_block, conv_bn_relu, and their backward ops
    assert launches and set(launches) == {1}
    assert fake.current == 0  # restored

    fake = fake_devices(tensor_index=1, current=1)
    with stub_launches():
        fastres.functional.conv_bn_relu(x, conv, bn).sum().backward()
    assert fake.entered == []


def test_the_eval_op_launches_on_the_tensors_device(fake_devices) -> None:
    block = fastres.nn.ResidualBlock(4, 4).eval()
    fake = fake_devices(tensor_index=2, current=0)
    with torch.no_grad(), stub_launches():
        block(torch.randn(2, 4, 4, 4))
    assert fake.entered == [2] * 2  # conv_bn_eval: conv1, then conv2 with the identity residual


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_optimizer_buckets_launch_on_their_device(fake_devices, name) -> None:
    params = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 2))]
    for p in params:
        p.grad = torch.randn_like(p)
    fake = fake_devices(tensor_index=1, current=0)
    opt = getattr(fastres.optim, name)(params, lr=0.1)
    launches: list[int] = []
    with stub_launches(), _launch_devices(fake, launches):
        opt.step()
        opt.step()
    assert fake.entered == [1, 1] and launches == [1, 1]  # one bucket: one guard and one launch per step
    fake.current = 1
    with stub_launches():
        opt.step()
    assert fake.entered == [1, 1]  # already current: no guard


def test_clip_grad_norm_launches_on_the_grads_device(fake_devices) -> None:
    params = [nn.Parameter(torch.randn(7)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    fake = fake_devices(tensor_index=1, current=0)
    launches: list[int] = []
    with stub_launches(), _launch_devices(fake, launches):
        fastres.optim.clip_grad_norm_(params, 1.0)
    assert fake.entered == [1] and launches == [1, 1]


def test_cpu_tensors_never_ask_for_a_cuda_device(monkeypatch) -> None:
    """A CPU tensor's device index is -1: the guard asks nothing of torch.cuda (a CPU-only torch has no
    current device to ask)."""
    def no_cuda():
        raise AssertionError("asked for the current CUDA device")

    monkeypatch.setattr(core, "_current_device", no_cuda)
    with core.on_device_of(torch.zeros(1)):
        pass
    assert core.device_guarded(lambda t: 5)(torch.zeros(1)) == 5


# ------------------------------------------------------------------ workspaces


class _FakeWorkspace:
    def __init__(self, device):
        self.device = device


def test_eager_workspaces_are_keyed_on_the_launch_stream(monkeypatch) -> None:
    """One workspace per device and *current raw stream of that device* (what Triton launches on)."""
    streams = {1: 111}
    asked = []

    def raw_stream(index):
        asked.append(index)
        return streams[index]

    monkeypatch.setattr(workspace, "_launch_stream", raw_stream)
    monkeypatch.setattr(workspace, "_Workspace", _FakeWorkspace)
    monkeypatch.setattr(workspace, "_workspaces", {})
    monkeypatch.setattr(core, "capturing", lambda device: False)
    cuda1 = torch.device("cuda", 1)
    a = workspace._workspace(cuda1)
    assert workspace._workspace(cuda1) is a
    streams[1] = 222  # another stream made current on device 1
    b = workspace._workspace(cuda1)
    assert b is not a and asked == [1, 1, 1]
    streams[1] = 111
    assert workspace._workspace(cuda1) is a


@pytest.fixture
def captured_workspaces(monkeypatch):
    """Says a capture is underway; lists the workspaces the captured launches get."""
    made = []

    class Recorded(workspace._CapturedWorkspace):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(workspace, "_CapturedWorkspace", Recorded)
    monkeypatch.setattr(core, "capturing", lambda device: True)
    return made


def test_captured_launches_get_workspaces_of_their_own(monkeypatch, captured_workspaces) -> None:
    """During a capture every launch gets fresh partials and zeroed counters of exactly its sizes (from the
    graph's pool on a GPU), which fastres does not keep; the eager workspaces are neither used nor changed."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(core, "capturing", lambda device: False)
    eager = workspace._workspace(cpu)
    eager.partials(8), eager.counters(4)
    eager_buffers = (eager.scratch, eager.counter)
    monkeypatch.setattr(core, "capturing", lambda device: True)
    first, second = workspace._workspace(cpu), workspace._workspace(cpu)
    assert captured_workspaces == [first, second] and eager not in (first, second)
    p1, c1 = first.partials(10), first.counters(3)
    p2 = second.partials(10)
    assert p1.numel() == 10 and c1.numel() == 3 and c1.dtype == torch.int32 and not c1.any()
    assert p1.data_ptr() != p2.data_ptr()
    assert (eager.scratch, eager.counter) == eager_buffers
    refs = [weakref.ref(t) for t in (p1, c1, p2)]
    del first, second, p1, c1, p2
    captured_workspaces.clear()
    gc.collect()
    assert [r() for r in refs] == [None] * 3  # nothing left in the graph's pool that CUDA graph trees don't track
    monkeypatch.setattr(core, "capturing", lambda device: False)
    assert workspace._workspace(cpu) is eager


def test_a_captured_fused_block_shares_no_buffer_with_eager_launches(monkeypatch, captured_workspaces) -> None:
    """End to end through the op: no tensor a captured launch reads or writes lies in an eager workspace."""
    block = fastres.nn.ResidualBlock(4, 4)
    x = torch.randn(2, 4, 4, 4)
    monkeypatch.setattr(core, "capturing", lambda device: False)
    with stub_launches():
        block(x)  # eager: creates the CPU workspace
    eager = workspace._workspace(torch.device("cpu"))
    eager_storages = {eager.scratch.untyped_storage().data_ptr(), eager.counter.untyped_storage().data_ptr()}
    monkeypatch.setattr(core, "capturing", lambda device: True)
    storages = []

    def record(kernel, grid, args, meta):
        storages.extend(a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor))

    with stub_launches(), observe_launches(record):
        block(x)
    assert captured_workspaces  # the block's reductions took capture workspaces
    assert not eager_storages & set(storages)


# ------------------------------------------------------------------ optimizer tables


def _bucket(n=3, numel=5):
    params = [torch.randn(numel) for _ in range(n)]
    grads = [torch.randn(numel) for _ in range(n)]
    bufs = [torch.zeros(numel) for _ in range(n)]
    return params, grads, bufs


def test_tables_are_never_rebuilt_inside_a_capture(monkeypatch) -> None:
    params, grads, bufs = _bucket()
    cache = multi_tensor.TableCache()
    monkeypatch.setattr(core, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        cache.tables([params, grads, bufs], None, [True] * 3, 64)
    monkeypatch.setattr(core, "capturing", lambda device: False)
    cache.tables([params, grads, bufs], None, [False] * 3, 64)
    monkeypatch.setattr(core, "capturing", lambda device: True)
    new_grads = [g.clone() for g in grads]  # zero_grad(set_to_none=True) then backward inside the capture
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        cache.tables([params, new_grads, bufs], None, [False] * 3, 64)


def test_the_step_after_a_first_step_finds_its_tables_ready(monkeypatch) -> None:
    """SGD's first step sets first-step flags; the tables of the step after it are uploaded with it, so
    that step can be captured after one eager warm-up step, without an upload."""
    params, grads, bufs = _bucket()
    cache = multi_tensor.TableCache()
    first = cache.tables([params, grads, bufs], None, [True] * 3, 64)
    uploads = []
    monkeypatch.setattr(multi_tensor, "_to_device", lambda table, device: uploads.append(table) or table)
    monkeypatch.setattr(core, "capturing", lambda device: True)
    second = cache.tables([params, grads, bufs], None, [False] * 3, 64)
    assert uploads == []
    assert second is not first and second.captured
    assert second.tensor_table[:, multi_tensor.layout.FIRST_STEP.value].tolist() == [0, 0, 0]
    assert first.tensor_table[:, multi_tensor.layout.FIRST_STEP.value].tolist() == [1, 1, 1]


def test_tables_a_capture_read_outlive_the_cache(monkeypatch) -> None:
    """An eager step after the capture with new grads (zero_grad(set_to_none=True)) rebuilds the tables;
    the graph's stay alive, and the new ones have counters of their own."""
    params, grads, bufs = _bucket()
    cache = multi_tensor.TableCache()
    cache.tables([params, grads, bufs], None, [False] * 3, 64)
    monkeypatch.setattr(core, "capturing", lambda device: True)
    graphs = cache.tables([params, grads, bufs], None, [False] * 3, 64)
    assert graphs.captured and any(t is graphs for t in multi_tensor._captured_tables)
    refs = [weakref.ref(t) for t in (graphs.tensor_table, graphs.chunk_table, graphs.counters)]
    monkeypatch.setattr(core, "capturing", lambda device: False)
    eager = cache.tables([params, [g.clone() for g in grads], bufs], None, [False] * 3, 64)
    assert eager is not graphs and not eager.captured
    assert eager.counters.data_ptr() != graphs.counters.data_ptr()
    del graphs, cache, eager
    gc.collect()
    assert all(r() is not None for r in refs)


def test_eager_rebuilds_release_the_old_tables() -> None:
    """Without a capture, superseded tables are freed: new grads every step do not grow memory."""
    params, grads, bufs = _bucket()
    cache = multi_tensor.TableCache()
    kept_before = len(multi_tensor._captured_tables)
    refs = []
    for _ in range(4):
        grads = [g.clone() for g in grads]
        refs.append(weakref.ref(cache.tables([params, grads, bufs], None, [False] * 3, 64).tensor_table))
    gc.collect()
    assert [r() is not None for r in refs] == [False, False, False, True]
    assert len(multi_tensor._captured_tables) == kept_before


def test_sgd_with_momentum_is_capturable_after_one_warm_up_step(monkeypatch) -> None:
    params = [nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(2, 3))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fastres.optim.SGD(params, lr=0.1, momentum=0.9)
    with stub_launches():
        opt.step()  # warm-up
        monkeypatch.setattr(core, "capturing", lambda device: True)
        opt.step()  # "captured": no rebuild
    fresh = fastres.optim.SGD(params, lr=0.1, momentum=0.9)
    with stub_launches(), pytest.raises(RuntimeError, match="warm-up"):
        fresh.step()  # a first step inside a capture


# ------------------------------------------------------------------ the step tensor


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loaded", [None, 3, torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64)])
def test_the_step_is_made_on_the_device_without_a_host_copy(loaded) -> None:
    """A fill on the param's device (``meta`` stands in for CUDA): no copy from a host tensor, which on CUDA
    would block the host until the stream reached it."""
    p = torch.empty(4, device="meta")
    state = {} if loaded is None else {"step": loaded}
    with _Ops() as ops:
        step = FusedOptimizer._step_tensor(state, p)
    assert step.device == p.device and step.dtype == torch.float32 and step.shape == ()
    assert state["step"] is step
    fills = [c for c in ops.calls if c[0] is torch.ops.aten.full.default]
    reads = [c for c in ops.calls if c[0] is torch.ops.aten._local_scalar_dense.default]  # float(cpu step)
    assert len(fills) == 1 and len(fills) + len(reads) == len(ops.calls), [c[0] for c in ops.calls]
    assert fills[0][1][1] == (0.0 if loaded is None else 3.0)


# ------------------------------------------------------------------ Triton without knobs


def test_a_triton_without_knobs_takes_tritons_own_path(monkeypatch) -> None:
    import triton

    monkeypatch.delattr(triton, "knobs")
    monkeypatch.setattr(core, "_triton_path", 0)
    core._triton.cache_clear()
    try:
        assert core._triton().knobs is None
        assert core._triton_path == 1
    finally:
        core._triton.cache_clear()


def test_the_examples_graphed_step_captures_after_its_warm_up(monkeypatch, train_cifar) -> None:
    """examples/train_cifar.py's GraphedStep: three eager steps, then the captured one rebuilds nothing
    (its grads are zeroed in place), for SGD's first-step flags and Adam's device steps alike; the
    captured launches take private workspaces and the tables they read are kept."""
    for make in (lambda ps: fastres.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                 lambda ps: fastres.optim.Adam(ps, lr=1e-3)):
        torch.manual_seed(0)
        model = nn.Sequential(fastres.nn.ConvBNReLU(3, 4), fastres.nn.ResidualBlock(4, 4),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        optimizer = make(model.parameters())
        loss_fn = lambda out, y: nn.functional.cross_entropy(torch.nan_to_num(out), y)  # noqa: E731
        step = train_cifar.GraphedStep(model, loss_fn, optimizer, contextlib.nullcontext, warmup=3)
        step.x, step.y = torch.randn(2, 3, 4, 4), torch.tensor([1, 7])
        made = []
        monkeypatch.setattr(workspace, "_CapturedWorkspace", lambda device: made.append(device) or _Captured(device))
        with stub_launches():
            for _ in range(step.warmup):
                step._step()
            tables_before = len(multi_tensor._captured_tables)
            assert made == []
            monkeypatch.setattr(core, "capturing", lambda device: True)
            step._step()
            monkeypatch.setattr(core, "capturing", lambda device: False)
        assert len(multi_tensor._captured_tables) == tables_before + 1  # one bucket
        assert made  # the fused ops' reductions took capture workspaces
