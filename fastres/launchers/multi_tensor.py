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
        self._key: Optional[tuple[int, ...]] = None
        self._tables: Optional[Tables] = None

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
        rows: list[int] = []
        for i in range(n):
            for c in range(5):
                tensor = columns[c][i] if c < len(columns) else None
                rows.append(0 if tensor is None else tensor.data_ptr())
            rows.append(0 if steps is None else steps[i].data_ptr())
            rows.append(params[i].numel())
            rows.append(1 if first_step is not None and first_step[i] else 0)
        key = (chunk, *rows)
        if key != self._key or self._tables is None:
            self._tables = _build(rows, n, params[0].device, chunk)
            self._key = key
        return self._tables


def _build(rows: list[int], n: int, device: torch.device, chunk: int) -> Tables:
    table = torch.tensor(rows, dtype=torch.int64).view(n, ROW)
    addresses = table[:, : layout.STEP.value + 1]
    aligned = bool(((addresses % ALIGNMENT_BYTES) == 0).all())
    numels = table[:, layout.NUMEL.value]
    chunks_per_tensor = torch.clamp((numels + chunk - 1) // chunk, min=1)
    tensor_of_program = torch.repeat_interleave(torch.arange(n), chunks_per_tensor)
    first_program = torch.cumsum(chunks_per_tensor, 0) - chunks_per_tensor
    chunk_of_program = torch.arange(len(tensor_of_program)) - first_program[tensor_of_program]
    chunk_table = torch.stack([tensor_of_program, chunk_of_program], dim=1).contiguous()
    return Tables(
        tensor_table=_to_device(table, device),
        chunk_table=_to_device(chunk_table, device),
        counters=torch.zeros(n, dtype=torch.int32, device=device),
        n_programs=len(tensor_of_program),
        aligned=aligned,
    )


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned source: the copy is asynchronous and never waits for the GPU.
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)
