"""The training example's configuration: which recipe captures its step in a CUDA graph by default."""

from __future__ import annotations

import pytest
import torch
import torch.fx


def _resolve(train_cifar, argv, device="cuda", world_size=1):
    parser = train_cifar.build_parser()
    args = vars(parser.parse_args(argv))
    given = {k: v for k, v in args.items() if k in train_cifar.CONFIG_KEYS}
    return train_cifar.resolve_config(parser, given, None, torch.device(device), world_size)


@pytest.mark.parametrize("argv,device,world_size,expected", [
    (["--recipe", "fast"], "cuda", 1, True),  # the fast recipe on one GPU: the whole step is one graph replay
    (["--recipe", "fast", "--no-cuda-graph"], "cuda", 1, False),
    (["--recipe", "fast"], "cpu", 1, False),
    (["--recipe", "fast"], "cuda", 2, False),  # DDP's all-reduce is not captured
    (["--recipe", "fast", "--amp", "fp16"], "cuda", 1, False),  # GradScaler's skipped steps
    (["--recipe", "fast", "--compile"], "cuda", 1, False),
    (["--recipe", "fast", "--optimizer", "adagrad"], "cuda", 1, False),
    (["--recipe", "notes"], "cuda", 1, False),
    (["--recipe", "notes", "--cuda-graph"], "cuda", 1, True),
])
def test_cuda_graph_default(train_cifar, argv, device, world_size, expected):
    assert _resolve(train_cifar, argv, device, world_size)["cuda_graph"] is expected


@pytest.mark.parametrize("model,fused", [("resnet9", 16), ("preact_resnet18", 36)])
def test_plain_models_run_through_convert(train_cifar, model, fused):
    """--model resnet9|preact_resnet18: the plain-PyTorch zoo models, fastres.convert'ed with --impl fastres
    (the same state_dict keys as --impl torch's model); the report's fused count is what the run prints."""
    cfg = _resolve(train_cifar, ["--recipe", "fast", "--model", model], "cpu")
    net = train_cifar.build_model(cfg, 10)
    plain = train_cifar.build_model(dict(cfg, impl="torch"), 10)
    assert isinstance(net, torch.fx.GraphModule) and not isinstance(plain, torch.fx.GraphModule)
    assert list(net.state_dict()) == list(plain.state_dict())
    assert sum(row.op is not None for row in net.fastres_report) == fused
