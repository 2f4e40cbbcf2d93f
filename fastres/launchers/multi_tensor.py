"""Device tables that let one launch update a whole list of tensors.

See ``fastres/kernels/multi_tensor.py`` for the layout. Tables are cached per
bucket and rebuilt only when an address, a size or a first-step flag changes,
so a training loop uploads them once (and a CUDA graph can capture the step
after one warm-up step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..kernels import multi_tensor as layout

ROW = layout.ROW.value
ALIGNMENT_BYTES = 16


@dataclass
class Tables:
    tensor_table: torch.Tensor  # int64 [n_tensors, ROW]
    chunk_table: torch.Tensor  # int64 [n_programs, 2]: (tensor, chunk)
    counters: torch.Tensor  # int32 [n_tensors], zero between launches
    n_programs: int
    aligned: bool  # every address 16-byte aligned: full blocks may be vectorised


class TableCache:
    """The tables of one bucket of tensors, rebuilt only when the tensors change."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._tables: Optional[Tables] = None
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
        if key == self._key and self._tables is not None:
            return self._tables
        device = params[0].device
        if self._tables is not None and self._key is not None and key[0] == self._key[0] and key[-2:] == self._key[-2:]:
            # Only addresses moved (e.g. zero_grad(set_to_none=True) gave new grads):
            # upload the tensor table; the chunk table and the counters (zero
            # between launches) stay.
            self._tables = _with_addresses(self._tables, key[1:], device)
        else:
            self._tables = _build(key[1:], n, device, chunk)
        self._key = key
        return self._tables


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
