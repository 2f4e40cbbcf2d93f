"""fastres.launchers.core.launch's kept compiled kernels.

The comparison with Triton's own JIT path needs JIT kernels, so it runs in a
subprocess without TRITON_INTERPRET (tests/launch_path_check.py): the kernels
are compiled for sm_90 on this CPU and the launches recorded instead of run.
The specialisation key is tested here directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fastres.launchers import core

CHECK = Path(__file__).with_name("launch_path_check.py")


def test_kept_kernels_pass_the_launcher_what_tritons_path_passes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0
    assert proc.stdout.startswith("OK: ")


def key(*args, **meta):
    return core._specialisation_key(0, args, meta)


def test_specialisation_key_separates_what_triton_specialises_on() -> None:
    a = torch.empty(64)
    b = torch.empty(64)
    base = key(a, 7, 0.5, BLOCK=16)
    assert key(b, 7, 0.25, BLOCK=16) == base  # other tensors of the same dtype and alignment, other float values
    different = [
        key(torch.empty(65)[1:], 7, 0.5, BLOCK=16),  # a pointer off 16-byte alignment
        key(a.to(torch.bfloat16), 7, 0.5, BLOCK=16),  # a dtype
        key(a, 1, 0.5, BLOCK=16),  # an int of 1 (Triton makes it a constant)
        key(a, 16, 0.5, BLOCK=16),  # a multiple of 16
        key(a, 2**31, 0.5, BLOCK=16),  # an int beyond int32
        key(a, True, 0.5, BLOCK=16),  # a bool where an int was
        key(a, 7, 1, BLOCK=16),  # an int where a float was
        key(a, 7, 0.5, BLOCK=32),  # a constexpr
        key(a, 7, 0.5, BLOCK=16, num_warps=8),  # a launch option
        key(a, 7, 0.5),
    ]
    assert base not in different
    assert len(set(different)) == len(different)
    assert core._specialisation_key(1, (a, 7, 0.5), {"BLOCK": 16}) != base  # another device
    # A tuple of tensors would make every key new (and the kept kernels grow without bound): no key.
    assert key((a, b), 7) is None


def test_launches_the_key_cannot_hold_take_tritons_path(monkeypatch) -> None:
    """A tuple argument or an unhashable keyword argument: the launch still happens, through Triton."""
    calls = []

    class FakeJIT:
        pre_run_hooks = []

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((grid, args, meta))

    class Driver:
        def get_current_device(self):
            return 0

    fake = core._triton()._replace(JITFunction=FakeJIT, driver=type("Config", (), {"active": Driver()})())
    monkeypatch.setattr(core, "_triton", lambda: fake)
    kernel = FakeJIT()
    t = torch.empty(4)
    core.launch(kernel, (1,), (t, t), 3)
    core.launch(kernel, (1,), t, 3, OPTION=[1, 2])
    assert [c[0] for c in calls] == [(1,), (1,)]
    assert id(kernel) not in core._compiled or not core._compiled[id(kernel)][1]


def test_interpreted_kernels_take_tritons_path() -> None:
    """Under the interpreter nothing is kept (there is no compiled kernel to keep)."""
    import fastres

    before = sum(len(kept) for _, kept in core._compiled.values())
    opt = fastres.optim.SGD([torch.nn.Parameter(torch.randn(8))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.randn(8)
    opt.step()
    assert sum(len(kept) for _, kept in core._compiled.values()) == before
