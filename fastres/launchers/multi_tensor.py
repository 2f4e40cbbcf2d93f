"""Device tables that let one launch update a whole list of tensors.

See ``fastres/kernels/multi_tensor.py`` for the layout. Tables are cached per
bucket and rebuilt only when an address, a size or a first-step flag changes,
so a training loop uploads them once (and a CUDA graph can capture the step
after one warm-up step).

CUDA graphs: tables that a launch being captured reads are kept for the life of
the process (:data:`_captured_tables`), whatever the cache does later (an eager
step after ``zero_grad(set_to_none=True)`` moves the grads, ``load_state_dict``
drops the cache), since the graph reads them on every replay; tables only ever
used eagerly are released when superseded. A capture never builds tables: see
:meth:`TableCache.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..kernels import multi_tensor as layout
from . import core

ROW = layout.ROW.value
ALIGNMENT_BYTES = 16


@dataclass
class Tables:
    tensor_table: torch.Tensor  # int64 [n_tensors, ROW]
    chunk_table: torch.Tensor  # int64 [n_programs, 2]: (tensor, chunk)
    counters: torch.Tensor  # int32 [n_tensors], zero between launches
    n_programs: int
    aligned: bool  # every address 16-byte aligned: full blocks may be vectorised
    captured: bool = False  # read by a launch captured into a CUDA graph: in _captured_tables for good


# Tables that captured launches read: a graph may be replayed as long as it lives, which fastres cannot
# see, so these are never freed. At most one entry per bucket and capture (the tables are reused while
# the tensors stay), not per step.
_captured_tables: list[Tables] = []


class TableCache:
    """The tables of one bucket of tensors, rebuilt only when the tensors change."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._tables: Optional[Tables] = None
        # The tables of the step after a first step (first-step flags cleared, same tensors), built with
        # it: that step then finds its tables ready, so it can be captured after one eager warm-up step.
        self._next: Optional[tuple[tuple, Tables]] = None
        # Addresses of the state and step columns, by list identity: callers
        # pass the same list objects every step, and state tensors are updated
        # in place, so only params and grads need their addresses read again.
        self._state_addresses: dict[int, tuple[Sequence[Optional[torch.Tensor]], tuple[int, ...]]] = {}

    def _addresses(self, position: int, column: Sequence[Optional[torch.Tensor]]) -> tuple[int, ...]:
        if position >= 2:
            cached = self._state_addresses.get(position)
            if cached is not None and cached[0] is column:
                return cached[1]
        addresses = tuple(0 if t is None else t.data_ptr() for t in column)
        if position >= 2:
            self._state_addresses[position] = (column, addresses)
        return addresses

    def tables(
        self,
        columns: Sequence[Sequence[Optional[torch.Tensor]]],
        steps: Optional[Sequence[torch.Tensor]],
        first_step: Optional[Sequence[bool]],
        chunk: int,
    ) -> Tables:
        """``columns[c][i]``: tensor ``i`` of column ``c`` (param, grad, state0..2), or None."""
        params = columns[0]
        n = len(params)
        absent = (0,) * n
        addresses = [self._addresses(position, column) for position, column in enumerate(columns)]
        addresses += [absent] * (5 - len(columns))
        addresses.append(absent if steps is None else self._addresses(5, steps))
        key = (
            chunk,
            *addresses,
            tuple(p.numel() for p in params),
            absent if first_step is None else tuple(int(f) for f in first_step),
        )
        tables = self._tables
        if key != self._key or tables is None:
            if self._next is not None and key == self._next[0] and not (tables is not None and tables.captured):
                tables = self._next[1]  # shares the counters of the tables it follows, which no graph reads
            else:
                tables = self._rebuilt(key, tables, n, params[0].device, chunk)
            self._key, self._tables, self._next = key, tables, None
            if any(key[-1]):
                flags_cleared = (*key[:-1], (0,) * n)
                self._next = (flags_cleared, _with_addresses(tables, flags_cleared[1:], params[0].device))
        if not tables.captured and core.capturing(params[0].device):
            tables.captured = True
            _captured_tables.append(tables)
        return tables

    def _rebuilt(self, key: tuple, old: Optional[Tables], n: int, device: torch.device, chunk: int) -> Tables:
        # Refused inside a capture rather than made capture-safe. A captured upload is a copy node that
        # re-reads its pinned host buffer on every replay, so the buffer would have to be allocated during
        # the capture (pinned allocation there depends on the torch version) and kept for good; and what
        # needs a rebuild there is a first step (whose first-step flags the graph would then replay on
        # every step) or grads the capture allocates itself. An eager warm-up step builds the tables
        # (and, for a first step, the next step's too), which the torch.cuda.graphs recipe does anyway,
        # and torch.compile's CUDA graphs never capture optimizer.step (it runs outside the compiled graph).
        if core.capturing(device):
            raise RuntimeError(
                "fastres: the optimizer's device tables (the addresses and sizes of the params, grads and "
                "state of one launch) would have to be rebuilt inside a CUDA graph capture: a tensor moved "
                "or appeared since the last eager step. Run at least one eager step (warm-up) with the same "
                "tensors before capturing, and keep the grads where they are (zero_grad(set_to_none=False), "
                "not set_to_none=True, before and during the capture)."
            )
        if old is not None and not old.captured and key[0] == self._key[0] and key[-2:] == self._key[-2:]:
            # Only addresses moved (e.g. zero_grad(set_to_none=True) gave new grads): upload the tensor
            # table; the chunk table and the counters (zero between launches) stay. Not when a graph
            # reads the old tables: their counters are the graph's alone.
            return _with_addresses(old, key[1:], device)
        return _build(key[1:], n, device, chunk)


def _tensor_table(columns: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[torch.Tensor, bool]:
    """The device table of ``columns`` and whether every address in it is 16-byte aligned."""
    aligned = all(a % ALIGNMENT_BYTES == 0 for column in columns[: layout.STEP.value + 1] for a in column)
    return _to_device(torch.tensor(columns, dtype=torch.int64).t().contiguous(), device), aligned


def _with_addresses(tables: Tables, columns: tuple[tuple[int, ...], ...], device: torch.device) -> Tables:
    tensor_table, aligned = _tensor_table(columns, device)
    return Tables(tensor_table, tables.chunk_table, tables.counters, tables.n_programs, aligned)


def _build(columns: tuple[tuple[int, ...], ...], n: int, device: torch.device, chunk: int) -> Tables:
    """``columns``: the table's ROW columns, each a tuple of ``n`` ints."""
    tensor_table, aligned = _tensor_table(columns, device)
    numels = columns[layout.NUMEL.value]
    chunk_table = torch.tensor(
        [(t, c) for t, numel in enumerate(numels) for c in range(max(1, -(-numel // chunk)))], dtype=torch.int64
    ).view(-1, 2)
    return Tables(
        tensor_table=tensor_table,
        chunk_table=_to_device(chunk_table, device),
        counters=torch.zeros(n, dtype=torch.int32, device=device),
        n_programs=chunk_table.shape[0],
        aligned=aligned,
    )


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned source: the copy is asynchronous and never waits for the GPU.
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)
