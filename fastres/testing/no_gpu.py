"""Triton's launch path on a machine without a GPU: kernels compiled for one, launches recorded.

:func:`compile_only_driver` makes Triton compile each launch's specialisation
for a GPU architecture this machine lacks (ptxas runs on the CPU) and hand the
launch to a recorder instead of the CUDA driver. Everything Triton and fastres
do on the host before the driver call then runs for real, so it can be timed
(``benchmarks/host_time.py --triton``) and checked: ``tests/test_launch_path.py``
compares what reaches the "driver" through fastres's kept compiled kernels with
what reaches it through Triton's own JIT path.

The kernels must be JIT kernels, not interpreted ones: import fastres with
``TRITON_INTERPRET`` unset, then :func:`kernels_on_cpu` routes CPU tensors to
them (their pointers are only recorded, never dereferenced).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple


class LauncherCall(NamedTuple):
    """One launch as the CUDA launcher would receive it."""

    launcher: Any  # the launcher object: one per compiled kernel (specialisation)
    grid: tuple[int, int, int]
    stream: int
    function: Any
    packed_metadata: Any
    launch_metadata: Any
    enter_hook: Any
    exit_hook: Any
    args: tuple  # every kernel parameter's value, in the kernel's order


class _RecordingLauncher:
    def __init__(self, calls: list[LauncherCall] | None):
        self.calls = calls

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        if self.calls is not None:
            self.calls.append(LauncherCall(self, (grid_x, grid_y, grid_z), stream, function, packed_metadata,
                                           launch_metadata, enter_hook, exit_hook, args))


class _Utils:
    def __init__(self, max_shared_mem: int):
        self.max_shared_mem = max_shared_mem

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        return {"max_shared_mem": self.max_shared_mem}


class _CompileOnlyDriver:
    """The parts of Triton's driver interface that compiling and launching use."""

    def __init__(self, arch: int, calls: list[LauncherCall] | None):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(232448 if arch >= 90 else 166912)
        self.launcher_cls = lambda src, metadata: _RecordingLauncher(calls)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def compile_only_driver(arch: int = 90, record: bool = True) -> Iterator[list[LauncherCall]]:
    """Inside the block Triton compiles for ``sm_<arch>`` and records launches in the yielded list
    (``record=False``: drops them, for timing).

    Kernels keep what they compiled here (Triton's and fastres's caches are per device index and
    do not know the driver changed): use it in a process of its own.
    """
    from triton.runtime.driver import driver

    calls: list[LauncherCall] = []
    previous = driver._active  # reset_active() would create the default driver, which needs a GPU
    driver.set_active(_CompileOnlyDriver(arch, calls if record else None))
    try:
        yield calls
    finally:
        driver._active = previous


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """CPU tensors take fastres's kernels (JIT ones, when ``TRITON_INTERPRET`` was unset at import)."""
    from .. import _backend

    saved = _backend.INTERPRET
    _backend.INTERPRET = True
    try:
        yield
    finally:
        _backend.INTERPRET = saved
