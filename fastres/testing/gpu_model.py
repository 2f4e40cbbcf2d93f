"""A modeled GPU time for each launch of a step, so that slow launches and serial tails show on a CPU.

Each launch (a fastres Triton launch, or an eager aten op) is modeled as

    launch_us + max(bytes / HBM bandwidth, flops / tensor-core rate) + serial tail

* ``bytes``: its compulsory traffic (``fastres.testing.traffic``: each distinct
  byte read once, written once);
* ``flops``: the multiply-adds its tensor cores execute, tiles padded as the
  kernel pads them (a 3-channel stem conv runs 16-channel tiles);
* the serial tail: the work one program does after every other program of the
  launch has finished (the last to arrive combines the partials): its dependent
  L2 round trips (an atomic arrival, a load it must wait for) times
  ``l2_round_trip_us``, plus the bytes it reads alone over one SM's bandwidth.

It is a model, not a measurement: the constants are in :data:`H200` (the
lease machine), and the lease runner prints these predictions beside the
profiler's measured kernel times, so that they are checked and corrected.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch


@dataclasses.dataclass(frozen=True)
class GPUModel:
    """The constants of the model, one place. Rates per microsecond."""

    name: str
    hbm_bytes_per_us: float  # device memory bandwidth
    tensor_flops_per_us: dict  # compute dtype -> flop rate ("tf32": fp32 convs, as cuDNN and fastres run them)
    l2_round_trip_us: float  # one dependent load or atomic served by L2, under load
    sm_l2_bytes_per_us: float  # what one SM alone reads from L2
    launch_us: float  # a launch's fixed cost on the GPU when queued behind others (ramp-up and drain)
    sms: int


H200 = GPUModel(
    name="H200",
    hbm_bytes_per_us=4.3e6,  # 4.3 TB/s: measured device-to-device copy (shared/GPU.md)
    # 790 TFLOP/s: measured bf16 matmul (shared/GPU.md); TF32 is half the dense bf16 rate on Hopper; IEEE
    # fp32 runs on the CUDA cores (67 TFLOP/s FMA peak).
    tensor_flops_per_us={"bf16": 790e6, "fp16": 790e6, "tf32": 395e6, "fp32": 67e6},
    # A dependent L2 hit takes ~0.15-0.25 us on an idle H100 (published microbenchmarks: 260-400 cycles);
    # an acq_rel arrival atomic first waits for the program's stores. 0.3 us until a lease measures it.
    l2_round_trip_us=0.3,
    sm_l2_bytes_per_us=1e5,  # ~64 B per clock at ~1.7 GHz
    launch_us=2.0,
    sms=132,
)


@dataclasses.dataclass
class LaunchTime:
    """One modeled launch: what it moves and computes, and its serial tail."""

    name: str
    read: int
    written: int
    flops: float = 0.0
    compute: str = "bf16"  # a key of GPUModel.tensor_flops_per_us
    tail_round_trips: int = 0
    tail_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def tail_us(self, model: GPUModel = H200) -> float:
        return self.tail_round_trips * model.l2_round_trip_us + self.tail_bytes / model.sm_l2_bytes_per_us

    def body_us(self, model: GPUModel = H200) -> float:
        return max(self.bytes / model.hbm_bytes_per_us, self.flops / model.tensor_flops_per_us[self.compute])

    def us(self, model: GPUModel = H200) -> float:
        return model.launch_us + self.body_us(model) + self.tail_us(model)


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def _compute(dtype: torch.dtype) -> str:
    """The tensor-core rate a conv of ``dtype`` runs at on the GPU: fp32 as TF32, torch's default for cuDNN
    and fastres alike (a plan made on the CPU says "ieee": the interpreter has no TF32)."""
    return {torch.float32: "tf32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _levels(n: int, group: int) -> list[int]:
    """Partials combined per level of a two-level reduction (kernels/conv.py, ``_group``): the last group's
    members, then the groups."""
    return [n] if n <= group else [min(group, n), -(-n // group)]


def _finalize(n: int, group: int, row_bytes: int) -> tuple[int, int]:
    """(round trips, bytes) of a BatchNorm finalize over ``n`` partials of ``row_bytes`` each (kernels/conv.py,
    ``_bn_forward_finalize``): per level of groups an arrival atomic and one load of the last group's
    partials (a group's moments or sums in one load), while more than ``group`` remain, then an arrival and
    one load of the last level's."""
    trips = nbytes = 0
    while True:
        trips += 2
        nbytes += min(n, group) * row_bytes
        if n <= group:
            return trips, nbytes
        n = -(-n // group)


def conv_launch(name: str, grid: tuple, args: dict, meta: dict, read: int, written: int) -> LaunchTime:
    """The flops and serial tail of a launch of one of ``kernels/conv.py``'s kernels (``args`` by parameter
    name, ``meta`` the launch's constexprs); other kernels get no flops and no tail."""
    t = LaunchTime(name, read, written)
    if name == "_conv_kernel":
        out = args["out_ptr"]
        t.compute = _compute(out.dtype)
        taps = meta["R"] * meta["S"] / (meta["STRIDE"] ** 2 if meta["TRANSPOSED"] else 1)
        pairs = 2 if meta["PAIR"] else 1  # two outputs, or two operands summed
        t.flops = 2 * args["M"] * _pad(args["CO"], meta["BLOCK_N"]) * _pad(args["CA"], meta["BLOCK_K"]) * taps * pairs
        n_tiles, group, block_n = grid[0], meta["BLOCK_T"], meta["BLOCK_N"]
        if meta["EPILOGUE"] == 1:  # BatchNorm statistics (the BN's own rows loaded with the last partials),
            # then num_batches_tracked's arrival
            trips, nbytes = _finalize(n_tiles, group, 2 * block_n * 4)
            t.tail_round_trips, t.tail_bytes = trips + (1 if meta["TRACK"] else 0), nbytes
        elif meta["EPILOGUE"] == 2:  # BatchNorm backward sums, then its coefficients
            trips, nbytes = _finalize(n_tiles, group, 2 * block_n * 4)
            t.tail_round_trips, t.tail_bytes = trips + 1, nbytes
    elif name == "_conv_wgrad_kernel":
        x = args["x_ptr"]
        t.compute = _compute(x.dtype)
        t.flops = 2 * args["M"] * _pad(args["K"], meta["BLOCK_K"]) * _pad(args["C"], meta["BLOCK_C"]) \
            * meta["R"] * meta["S"]
        if meta["SPLIT"]:  # the splits' slices summed up a binary tree: per level an arrival and the pair's load
            levels = (grid[1] - 1).bit_length()
            t.tail_round_trips = 2 * levels
            t.tail_bytes = levels * 2 * meta["BLOCK_K"] * meta["BLOCK_C"] * 4
    elif name == "_conv_grads_kernel":
        x = args["x_ptr"]
        t.compute = _compute(x.dtype)
        M, K, C = args["M"], args["K"], args["C"]
        c_pad = _pad(C, meta["BLOCK_N"])
        t.flops = 2 * M * c_pad * _pad(K, meta["BLOCK_K"]) * 9 + 2 * M * meta["BLOCK_KW"] * c_pad * 9
        programs, group = grid[0], meta["BLOCK_T"]
        dw_numel = 9 * K * meta["BLOCK_N"]
        for count in _levels(programs, group):
            t.tail_round_trips += 1 + -(-dw_numel // meta["BLOCK_E"]) * -(-count // group)
            t.tail_bytes += count * dw_numel * 4
            if meta["EPILOGUE"] == 2:
                t.tail_round_trips += -(-count // group)
                t.tail_bytes += count * 2 * meta["BLOCK_N"] * 4
    elif name == "_bn_relu_backward_kernel":
        arrays = 3 if meta["RESIDUAL"] == 2 else 2
        trips, nbytes = _finalize(grid[0], meta["BLOCK_T"], arrays * meta["BLOCK_C"] * 4)
        t.tail_round_trips, t.tail_bytes = trips + 1, nbytes
    return t


def named_arguments(kernel: Any, args: tuple) -> dict:
    """A launch's positional arguments by the kernel's parameter names."""
    fn = kernel
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    return dict(zip(fn.arg_names, args))


_aten = torch.ops.aten


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """Tensor-core flops of an eager aten op: convolutions (forward, and each gradient a backward computes)
    and matrix products; 0 for the rest (elementwise and reductions are bound by their bytes)."""
    packet = func.overloadpacket
    if packet is _aten.convolution:
        x, w = args[0], args[1]
        groups = args[8] if len(args) > 8 else kwargs.get("groups", 1)
        return 2.0 * out.numel() * (x.shape[1] // groups) * math.prod(w.shape[2:])
    if packet is _aten.convolution_backward:
        grad_out, x, w = args[0], args[1], args[2]
        groups = args[9] if len(args) > 9 else 1
        mask = args[10] if len(args) > 10 else (True, True, True)
        per_grad = 2.0 * grad_out.numel() * (x.shape[1] // groups) * math.prod(w.shape[2:])
        return per_grad * (int(bool(mask[0])) + int(bool(mask[1])))
    if packet in (_aten.mm, _aten.addmm, _aten.bmm):
        a, b = (args[1], args[2]) if packet is _aten.addmm else (args[0], args[1])
        return 2.0 * a.numel() * b.shape[-1]
    return 0.0


def op_compute(args: tuple) -> str:
    """The compute dtype of an eager op: its first floating tensor's (fp32 convs and matmuls as TF32, torch's
    cuDNN default)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return _compute(a.dtype)
    return "fp32"


def per_kernel(times: list, model: GPUModel = H200) -> dict:
    """Modeled launches of a step by kernel (or aten op) name, longest first: calls, microseconds per step,
    bytes, flops and the worst serial tail (with its share of that launch's time)."""
    rows: dict = {}
    for t in times:
        row = rows.setdefault(t.name, {"calls": 0, "us": 0.0, "bytes": 0, "flops": 0.0, "tail_us": 0.0,
                                       "tail_share": 0.0})
        row["calls"] += 1
        row["us"] += t.us(model)
        row["bytes"] += t.bytes
        row["flops"] += t.flops
        if t.tail_us(model) > row["tail_us"]:
            row["tail_us"], row["tail_share"] = t.tail_us(model), t.tail_us(model) / t.us(model)
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["us"]))


def summary_line(fused: list, eager: list, model: GPUModel = H200) -> str:
    """``modeled step: fastres X ms, eager Y ms (ratio R); worst serial tail T us (KERNEL)``."""
    f = sum(t.us(model) for t in fused) / 1e3
    e = sum(t.us(model) for t in eager) / 1e3
    worst: Optional[LaunchTime] = max(fused, key=lambda t: t.tail_us(model), default=None)
    tail = f"{worst.tail_us(model):.1f} us ({worst.name})" if worst is not None else "none"
    return f"modeled step: fastres {f:.3f} ms, eager {e:.3f} ms (ratio {f / e:.3f}); worst serial tail {tail}"
