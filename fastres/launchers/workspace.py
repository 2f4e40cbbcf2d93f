"""Workspaces of the in-launch reductions: fp32 partials and zeroed int32 counters.

A launch that finishes a reduction across its programs (BatchNorm statistics, a
weight gradient's splits) needs scratch partials and counters that start at
zero; it leaves the counters at zero when it ends. :func:`_workspace` hands them
out:

* eager launches share one :class:`_Workspace` per device and stream: the
  stream the kernel is launched on (the current stream of the current device,
  which the entry points' device guard made the tensors' device), so launches
  that share a region run one after another;
* a launch captured into a CUDA graph gets buffers of its own
  (:class:`_CapturedWorkspace`), allocated during the capture and dropped by
  fastres when the op returns, like any intermediate tensor of the captured
  code. They come from the graph's private memory pool, which keeps them for the
  graph's lifetime and never hands them to eager work or to another graph,
  except to graphs the user (or ``torch.compile``'s CUDA graph trees) made
  share that pool, which must replay one after another in capture order. The
  counters are zeroed by a memset node recorded just before the launch, so every
  replay starts from zero; a later launch of the same capture may reuse the
  memory, as captured intermediates do, so a captured step needs the largest
  launch's partials, not their sum. Nothing fastres keeps lives in the pool, so
  CUDA graph trees see no untracked allocation from a recording.
"""

from __future__ import annotations

import torch

from . import core


class _Workspace:
    """fp32 partials and zeroed int32 counters for the eager launches on one device and stream.

    Every launch consumes its partials and leaves its counters at zero before
    it ends, so launches on one stream can share one region. Buffers only
    grow; an outgrown one is released to PyTorch's allocator, which reuses it
    only for later work on the same stream. No CUDA graph reads these buffers:
    captured launches get their own (:class:`_CapturedWorkspace`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scratch = torch.empty(0, dtype=torch.float32, device=device)
        self.counter = torch.zeros(0, dtype=torch.int32, device=device)
        self._views: dict[tuple[bool, int], torch.Tensor] = {}  # the sizes a model asks for, sliced once

    def partials(self, numel: int) -> torch.Tensor:
        """``numel`` fp32 values (exactly: a launch's arguments say what it touches)."""
        view = self._views.get((False, numel))
        if view is None:
            if self.scratch.numel() < numel:
                self.scratch = torch.empty(max(numel, 2 * self.scratch.numel(), 1 << 16), dtype=torch.float32,
                                           device=self.device)
                self._views = {k: v for k, v in self._views.items() if k[0]}
            view = self._views[(False, numel)] = self.scratch[:numel]
        return view

    def counters(self, numel: int) -> torch.Tensor:
        """``numel`` int32 counters, all zero."""
        view = self._views.get((True, numel))
        if view is None:
            if self.counter.numel() < numel:
                self.counter = torch.zeros(max(numel, 2 * self.counter.numel(), 4096), dtype=torch.int32,
                                           device=self.device)
                self._views = {k: v for k, v in self._views.items() if not k[0]}
            view = self._views[(True, numel)] = self.counter[:numel]
        return view


class _CapturedWorkspace:
    """The partials and counters of one launch captured into a CUDA graph: exactly the sizes asked for,
    allocated during the capture (from the graph's pool), referenced only by the launch that asked."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def partials(self, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=torch.float32, device=self.device)

    def counters(self, numel: int) -> torch.Tensor:
        return torch.zeros(numel, dtype=torch.int32, device=self.device)  # a memset node in the graph


_workspaces: dict[tuple, _Workspace] = {}


def _launch_stream(index: int) -> int:
    """The raw handle of the current stream of CUDA device ``index``: the stream Triton launches on
    (its driver reads it with this call) once the device guard made ``index`` the current device."""
    return torch._C._cuda_getCurrentRawStream(index)


def _workspace(device: torch.device) -> _Workspace | _CapturedWorkspace:
    """The workspace of one launch on ``device`` (the current device: see the module docstring)."""
    if core.capturing(device):
        return _CapturedWorkspace(device)
    index = device.index  # None for CPU tensors (and cheaper to read than device.type)
    key = (device,) if index is None else (device, _launch_stream(index))
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = _Workspace(device)
    return ws
