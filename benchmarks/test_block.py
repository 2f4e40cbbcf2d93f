"""One residual block, forward + backward: fastres against PyTorch eager and torch.compile, in the same process.

Run: ``pytest benchmarks/test_block.py --benchmark-only`` (see conftest.py);
``-k "resnet20 and bf16"`` for a subset. All timed rows need CUDA; a CPU run has
one tiny smoke group (batch 8, where fastres takes its pure-PyTorch path, so it
only checks that the rows run).

Unit of work
------------
One training step of one block, ``relu(bn2(conv2(relu(bn1(conv1(x))))) + residual)``
with ``residual = x`` or ``bnd(convd(x))`` (3x3 stride-2 conv + BN, the project's
downsample), BatchNorm in training mode, batch 512: ``out = block(x)`` then
``out.backward(dout)``. ``x`` requires grad and is a view made by an op (so it is
a non-leaf activation, as inside a network, and is counted as saved); its
gradient and all parameter gradients are set to None before each step, so
nothing accumulates. The BN running statistics update every step, as in training.

Shapes (input channels @ input size; "s2": stride 2 with the downsample branch)
------------------------------------------------------------------------------
* ResNet-20 (CIFAR): 16@32x32, 16->32 s2 @32x32, 32@16x16, 32->64 s2 @16x16, 64@8x8
* ResNet-18-CIFAR: 64@32x32, 64->128 s2 @32x32, 128@16x16, 128->256 s2 @16x16,
  256@8x8, 256->512 s2 @8x8, 512@4x4

dtypes: ``bf16`` is ``torch.autocast(bfloat16)`` with fp32 parameters and a
bfloat16 block input and output gradient (what a block inside an autocast network
receives); fastres's functional honours autocast the same way. ``fp32`` is plain
float32 with the default ``torch.backends.cudnn.allow_tf32 = True``: cuDNN's fp32
convs use TF32 tensor cores, and fastres follows the same switch (the flags are
recorded in every row's extra_info).

Variants (one row each; same weights, loaded with ``load_state_dict``)
----------------------------------------------------------------------
* ``fastres``                     ``fastres.nn.ResidualBlock``, block and input channels_last
* ``eager``                       ``fastres.reference.nn.ResidualBlock`` (plain PyTorch), NCHW-contiguous
* ``eager channels_last``         the same, block and input channels_last
* ``torch.compile``               the reference block, channels_last, ``torch.compile(dynamic=False)``
* ``torch.compile max-autotune``  the same with ``mode="max-autotune"`` (Triton conv templates and
  CUDA graphs; CUDA-graph trees copy the block input and output gradient into their
  static buffers every step, and that copy is timed)
``torch.backends.cudnn.benchmark`` is on for every row. A compile that fails skips
its row with the error. Compiled variants run on CUDA only.

Bytes moved (``bytes_moved``: the fused design's minimal traffic, for GB/s)
-------------------------------------------------------------------------
Element counts: X = input (N*Cin*H*W), Y = one conv output (N*Cout*H/s*W/s); one
byte count = elements x activation element size (2 for bf16, 4 for fp32). Every
launch of the fused design (``fastres/functional.py``) reads each operand and
writes each result exactly once; weights and per-channel vectors are ignored::

    forward   conv1: read x, write y1                                  X + Y
                [downsample: conv1 and the projection in one launch,
                 read x, write y1 and yd                               X + 2Y]
              conv2 (BN1+ReLU on load): read y1, write y2              2Y
              tail: read y2 and the residual (x | yd), write out       2Y + R
    backward  tail: read dout, y2, the residual, write g               3Y + R
              conv2 data + weight grad, one launch: read g, y2, y1,
                write g1                                               4Y
              identity: conv1 data + weight grad, one launch: read g1,
                y1, g, x, write dx                                     3Y + 2X
              [downsample: both data grads in one launch: read g1, y1,
                 g, yd, write dx                                       4Y + X
               conv1 weight grad: read g1, y1, x                       2Y + X
               projection weight grad: read g, yd, x                   2Y + X]

    R = X (identity) or Y (downsample).  Identity block (X = Y): 20Y.
    Downsample block: 4X + 23Y (= 31Y at stride 2 with doubled channels).

GB/s in the table is that count over the variant's time (the same credit for every
variant). ``ideal_bytes`` in extra_info is a lower bound for any implementation
that keeps y1, y2 (and yd): x, dout read once, out, dx written once, each of y1,
y2 (, yd) written once and read once: 2X + 6Y (+ 2Y), i.e. 8Y for an identity
block; ``gbps_ideal`` is that count over the time. ``tflops`` counts the conv
FLOPs (forward, data grad and weight grad: 3 x 2 x 9 x N*Ho*Wo*Cout*Cin per conv).

Saved-activation memory
-----------------------
``saved_bytes``: ``fastres.testing.saved_tensor_bytes`` of one forward (every
storage autograd keeps for backward, once each, except grad-requiring leaves).
``saved_activation_bytes``: the batch-sized part of it, i.e. 4-D tensors with the
batch as first dimension (not the per-channel BN vectors, and not the bf16
weight copies that autocast makes and cuDNN's convs keep for backward).
Measured for fastres (on CUDA: on a CPU fastres runs the plain ops) and both
eager layouts; not for compiled graphs. Eager keeps x, y1, relu(bn1(y1)), y2
(, yd) and the output; fastres keeps x, y1, y2 (, yd): 3/5 for identity blocks,
5/7 for stride-2 ones.

Goals from the issue, on an H100 (CUDA rows; in extra_info ``goal``/``goal_value``/
``goal_met`` of the fastres row and in the summary; not asserted):
* time <= 0.6x eager's (the faster of the two layouts),
* time <= 0.8x torch.compile's (the faster of the two modes),
* saved activations <= 0.6x eager's.
The goal's value is the worst of (ratio / limit); <= 1 meets all three.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from resnet_bench import (COMPILE_CPU_SKIP, DTYPES, amp, compiled_step, cudnn_benchmark,  # noqa: F401 (fixture)
                          fastres, precision_info, ref, release_compiled, require_fastres, warm,
                          with_launch_count)

# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class BlockCase:
    net: str
    cin: int
    cout: int
    hw: int  # input height = width
    stride: int
    batch: int = 512

    @property
    def downsample(self) -> bool:
        return self.stride != 1 or self.cin != self.cout

    @property
    def out_hw(self) -> int:
        return (self.hw - 1) // self.stride + 1  # 3x3, padding 1

    @property
    def name(self) -> str:
        size = f"@{self.hw}x{self.hw}"
        return f"{self.cin}{size}" if not self.downsample else f"{self.cin}to{self.cout}s{self.stride}{size}"

    @property
    def x_numel(self) -> int:
        return self.batch * self.cin * self.hw * self.hw

    @property
    def y_numel(self) -> int:
        return self.batch * self.cout * self.out_hw * self.out_hw


def fused_traffic(case: BlockCase) -> dict:
    """Elements each launch of the fused design reads + writes (see the module docstring)."""
    X, Y = case.x_numel, case.y_numel
    if case.downsample:
        return {"conv1 + projection": X + 2 * Y, "conv2": 2 * Y, "tail": 3 * Y, "tail backward": 4 * Y,
                "conv2 grads": 4 * Y, "data grads": 4 * Y + X, "conv1 wgrad": 2 * Y + X,
                "projection wgrad": 2 * Y + X}
    return {"conv1": X + Y, "conv2": 2 * Y, "tail": 2 * Y + X, "tail backward": 3 * Y + X, "conv2 grads": 4 * Y,
            "conv1 grads": 3 * Y + 2 * X}


def fused_elements(case: BlockCase) -> int:
    return sum(fused_traffic(case).values())


def ideal_elements(case: BlockCase) -> int:
    """x, dout read once; out, dx written once; y1, y2 (, yd) written once and read once."""
    return 2 * case.x_numel + 2 * case.y_numel + 4 * case.y_numel + (2 * case.y_numel if case.downsample else 0)


def conv_flops(case: BlockCase) -> int:
    """Forward + data grad + weight grad of every conv of the block."""
    per_out_channel_in = case.cin + case.cout + (case.cin if case.downsample else 0)
    forward = 2 * 9 * case.batch * case.out_hw**2 * case.cout * per_out_channel_in
    return 3 * forward


RESNET20 = [("resnet20", 16, 16, 32, 1), ("resnet20", 16, 32, 32, 2), ("resnet20", 32, 32, 16, 1),
            ("resnet20", 32, 64, 16, 2), ("resnet20", 64, 64, 8, 1)]
RESNET18 = [("resnet18", 64, 64, 32, 1), ("resnet18", 64, 128, 32, 2), ("resnet18", 128, 128, 16, 1),
            ("resnet18", 128, 256, 16, 2), ("resnet18", 256, 256, 8, 1), ("resnet18", 256, 512, 8, 2),
            ("resnet18", 512, 512, 4, 1)]
CUDA_CASES = [BlockCase(*c) for c in RESNET20 + RESNET18]
CPU_CASE = BlockCase("tiny", 16, 16, 8, 1, batch=8)  # smoke only: a few ms per step on a CPU

# The counting of the docstring, on one identity and one stride-2 block.
_id, _down = BlockCase("t", 16, 16, 32, 1), BlockCase("t", 16, 32, 32, 2)
assert fused_elements(_id) == 20 * _id.y_numel and ideal_elements(_id) == 8 * _id.y_numel
assert _down.x_numel == 2 * _down.y_numel
assert fused_elements(_down) == 4 * _down.x_numel + 23 * _down.y_numel == 31 * _down.y_numel
assert ideal_elements(_down) == 2 * _down.x_numel + 8 * _down.y_numel

VARIANTS = ["fastres", "eager", "eager channels_last", "torch.compile", "torch.compile max-autotune"]
EAGER = ("eager", "eager channels_last")
COMPILED = ("torch.compile", "torch.compile max-autotune")
SAVED_MEASURED = ("fastres",) + EAGER
LIMITS = {"eager": 0.6, "torch.compile": 0.8, "saved": 0.6}

# --------------------------------------------------------------------------- one block, one step


@pytest.fixture(scope="module", autouse=True)
def _release_device_memory():
    """After the last row: free the cached inputs and compiled blocks before other benchmark files run."""
    yield
    block_inputs.cache_clear()
    release_compiled()


@functools.lru_cache(maxsize=1)  # the rows of a group run back to back
def block_inputs(case: BlockCase, dtype: str, device: str):
    """The group's weights (reference state_dict), input and output gradient (NCHW-contiguous)."""
    require_fastres()
    torch.manual_seed(0)
    proj = ref.downsample(case.cin, case.cout, case.stride) if case.downsample else None
    state = ref.ResidualBlock(case.cin, case.cout, case.stride, proj).state_dict()
    gen = torch.Generator(device).manual_seed(0)
    act = DTYPES[dtype]  # a block inside an autocast network gets bf16 activations
    x = torch.randn(case.batch, case.cin, case.hw, case.hw, generator=gen, device=device, dtype=act)
    dout = torch.randn(case.batch, case.cout, case.out_hw, case.out_hw, generator=gen, device=device, dtype=act)
    return state, x, dout


def block_step(variant: str, case: BlockCase, dtype: str, device: str):
    """A zero-argument step (forward + backward) of ``variant``; ``step.forward_only()`` runs the forward."""
    require_fastres()
    state, x0, dout0 = block_inputs(case, dtype, device)
    cls = fastres.nn.ResidualBlock if variant == "fastres" else ref.ResidualBlock
    proj = ref.downsample(case.cin, case.cout, case.stride) if case.downsample else None
    block = cls(case.cin, case.cout, case.stride, proj)
    block.load_state_dict(state)
    memory_format = torch.contiguous_format if variant == "eager" else torch.channels_last
    block = block.to(device=device, memory_format=memory_format).train()
    x = x0.clone(memory_format=memory_format).requires_grad_()
    dout = dout0.clone(memory_format=memory_format)
    params = list(block.parameters())
    forward = block
    cudagraphs = False
    if variant in COMPILED:
        mode = "max-autotune" if variant.endswith("max-autotune") else None
        forward = torch.compile(block, mode=mode, dynamic=False)
        cudagraphs = mode == "max-autotune"

    def forward_only():
        with amp(device, dtype):
            return forward(x.view_as(x))  # a non-leaf input: saved like an activation

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x.grad = None
        for p in params:
            p.grad = None
        forward_only().backward(dout)

    step.forward_only = forward_only
    step.extra_info = {"memory_format": "contiguous" if variant == "eager" else "channels_last"}
    if variant in COMPILED:
        step.extra_info["compile_mode"] = mode or "default"
    return step, x, params


def block_factories(group: str, case: BlockCase, dtype: str, device: str) -> dict:
    def make(variant: str):
        def factory():
            if variant in COMPILED:
                if device != "cuda":
                    pytest.skip(COMPILE_CPU_SKIP)

                def build():
                    step, _, _ = block_step(variant, case, dtype, device)
                    return warm(step)

                return compiled_step(group, variant, build)
            step, x, _ = block_step(variant, case, dtype, device)
            if variant == "fastres":
                info = step.extra_info
                step = with_launch_count(step, x)
                step.extra_info.update(info)
            return step

        return factory

    return {v: make(v) for v in VARIANTS}


# --------------------------------------------------------------------------- saved-activation memory


def saved_activation_bytes(fn, batch: int, param_shapes: set) -> int:
    """Bytes of the batch-sized tensors autograd saves while ``fn()`` runs (each storage once)."""
    from fastres.testing import saved_tensor_bytes

    return saved_tensor_bytes(
        fn, keep=lambda t: t.dim() == 4 and t.shape[0] == batch and tuple(t.shape) not in param_shapes)


@functools.lru_cache(maxsize=1)
def saved_memory(case: BlockCase, dtype: str, device: str) -> dict:
    """variant -> {"saved_bytes", "saved_activation_bytes"} for fastres and the eager layouts."""
    from fastres.testing import saved_tensor_bytes

    out = {}
    for variant in SAVED_MEASURED:
        step, _, params = block_step(variant, case, dtype, device)
        shapes = {tuple(p.shape) for p in params}
        out[variant] = {
            "saved_bytes": saved_tensor_bytes(step.forward_only),
            "saved_activation_bytes": saved_activation_bytes(step.forward_only, case.batch, shapes),
        }
        del step, params
    return out


# --------------------------------------------------------------------------- goal


def block_goal(saved_ratio: Optional[float]):
    def goal(ms: dict):
        if "fastres" not in ms:
            return None
        parts = []  # (text, ratio, limit)
        eager = [ms[v] for v in EAGER if v in ms]
        if eager:
            parts.append(("best eager", ms["fastres"] / min(eager), LIMITS["eager"]))
        compiled = [ms[v] for v in COMPILED if v in ms]
        if compiled:
            parts.append(("best torch.compile", ms["fastres"] / min(compiled), LIMITS["torch.compile"]))
        if saved_ratio is not None:
            parts.append(("saved activations vs eager", saved_ratio, LIMITS["saved"]))
        if not parts:
            return None
        worst = max(r / limit for _, r, limit in parts)
        text = "; ".join(f"{name} {r:.2f}x (<= {limit})" for name, r, limit in parts)
        return f"{text}; worst ratio/limit (<= 1 meets all)", worst, worst <= 1 + 1e-9

    return goal


# --------------------------------------------------------------------------- rows


def block_rows():
    for case in CUDA_CASES:
        for dtype in DTYPES:
            yield pytest.param("cuda", case, dtype, id=f"cuda-{case.net}-{case.name}-{dtype}", marks=pytest.mark.gpu)
    yield pytest.param("cpu", CPU_CASE, "fp32", id=f"cpu-{CPU_CASE.net}-{CPU_CASE.name}-b{CPU_CASE.batch}-fp32")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,case,dtype", list(block_rows()))
def test_block(bench, device, case, dtype, variant):
    require_fastres()
    group = f"block/{device}/{case.net}/{case.name}/b{case.batch}/{dtype}"
    elem = DTYPES[dtype].itemsize
    bytes_moved = fused_elements(case) * elem
    ideal = ideal_elements(case) * elem
    flops = conv_flops(case)

    saved = saved_memory(case, dtype, device)
    eager_act = saved["eager"]["saved_activation_bytes"]
    mine = saved.get(variant)
    saved_info = {"saved_bytes": None, "saved_activation_bytes": None, "saved_ratio_vs_eager": None,
                  "saved_activation_ratio_vs_eager": None, "saved_eager_bytes": saved["eager"]["saved_bytes"],
                  "saved_eager_activation_bytes": eager_act}
    if mine is not None:
        saved_info.update(mine)
        saved_info["saved_ratio_vs_eager"] = mine["saved_bytes"] / saved["eager"]["saved_bytes"]
        saved_info["saved_activation_ratio_vs_eager"] = mine["saved_activation_bytes"] / eager_act
    fastres_saved_ratio = saved["fastres"]["saved_activation_bytes"] / eager_act

    info = bench.compare(
        group,
        block_factories(group, case, dtype, device),
        variant,
        device=device,
        bytes_moved=bytes_moved,
        goal=block_goal(fastres_saved_ratio) if device == "cuda" else None,
        extra={
            "net": case.net, "shape": case.name, "batch": case.batch, "in_channels": case.cin,
            "out_channels": case.cout, "in_hw": case.hw, "stride": case.stride, "downsample": case.downsample,
            "bytes_moved_is": "fused design's minimal traffic (module docstring)", "ideal_bytes": ideal,
            "conv_flops": flops, **precision_info(device, dtype), **saved_info,
        },
    )
    ms = info.get("median_ms")
    if ms:
        info["gbps_ideal"] = bench.gbps(ideal, ms)
        info["tflops"] = flops / (ms * 1e-3) / 1e12
