"""Synchronised BatchNorm inside the fused ops (``fastres/_sync_bn.py``).

Two processes (gloo, CPU, kernels under the interpreter) train a fused stem +
downsampling block + identity block whose BatchNorms are ``nn.SyncBatchNorm``
(``convert_sync_batchnorm``), each on its own half of a batch. Synchronised
BatchNorm over two ranks is BatchNorm over the union batch, so the oracle is
the plain model on the whole batch in float64 (and in float32 for PyTorch's own
error): each rank's outputs and input gradient, the running statistics after
each step, and the parameter gradients summed over the ranks (``nn.SyncBatchNorm``
leaves them local, DDP sums them), by the project's three-way rule.
(``nn.SyncBatchNorm`` itself refuses CPU tensors, so it cannot be the oracle here.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres
from fastres.reference import nn as ref
from fastres.testing import count_launches

from optim_cases import DEVICE

WORLD = 2
BATCH_PER_RANK = 2


def _plain_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(ref.ConvBNReLU(3, 4), ref.ResidualBlock(4, 8, stride=2, downsample=ref.downsample(4, 8, 2)),
                        ref.ResidualBlock(8, 8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
    net[1].bn1.momentum = None  # the cumulative average too
    return net


def _bound(fused: torch.Tensor, fp32: torch.Tensor, oracle: torch.Tensor, name: str) -> str:
    err = (fused.double() - oracle).abs().max().item()
    err_torch = (fp32.double() - oracle).abs().max().item()
    scale = oracle.abs().max().item()
    bound = 2 * err_torch + 2e-5 * max(scale, 1.0)
    return "" if err <= bound else f"{name}: error {err:.3g} > {bound:.3g} (torch fp32 {err_torch:.3g})"


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        plain64 = _plain_net().double()
        plain32 = _plain_net()
        fused = nn.SyncBatchNorm.convert_sync_batchnorm(fastres.convert(_plain_net()))
        gen = torch.Generator().manual_seed(2)
        problems = []
        for step in range(2):
            x = torch.randn(WORLD * BATCH_PER_RANK, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)
            weights = torch.randn(WORLD * BATCH_PER_RANK, 8, 3, 3, generator=gen)
            mine = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
            results = []
            for model, dtype, rows in ((plain64, torch.float64, slice(None)), (plain32, torch.float32, slice(None)),
                                       (fused, torch.float32, mine)):
                model.zero_grad(set_to_none=True)
                xi = x[rows].to(dtype).requires_grad_(True)
                with count_launches() as launches:
                    out = model(xi)
                    (out * weights[rows].to(dtype)).sum().backward()
                results.append((out, xi.grad, sum(launches.values())))
            (o64, dx64, _), (o32, dx32, _), (of, dxf, n_launches) = results
            # stem 2 + 2, downsampling block 3 + 5, identity block 3 + 3: the fused launches, as without sync
            problems.append("" if n_launches == 2 + 2 + 3 + 5 + 3 + 3 else f"step {step}: {n_launches} launches")
            problems.append(_bound(of, o32[mine], o64[mine], f"step {step} output"))
            problems.append(_bound(dxf, dx32[mine], dx64[mine], f"step {step} input grad"))
            for (name, p64), p32, pf in zip(plain64.named_parameters(), plain32.parameters(), fused.parameters()):
                grad = pf.grad.clone()
                dist.all_reduce(grad)
                problems.append(_bound(grad, p32.grad, p64.grad, f"step {step} {name}.grad"))
            for (name, b64), b32, bf in zip(plain64.named_buffers(), plain32.buffers(), fused.buffers()):
                if b64.is_floating_point():
                    problems.append(_bound(bf, b32, b64, f"step {step} {name}"))
                else:
                    problems.append("" if torch.equal(bf, b64) else f"step {step} {name}: {bf} != {b64}")
        problems = [p for p in problems if p]
        assert not problems, f"rank {rank}:\n" + "\n".join(problems)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(DEVICE.type != "cpu" or not dist.is_available(), reason="gloo on CPU under the interpreter")
def test_fused_sync_batchnorm_on_two_ranks_is_batchnorm_on_the_union_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


def test_sync_batchnorm_without_a_process_group_is_fused_as_batchnorm():
    """nn.SyncBatchNorm that does not synchronise (no process group, or eval) acts as BatchNorm2d: fused."""
    block = nn.SyncBatchNorm.convert_sync_batchnorm(fastres.nn.ResidualBlock(8, 8).to(DEVICE))
    plain = copy.deepcopy(block)
    assert type(block) is fastres.nn.ResidualBlock and isinstance(block.bn1, nn.SyncBatchNorm)
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    for mode, launches_expected in ((False, 2), (True, 3)):
        block.train(mode)
        plain.train(mode)
        with count_launches() as launches, torch.no_grad():
            out = block(x)
        assert sum(launches.values()) == launches_expected
        with torch.no_grad():
            torch.testing.assert_close(out, ref.ResidualBlock.forward(plain, x), rtol=1e-4, atol=1e-4)
