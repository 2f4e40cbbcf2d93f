"""Claims only a CUDA device can check: no host sync in step(), CUDA-graph capture.

Skipped without a GPU (the interpreter has neither syncs nor graphs); run by
scripts/gpu_check.sh on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import fastres

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(n: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shapes = [(), (1,), (127,), (1025,), (16, 3, 3, 3), (70000,), (5, 5), (33,)][:n]
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: fastres.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: fastres.optim.Adam(ps, lr=1e-3, amsgrad=True),
        lambda ps: fastres.optim.AdamW(ps, lr=1e-3),
        lambda ps: fastres.optim.RMSprop(ps, lr=1e-3, centered=True, momentum=0.5),
        lambda ps: fastres.optim.Adagrad(ps, lr=1e-2),
        lambda ps: fastres.optim.Adadelta(ps),
    ],
    ids=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta"],
)
def test_step_never_synchronises(make):
    params = _params()
    optimizer = make(params)
    optimizer.step()  # first step builds state and tables (allocations are allowed here)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_clip_grad_norm_never_synchronises():
    params = _params()
    fastres.optim.clip_grad_norm_(params, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastres.optim.clip_grad_norm_(params, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop", "Adadelta"])
def test_step_captured_in_cuda_graph_matches_eager(name):
    kwargs = {"lr": torch.tensor(1e-2, device="cuda")}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    else:
        kwargs["capturable"] = True
    eager, graphed = _params(), _params()
    opt_eager = getattr(fastres.optim, name)(eager, **kwargs)
    opt_graphed = getattr(fastres.optim, name)(graphed, **{**kwargs, "lr": kwargs["lr"].clone()})

    # Warm up on a side stream (state, tables, compilation), as CUDA graphs need.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt_graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    opt_eager.step()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graphed.step()
    for step in range(5):
        new_grads = [torch.randn_like(p) for p in eager]
        for p, q, g in zip(eager, graphed, new_grads):
            p.grad.copy_(g)
            q.grad.copy_(g)
        if step == 3:  # a scheduler-style change of the tensor lr is seen by the graph
            opt_eager.param_groups[0]["lr"].fill_(5e-3)
            opt_graphed.param_groups[0]["lr"].fill_(5e-3)
        opt_eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    for p, q in zip(eager, graphed):
        for key, value in opt_eager.state[p].items():
            torch.testing.assert_close(opt_graphed.state[q][key], value, rtol=0, atol=0)
