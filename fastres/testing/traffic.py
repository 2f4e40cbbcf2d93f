"""Compulsory memory traffic of a training step: fastres launches and eager aten ops.

The model: each Triton launch, and each aten op, reads every distinct byte it
loads once and writes every distinct byte it stores once (caches, re-reads
inside a launch and spills are free; an in-place op reads and writes). It is a
floor for what the GPU must move, the same for fastres and for eager PyTorch.

* :func:`record_launches` runs kernels under Triton's interpreter and records
  the exact distinct bytes each launch loads and stores, by wrapping the
  interpreter's memory operations. Each touched byte is attributed to the
  launch's tensor arguments, or to a live tensor whose address an int64
  argument holds (the optimizers' pointer tables).
* :class:`LaunchRoles` learns from such records, per kernel and constexpr
  specialisation (tile sizes aside) and argument dtypes, what fraction of each
  argument a launch reads and writes. It then counts a launch from its
  arguments alone, so a full-size step runs with
  :func:`~fastres.testing.stub_launches` in a fraction of a second.
* :class:`OpTraffic` is the eager twin, a ``TorchDispatchMode``: per aten op,
  the distinct bytes of its tensor inputs (read) and of its new outputs
  (written). Views and allocations are free; in-place ops read and write
  their mutated arguments; ``copy_``/``fill_``/``zero_`` only write.

``python -m fastres.testing.traffic`` prints the report: launches and bytes
per component of a ResNet-20 training step, fastres against eager.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..launchers.core import kernel_name, observe_launches, stub_launches
from .gpu_model import (H200, LaunchTime, conv_launch, named_arguments, op_compute, op_flops, per_kernel,
                        summary_line)

__all__ = [
    "LaunchRecord", "LaunchRoles", "OpTraffic", "Traffic", "TrafficMeter", "TrafficUnavailable",
    "learn_launch_roles", "record_launches", "train_step", "training_step_traffic",
]


class TrafficUnavailable(RuntimeError):
    """Exact recording needs kernels under Triton's interpreter (a version whose memory operations we know)."""


@dataclasses.dataclass
class Traffic:
    """Launches, aten ops and distinct bytes of one component of a step."""

    launches: int = 0  # Triton launches
    ops: int = 0  # aten ops that move memory (views and allocations are not counted)
    read: int = 0
    written: int = 0
    times: list = dataclasses.field(default_factory=list, compare=False, repr=False)  # gpu_model.LaunchTime of each launch and op

    @property
    def kernels(self) -> int:
        """What a GPU launches: Triton launches plus one per aten op that moves memory."""
        return self.launches + self.ops

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def add(self, other: "Traffic") -> None:
        self.launches += other.launches
        self.ops += other.ops
        self.read += other.read
        self.written += other.written
        self.times += other.times


# --------------------------------------------------------------------------- regions of memory


@dataclasses.dataclass(frozen=True)
class Region:
    """The bytes of one tensor: addresses [start, start + span), ``size`` distinct bytes."""

    start: int
    span: int
    size: int


def tensor_region(t: torch.Tensor, start: Optional[int] = None) -> Region:
    """``t``'s bytes; expanded (stride-0) dimensions hold no extra bytes."""
    item = t.element_size()
    if t.numel() == 0:
        return Region(t.data_ptr() if start is None else start, 0, 0)
    span = (sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1) * item
    size = math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * item
    return Region(t.data_ptr() if start is None else start, span, size)


def _live_tensor_regions() -> dict[int, Region]:
    """Every live CPU/CUDA tensor's region, by start address (the widest tensor at an address).

    Pointer tables hold raw addresses; this is how a pointer finds its tensor.
    """
    regions: dict[int, Region] = {}
    for obj in gc.get_objects():
        # issubclass(type(...)): isinstance would ask each object for its __class__
        if issubclass(type(obj), torch.Tensor) and obj.layout == torch.strided and obj.device.type in ("cpu", "cuda"):
            try:
                region = tensor_region(obj)
            except (RuntimeError, NotImplementedError):  # fake/meta tensors, storage-less wrappers
                continue
            if region.start and region.span > regions.get(region.start, Region(0, -1, 0)).span:
                regions[region.start] = region
    return regions


# A slot is where a launch names memory: ("arg", i) for tensor argument i, or
# ("table", i, column) for the tensors whose addresses int64 argument i holds in
# that column (the last dimension's index).
Slot = tuple


@dataclasses.dataclass
class _Launch:
    """One launch as its arguments describe it: its key and the regions of its slots."""

    kernel: str
    key: tuple
    slots: list[tuple[Slot, Region]]

    def groups(self) -> dict[tuple[int, int], tuple[Region, list[Slot]]]:
        """Slots that name the same bytes (aliases such as an output passed twice) form one group."""
        groups: dict[tuple[int, int], tuple[Region, list[Slot]]] = {}
        for slot, region in self.slots:
            if region.span:
                groups.setdefault((region.start, region.span), (region, []))[1].append(slot)
        return groups


_TILE_PREFIXES = ("BLOCK", "SUB_", "num_warps", "num_stages", "num_ctas", "maxnreg")


def _launch_key(kernel: Any, args: tuple, meta: dict) -> tuple:
    """(kernel, constexprs other than tile sizes, argument dtypes): the specialisation
    whose roles carry over from a small problem to a large one (tile sizes follow
    the problem size; they change how memory is cut, not which memory is touched)."""
    constexprs = tuple(sorted((k, v) for k, v in meta.items() if not k.startswith(_TILE_PREFIXES)))
    dtypes = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
    return (kernel_name(kernel), constexprs, dtypes)


def _pointer_values(t: torch.Tensor) -> list[tuple[int, int]]:
    """(column, value) of an int64 argument that may be a pointer table; [] when none looks like an address."""
    if t.dtype != torch.int64 or t.numel() == 0 or t.numel() > 1 << 16 or t.device.type != "cpu":
        return []
    columns = t.shape[-1] if t.dim() >= 1 else 1
    values = t.reshape(-1).tolist()
    if max(values) < 1 << 16:
        return []
    return [(i % columns, v) for i, v in enumerate(values)]


def _describe(kernel: Any, args: tuple, meta: dict, tables: Optional[set[int]] = None) -> _Launch:
    """Regions of the tensor arguments and, for int64 arguments in ``tables`` (all when
    None), of the live tensors their values point at."""
    slots: list[tuple[Slot, Region]] = []
    registry = None
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        slots.append((("arg", i), tensor_region(a)))
        if tables is not None and i not in tables:
            continue
        pointers = _pointer_values(a)
        if pointers:
            registry = _live_tensor_regions() if registry is None else registry
            slots += [(("table", i, column), registry[v]) for column, v in pointers if v in registry]
    return _Launch(kernel_name(kernel), _launch_key(kernel, args, meta), slots)


# --------------------------------------------------------------------------- exact recording


@dataclasses.dataclass
class LaunchRecord:
    """The exact distinct bytes one interpreted launch read and wrote."""

    kernel: str
    key: tuple
    read: int
    written: int
    unattributed: int  # touched bytes outside every argument and pointed-at tensor
    launch: _Launch = dataclasses.field(repr=False)
    touched: tuple[np.ndarray, np.ndarray] = dataclasses.field(repr=False)  # sorted byte addresses


def _interpreter_builder_class() -> Any:
    """The interpreter's builder class with the memory operations this module wraps."""
    try:
        from triton.runtime import interpreter
    except ImportError as exc:
        raise TrafficUnavailable(f"record_launches: Triton's interpreter cannot be imported ({exc})") from exc
    builder = getattr(interpreter, "InterpreterBuilder", None)
    missing = [name for name in _WRAPPED if builder is None or not hasattr(builder, name)]
    if missing:
        import triton
        raise TrafficUnavailable(f"record_launches: triton {triton.__version__}'s interpreter has no "
                                 f"InterpreterBuilder.{', '.join(missing)}; exact recording knows triton 3.x's")
    return builder


def _element_size(ptr_handle: Any) -> int:
    ty = ptr_handle.get_element_ty()
    if getattr(ty, "is_ptr", lambda: False)():
        return 8
    return ty.primitive_bitwidth // 8


class _Accesses:
    """Addresses one launch touched: (addresses, element size) pieces for reads and writes."""

    def __init__(self) -> None:
        self.reads: list[tuple[np.ndarray, int]] = []
        self.writes: list[tuple[np.ndarray, int]] = []

    def add(self, ptrs: Any, mask: Any, read: bool, write: bool) -> None:
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
        piece = (addresses.reshape(-1), _element_size(ptrs))
        if read:
            self.reads.append(piece)
        if write:
            self.writes.append(piece)

    @staticmethod
    def distinct(pieces: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """Sorted distinct byte addresses."""
        if not pieces:
            return np.empty(0, dtype=np.uint64)
        return np.unique(np.concatenate([(a[:, None] + np.arange(k, dtype=np.uint64)).reshape(-1) for a, k in pieces]))


def _wrappers(accesses: Callable[[], Optional[_Accesses]]) -> dict[str, Callable]:
    """Replacements for the builder's memory operations that note the addresses first."""
    def note(read: bool, write: bool, ptr_at: int, mask_at: Optional[int]):
        def wrap(original: Callable) -> Callable:
            def wrapped(self, *args, **kwargs):
                current = accesses()
                if current is not None:
                    current.add(args[ptr_at], None if mask_at is None else args[mask_at], read, write)
                return original(self, *args, **kwargs)
            return wrapped
        return wrap

    return {
        # create_load/create_store, atomic loads/stores and descriptors all go through the masked forms.
        "create_masked_load": note(True, False, 0, 1),  # (ptrs, mask, other, cache_policy, is_volatile)
        "create_masked_store": note(False, True, 0, 2),  # (ptrs, value, mask, cache_policy)
        "create_atomic_rmw": note(True, True, 1, 3),  # (rmwOp, ptr, val, mask, sem, scope)
        "create_atomic_cas": note(True, True, 0, None),  # (ptr, cmp, val, sem, scope)
    }


_WRAPPED = tuple(_wrappers(lambda: None))


def _interpreted(kernel: Any) -> bool:
    while kernel is not None:  # Autotuner/Heuristics wrap the jitted function in .fn
        if type(kernel).__name__ == "InterpretedFunction":
            return True
        kernel = getattr(kernel, "fn", None)
    return False


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Record the exact traffic of every launch inside the block (kernels must run
    under ``TRITON_INTERPRET=1``; a launch whose body runs no load or store reads 0).

    >>> with record_launches() as records:
    ...     loss.backward()
    >>> sum(r.read + r.written for r in records)
    """
    builder = _interpreter_builder_class()
    records: list[LaunchRecord] = []
    pending: list[tuple[_Launch, _Accesses]] = []

    def finish() -> None:
        if not pending:
            return
        launch, acc = pending.pop()
        reads, writes = _Accesses.distinct(acc.reads), _Accesses.distinct(acc.writes)
        covered = np.zeros(len(reads) + len(writes), dtype=bool)
        touched = np.concatenate([reads, writes])
        for (start, span), _ in launch.groups().items():
            for lo, arr in ((0, reads), (len(reads), writes)):
                a, b = np.searchsorted(arr, [start, start + span])
                covered[lo + a: lo + b] = True
        records.append(LaunchRecord(launch.kernel, launch.key, len(reads), len(writes),
                                    int((~covered).sum()), launch, (reads, writes)))

    def observe(kernel: Any, grid: tuple, args: tuple, meta: dict) -> None:
        finish()
        if not _interpreted(kernel):
            raise TrafficUnavailable(f"record_launches: {kernel_name(kernel)} is compiled, not interpreted; "
                                     "set TRITON_INTERPRET=1 before importing fastres")
        pending.append((_describe(kernel, args, meta), _Accesses()))

    originals = {name: getattr(builder, name) for name in _WRAPPED}
    wrapped = _wrappers(lambda: pending[-1][1] if pending else None)
    for name, wrap in wrapped.items():
        setattr(builder, name, wrap(originals[name]))
    try:
        with observe_launches(observe):
            yield records
        finish()
    finally:
        for name, original in originals.items():
            setattr(builder, name, original)


# --------------------------------------------------------------------------- learned roles


class LaunchRoles:
    """What fraction of each argument (and of each pointer-table column's tensors) a
    kernel specialisation reads and writes, learned from :func:`record_launches`.

    ``roles.learn(records)``; then ``roles.predict(kernel, args, meta)`` gives
    ``(read, written)`` bytes of a launch from its arguments (what
    :class:`TrafficMeter` counts, with or without stubs).
    Fractions are exact (``Fraction``); a specialisation learned twice with
    different fractions is listed in ``conflicts``.
    """

    def __init__(self) -> None:
        self.roles: dict[tuple, dict[Slot, tuple[Fraction, Fraction]]] = {}
        self.conflicts: list[str] = []
        self.unattributed = 0  # bytes the learned launches touched outside every slot (0 when the model holds)

    def learn(self, records: Sequence[LaunchRecord]) -> "LaunchRoles":
        for record in records:
            self.unattributed += record.unattributed
            reads, writes = record.touched
            totals: dict[Slot, list[int]] = {}  # slot -> [bytes read, bytes written, size]
            for (start, span), (region, slots) in record.launch.groups().items():
                touched = [int(np.searchsorted(arr, start + span) - np.searchsorted(arr, start)) for arr in (reads, writes)]
                for slot in slots:
                    acc = totals.setdefault(slot, [0, 0, 0])
                    acc[0] += touched[0]
                    acc[1] += touched[1]
                    acc[2] += region.size
            role = {slot: (Fraction(r, n), Fraction(w, n)) for slot, (r, w, n) in totals.items() if n}
            known = self.roles.setdefault(record.key, role)
            if known != role:
                changed = sorted(str(s) for s in set(known) | set(role) if known.get(s) != role.get(s))
                self.conflicts.append(f"{record.kernel} {record.key[1]}: slots {', '.join(changed)}")
        return self

    def predict(self, kernel: Any, args: tuple, meta: dict) -> tuple[int, int]:
        key = _launch_key(kernel, args, meta)
        role = self.roles.get(key)
        if role is None:
            raise KeyError(f"LaunchRoles: nothing learned for {key[0]} with constexprs {dict(key[1])} and argument "
                           f"dtypes {key[2]}; learn from a recorded launch of that specialisation first")
        tables = {slot[1] for slot in role if slot[0] == "table"}
        return self.bytes_of(_describe(kernel, args, meta, tables))

    def bytes_of(self, launch: _Launch) -> tuple[int, int]:
        """(read, written) bytes of a described launch (e.g. a :class:`LaunchRecord`'s)."""
        role = self.roles[launch.key]
        read = written = Fraction(0)
        for region, slots in launch.groups().values():
            read += max(role.get(s, (0, 0))[0] for s in slots) * region.size
            written += max(role.get(s, (0, 0))[1] for s in slots) * region.size
        return round(read), round(written)


# --------------------------------------------------------------------------- the eager twin


# What the schemas do not say, in one place. (Views and in-place metadata
# changes, e.g. as_strided_, are recognised from the schema and its tags.)
_aten = torch.ops.aten
# Allocations: the bytes are not initialised, so nothing moves.
_ALLOCATIONS = {_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided,
                _aten.empty_permuted}
# Factories that take a tensor for its dtype, device and shape only: they write, never read.
_LIKE_FACTORIES = {_aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.new_zeros, _aten.new_ones,
                   _aten.new_full}
# In-place ops that overwrite their first argument without reading it.
_OVERWRITES = {_aten.copy_, _aten.fill_, _aten.zero_}


def _storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage, also for fake tensors (which have no data pointer)."""
    return t.untyped_storage()._cdata


class _ByteSet:
    """Distinct bytes of a set of tensors: byte intervals per storage, merged."""

    def __init__(self) -> None:
        self.intervals: dict[int, list[tuple[int, int]]] = {}
        self.strided: dict[tuple, int] = {}  # tensors with gaps: counted by their elements

    def add(self, t: torch.Tensor) -> None:
        item = t.element_size()
        region = tensor_region(t, start=t.storage_offset() * item)
        if region.span == region.size:
            self.intervals.setdefault(_storage_key(t), []).append((region.start, region.start + region.span))
        elif region.size:
            self.strided[(_storage_key(t), region.start, tuple(t.shape), t.stride())] = region.size

    def storages(self) -> set[int]:
        return set(self.intervals) | {k[0] for k in self.strided}

    def total(self) -> int:
        total = sum(self.strided.values())
        for pieces in self.intervals.values():
            end = -1
            for a, b in sorted(pieces):
                total += max(0, b - max(a, end))
                end = max(end, b)
        return total


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class OpTraffic(TorchDispatchMode):
    """Counts each aten op's distinct bytes read and written into ``traffic``
    (a :class:`Traffic`, replaceable between ops). Works on real tensors and
    under ``FakeTensorMode`` (enter this mode inside the fake one)."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()
        self.paused = 0
        self.log: Optional[list[tuple[str, int, int]]] = None  # (op, read, written) when a list

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        # fastres's own ops (torch.ops.fastres.*) move memory through their launches, which roles count.
        if self.paused or packet in _ALLOCATIONS or torch.Tag.inplace_view in func.tags or func.namespace == "fastres":
            return out
        reads, writes = _ByteSet(), _ByteSet()
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            for t in _tensors(value):
                if not mutated:
                    if packet not in _LIKE_FACTORIES:
                        reads.add(t)
                    continue
                writes.add(t)
                # out= arguments and overwriting ops write without reading
                if not arg.kwarg_only and not (i == 0 and packet in _OVERWRITES):
                    reads.add(t)
        inputs = reads.storages() | writes.storages()
        for t in _tensors(out):
            if _storage_key(t) not in inputs:  # outputs that alias an input are views, or the mutated input
                writes.add(t)
        if not writes.storages():  # a view or a metadata op: nothing moves
            return out
        read, written = reads.total(), writes.total()
        timed = LaunchTime(str(packet).removeprefix("aten."), read, written, op_flops(func, args, kwargs, out),
                           op_compute(args))
        self.traffic.add(Traffic(ops=1, read=read, written=written, times=[timed]))
        if self.log is not None:
            self.log.append((str(func), read, written))
        return out


# --------------------------------------------------------------------------- training steps


class TrafficMeter:
    """Traffic by component (``with meter.component("forward"): ...``): Triton
    launches counted by ``roles`` (when given) and every aten op by :class:`OpTraffic`.

    Enter it inside ``FakeTensorMode`` to measure eager code without running it.
    """

    def __init__(self, roles: Optional[LaunchRoles] = None) -> None:
        self.roles = roles
        self.components: dict[str, Traffic] = {}
        self.ops = OpTraffic()
        self._stack = contextlib.ExitStack()
        self._current: Optional[Traffic] = None

    def __enter__(self) -> "TrafficMeter":
        self._stack.enter_context(observe_launches(self._observe))
        self._stack.enter_context(self.ops)
        self.ops.paused += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _observe(self, kernel: Any, grid: tuple, args: tuple, meta: dict) -> None:
        if self._current is None:
            return
        if self.roles is None:
            raise ValueError(f"TrafficMeter: {kernel_name(kernel)} was launched but no roles were given to count "
                             "launches; pass roles=learn_launch_roles()")
        self.ops.paused += 1  # the role lookup's own tensor reads are not the step's
        try:
            read, written = self.roles.predict(kernel, args, meta)
        finally:
            self.ops.paused -= 1
        timed = conv_launch(kernel_name(kernel), tuple(grid), named_arguments(kernel, args), meta, read, written)
        self._current.add(Traffic(launches=1, read=read, written=written, times=[timed]))

    @contextlib.contextmanager
    def component(self, name: str) -> Iterator[Traffic]:
        traffic = self.components.setdefault(name, Traffic())
        self._current, self.ops.traffic = traffic, traffic
        self.ops.paused -= 1
        try:
            yield traffic
        finally:
            self.ops.paused += 1
            self._current = None

    def total(self) -> Traffic:
        total = Traffic()
        for traffic in self.components.values():
            total.add(traffic)
        return total


COMPONENTS = ("forward", "backward", "optimizer step")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               autocast: Optional[torch.dtype] = None, meter: Optional[TrafficMeter] = None) -> None:
    """Cross-entropy forward (under ``autocast`` when given), backward, ``optimizer.step()``
    and ``zero_grad``, each part inside ``meter.component`` when a meter is given."""
    part = meter.component if meter is not None else (lambda name: contextlib.nullcontext())
    cast = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with part(COMPONENTS[0]), cast:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with part(COMPONENTS[1]):
        loss.backward()
    with part(COMPONENTS[2]):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def training_step_traffic(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                          y: torch.Tensor, roles: Optional[LaunchRoles] = None,
                          autocast: Optional[torch.dtype] = None, warmup: int = 1) -> TrafficMeter:
    """Traffic of one training step (forward with the loss, backward, optimizer
    step and ``zero_grad``) after ``warmup`` unmeasured steps (optimizer state,
    lazily made buffers). Launches need ``roles``; run it under
    :func:`~fastres.testing.stub_launches` for full-size fastres models and
    under ``FakeTensorMode`` for eager ones to skip the arithmetic."""
    for _ in range(warmup):
        train_step(model, optimizer, x, y, autocast)
    with TrafficMeter(roles) as meter:
        train_step(model, optimizer, x, y, autocast, meter)
    return meter


def learn_launch_roles(autocast: Sequence[Optional[torch.dtype]] = (None,), batch: int = 2, size: int = 6,
                       memory_format: torch.memory_format = torch.channels_last, zoo: bool = False) -> LaunchRoles:
    """Roles of every launch of a fused CIFAR ResNet's training step, learned from
    interpreted steps (per ``autocast`` dtype) of the smallest such network: one
    block per stage, so an identity block and two downsampling blocks, at
    ``batch`` images of ``size`` x ``size``; and of a downsampling block
    followed by an identity block, on twice that size and on that size. The
    defaults give every variant a full-size step launches: reductions over one
    and several row tiles, weight gradients unsplit and split, for stride 1 and
    2 and both prologues. Takes tens of seconds. ``zoo``: also the small models of
    :mod:`fastres.testing.zoo`, converted (1x1 and strided projections, tensor residuals,
    1x1 convs in chains), on 4 and 16 pixels a side, and some at 72-80 channels (a few minutes more)."""
    roles = LaunchRoles()
    # A stubbed step leaves buffers uninitialised; denormals among them make the aten ops of a converted
    # model's unfused parts (oneDNN's 1x1 weight gradient) take minutes on a CPU.
    flush = torch.set_flush_denormal(True)
    try:
        # oneDNN's 1x1 weight gradient (a pre-activation net's unfused shortcut) stalled for many minutes on
        # a stubbed step's garbage here; PyTorch's own CPU convolution does not
        with torch.backends.mkldnn.flags(enabled=False):
            _learn(roles, autocast, batch, size, memory_format, zoo)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return roles


def _learn(roles: LaunchRoles, autocast: Sequence[Optional[torch.dtype]], batch: int, size: int,
           memory_format: torch.memory_format, zoo: bool) -> None:
    from ..models import ResNet
    from ..nn import ResidualBlock, downsample
    from ..optim import SGD

    for dtype in autocast:
        torch.manual_seed(0)
        stage = torch.nn.Sequential(ResidualBlock(16, 32, 2, downsample(16, 32, 2)), ResidualBlock(32, 32),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
        cases = [(ResNet(layers=(1, 1, 1)), torch.randn(batch, 3, size, size), None),
                 (stage, torch.randn(batch, 16, 2 * size, 2 * size), None),
                 (stage, torch.randn(batch, 16, size, size), None)]
        if zoo:
            from ..models import convert
            from . import zoo as models

            # Over 64 channels the stride-1 gradients leave the one-pass grads kernel (FULL's widths); planned
            # as on a GPU, so that their weight gradients split as at full size (9 x 4 tiles on 8 SMs do not)
            wide = {"kuangliu_wide": lambda: models.KuangliuResNet18(widths=(8, 72), blocks=(1, 2)),
                    "preact_wide": lambda: models.PreActResNet18(widths=(8, 72), blocks=(1, 2)),
                    "resnet9_wide": lambda: models.ResNet9(widths=(8, 72, 72, 80))}
            for name, make in {**models.SMALL, **wide}.items():
                # ResNet-9 pools three times; 16: stride-2 1x1 weight gradients split (M = 2 x 8 x 8 rows)
                for side in ((16,) if name.startswith("resnet9") or name in wide else (4, 16)):
                    for sms in ((None, GPU_SMS) if name in wide else (None,)):  # splits and none (>256 tiles)
                        cases.append((convert(make()), torch.randn(batch, 3, side, side), sms))
        for model, x, sms in cases:
            model = model.to(memory_format=memory_format)
            x = x.to(memory_format=memory_format)
            optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
            y = torch.randint(0, 10, (batch,))
            with planned_for_sms(sms) if sms else contextlib.nullcontext():
                with stub_launches():  # the optimizer's first step differs (no momentum read): learn a later one
                    train_step(model, optimizer, x, y, dtype)
                # The stubbed step left uninitialised buffers; their values do not move a byte.
                with record_launches() as records, np.errstate(invalid="ignore", over="ignore"):
                    train_step(model, optimizer, x, y, dtype)
            roles.learn(records)


# --------------------------------------------------------------------------- the report


def eager_step_traffic(batch: int, size: int, autocast: Optional[torch.dtype],
                       memory_format: torch.memory_format = torch.channels_last,
                       make_model: Optional[Callable[[], torch.nn.Module]] = None) -> TrafficMeter:
    """Eager ResNet-20 (``fastres.reference.nn``; or ``make_model()``) with
    ``torch.optim.SGD(foreach=True)``, under ``FakeTensorMode``: the aten ops of a real CPU step, none of
    the arithmetic."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..reference import nn as ref

    torch.manual_seed(0)
    model = (ref.resnet20() if make_model is None else make_model()).to(memory_format=memory_format)
    mode = FakeTensorMode()
    for module in model.modules():  # the same parameters and buffers, fake
        for name, p in module.named_parameters(recurse=False):
            module._parameters[name] = torch.nn.Parameter(mode.from_tensor(p), p.requires_grad)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = mode.from_tensor(b)
    with mode:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
        x = torch.randn(batch, 3, size, size).to(memory_format=memory_format)
        y = torch.randint(0, 10, (batch,))
        return training_step_traffic(model, optimizer, x, y, autocast=autocast)


GPU_SMS = 132  # an H100 or H200 SXM


@contextlib.contextmanager
def planned_for_sms(sms: int) -> Iterator[None]:
    """Plan the conv launches as for a GPU with ``sms`` SMs (weight-gradient splits and persistent
    programs, hence their partials, depend on it), clearing the launchers' plan caches around it."""
    from ..launchers import conv as L

    with L.planned_with(_num_sms=lambda device: sms):
        yield


def fastres_step_traffic(roles: LaunchRoles, batch: int, size: int, autocast: Optional[torch.dtype],
                         memory_format: torch.memory_format = torch.channels_last,
                         sms: int = GPU_SMS, make_model: Optional[Callable[[], torch.nn.Module]] = None
                         ) -> TrafficMeter:
    """``fastres.resnet20()`` (or ``make_model()``) with ``fastres.optim.SGD``, launches stubbed, planned
    as on a GPU with ``sms`` SMs and counted by ``roles``; the aten ops around them (pooling, classifier,
    loss, autograd's copies, and whatever a converted model leaves unfused) run for real on the CPU and
    are counted by :class:`OpTraffic`."""
    from ..models import resnet20
    from ..optim import SGD

    torch.manual_seed(0)
    model = (resnet20() if make_model is None else make_model()).to(memory_format=memory_format)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size).to(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))
    with stub_launches(), planned_for_sms(sms):
        return training_step_traffic(model, optimizer, x, y, roles, autocast=autocast)


def zoo_traffic(roles: LaunchRoles, batch: int, size: int, autocast: Optional[torch.dtype]) -> list[tuple]:
    """(name, fastres meter, eager meter) of each full-width model of :mod:`fastres.testing.zoo`, converted
    by ``fastres.convert`` against itself in eager PyTorch (``roles`` learned with ``zoo=True``)."""
    from ..models import convert
    from . import zoo

    out = []
    for name, make in zoo.FULL.items():
        fused = fastres_step_traffic(roles, batch, size, autocast, make_model=lambda m=make: convert(m()))
        eager = eager_step_traffic(batch, size, autocast, make_model=make)
        out.append((name, fused, eager))
    return out


def _zoo_table(title: str, rows: list[tuple]) -> str:
    head = f"{'model':<20}{'launches':>9}{'+ ops':>7}{'GB':>8}  |{'kernels':>8}{'GB':>8}  |{'bytes':>7}{'time':>7}"
    lines = [title, f"{'':<20}{'fastres':^24}  |{'eager':^16}  |{'ratio':^14}", head, "-" * len(head)]
    for name, fused, eager in rows:
        f, e = fused.total(), eager.total()
        f_us, e_us = sum(t.us(H200) for t in f.times), sum(t.us(H200) for t in e.times)
        lines.append(f"{name:<20}{f.launches:>9}{f.ops:>7}{f.bytes / 1e9:>8.3f}  |{e.kernels:>8}{e.bytes / 1e9:>8.3f}"
                     f"  |{f.bytes / e.bytes:>7.3f}{f_us / e_us:>7.3f}")
    return "\n".join(lines)


def _table(title: str, fused: TrafficMeter, eager: TrafficMeter) -> str:
    rows = [(name, fused.components[name], eager.components[name]) for name in COMPONENTS]
    rows.append(("total", fused.total(), eager.total()))
    head = (f"{'component':<15}{'launches':>9}{'+ ops':>7}{'read MB':>10}{'write MB':>10}{'MB':>9}"
            f"  |{'ops':>5}{'read MB':>10}{'write MB':>10}{'MB':>9}  |{'ratio':>7}")
    lines = [title, f"{'':<15}{'fastres':^45}  |{'eager':^34}  |", head, "-" * len(head)]
    for name, f, e in rows:
        lines.append(f"{name:<15}{f.launches:>9}{f.ops:>7}{f.read / 1e6:>10.1f}{f.written / 1e6:>10.1f}"
                     f"{f.bytes / 1e6:>9.1f}  |{e.ops:>5}{e.read / 1e6:>10.1f}{e.written / 1e6:>10.1f}"
                     f"{e.bytes / 1e6:>9.1f}  |{f.bytes / e.bytes:>7.3f}")
    return "\n".join(lines)


def _time_table(fused: TrafficMeter, eager: TrafficMeter) -> str:
    """Modeled GPU time (:mod:`fastres.testing.gpu_model`, constants of ``H200``) per kernel name, fastres's
    launches then eager's ops, each with its worst serial tail; the last line is the step's summary."""
    model = H200
    lines = [f"modeled GPU time ({model.name}: {model.hbm_bytes_per_us / 1e6:.1f} TB/s, bf16 "
             f"{model.tensor_flops_per_us['bf16'] / 1e6:.0f} / tf32 {model.tensor_flops_per_us['tf32'] / 1e6:.0f} "
             f"TFLOP/s, {model.launch_us:g} us per launch, L2 round trip {model.l2_round_trip_us:g} us, one SM "
             f"{model.sm_l2_bytes_per_us / 1e3:.0f} GB/s from L2)",
             f"{'':<28}{'calls':>6}{'MB':>9}{'GFLOP':>8}{'us':>9}{'tail us':>9}{'tail %':>8}"]
    for who, meter in (("fastres", fused), ("eager", eager)):
        lines.append(who)
        for name, row in per_kernel(meter.total().times, model).items():
            lines.append(f"  {name[:26]:<26}{row['calls']:>6}{row['bytes'] / 1e6:>9.1f}{row['flops'] / 1e9:>8.1f}"
                         f"{row['us']:>9.1f}" + (f"{row['tail_us']:>9.1f}{100 * row['tail_share']:>7.0f}%"
                                                  if row["tail_us"] else ""))
    lines.append(summary_line(fused.total().times, eager.total().times, model))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    import os
    import sys

    from .._backend import INTERPRET

    parser = argparse.ArgumentParser(prog="python -m fastres.testing.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--dtypes", default="fp32,bf16", help="activation dtypes (bf16: autocast)")
    parser.add_argument("--time", action="store_true",
                        help="also a modeled GPU time per kernel and per step (fastres.testing.gpu_model)")
    parser.add_argument("--zoo", action="store_true",
                        help="the full-width models of fastres.testing.zoo (plain PyTorch, through fastres.convert) "
                             "instead of ResNet-20: launches, bytes and modeled time against eager")
    parser.add_argument("--json", metavar="PATH",
                        help="write the modeled GPU time per kernel and the summary, per dtype, as JSON (the lease "
                             "runner's profile row prints it beside the measured times)")
    args = parser.parse_args(argv)
    if not INTERPRET:  # the roles are learned under the interpreter, which must be chosen before import
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastres.testing.traffic", *sys.argv[1:]])
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    chosen = [dtypes[d] for d in args.dtypes.split(",")]
    torch.set_flush_denormal(True)  # stubbed launches leave garbage that the aten ops around them read
    roles = learn_launch_roles(autocast=chosen, zoo=args.zoo)
    if args.zoo:
        print("Compulsory traffic of one training step of each zoo model (fastres.testing.zoo, plain PyTorch) through")
        print("fastres.convert, against the same model in eager PyTorch; SGD momentum; each launch and aten op reads")
        print("each distinct byte once and writes each once; 'time' is the modeled GPU time (gpu_model, H200).")
        for name, dtype in zip(args.dtypes.split(","), chosen):
            print()
            print(_zoo_table(f"batch {args.batch}, 3x{args.size}x{args.size}, channels_last, {name} activations",
                             zoo_traffic(roles, args.batch, args.size, dtype)))
        return
    print("Compulsory traffic of one ResNet-20 training step (forward + loss, backward, SGD momentum step):")
    print("each Triton launch and each aten op reads each distinct byte once and writes each once; MB = 1e6 B.")
    print("fastres: fastres.resnet20() + fastres.optim.SGD, launches stubbed, planned as on a GPU with")
    print(f"{GPU_SMS} SMs (H100/H200: the partials of split and persistent launches depend on it) and counted")
    print("from roles learned under the interpreter; '+ ops' are the aten ops around them.")
    print("eager: fastres.reference.nn.resnet20()")
    print("+ torch.optim.SGD(foreach=True) under FakeTensorMode; 'ops' are aten ops that move memory.")
    modeled: dict = {}
    for name, dtype in zip(args.dtypes.split(","), chosen):
        fused = fastres_step_traffic(roles, args.batch, args.size, dtype)
        eager = eager_step_traffic(args.batch, args.size, dtype)
        print()
        print(_table(f"batch {args.batch}, 3x{args.size}x{args.size}, channels_last, {name} activations", fused, eager))
        if args.time:
            print()
            print(_time_table(fused, eager))
        modeled[name] = {"batch": args.batch, "size": args.size, "model": dataclasses.asdict(H200),
                         "fastres": per_kernel(fused.total().times), "eager": per_kernel(eager.total().times),
                         "summary": summary_line(fused.total().times, eager.total().times)}
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(modeled, f, indent=1)


if __name__ == "__main__":
    main()
