"""fastres.ResNet against its plain-PyTorch twin, and the converter.

Interpreter shapes are tiny: a ``[1, 1, 1]`` network with 4/8/16 channels on
6x6 to 9x9 inputs runs the fused stem, identity and downsampling blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastres
from fastres.reference import nn as ref

from optim_cases import DEVICE

# Relative to the largest value: fp32 GEMMs summed in another order through a few layers.
RTOL = 1e-4 if DEVICE.type == "cpu" else 5e-3  # TF32 on the GPU, as cuDNN


def _tiny_pair(seed=0, widths=(4, 8, 16)):
    torch.manual_seed(seed)
    plain = ref.ResNet(ref.ResidualBlock, [1, 1, 1], num_classes=10, widths=widths)
    fused = fastres.ResNet(fastres.nn.ResidualBlock, [1, 1, 1], num_classes=10, widths=widths)
    fused.load_state_dict(plain.state_dict())
    return plain.to(DEVICE), fused.to(DEVICE)


def _close(name, a, b):
    scale = b.abs().max().item() + 1e-12
    err = (a - b).abs().max().item() / scale
    assert err <= RTOL, f"{name}: relative error {err:.3g} > {RTOL:g}"


@pytest.mark.parametrize("size", [8, 7], ids=["8x8", "7x7"])
def test_resnet_matches_plain_twin_train_and_eval(size):
    plain, fused = _tiny_pair()
    x = torch.randn(3, 3, size, size, device=DEVICE)
    target = torch.randint(0, 10, (3,), device=DEVICE)
    for model in (plain, fused):
        nn.functional.cross_entropy(model(x), target).backward()
    _close("logits", fused(x), plain(x))
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        _close(f"{name}.grad", p.grad, q.grad)
    for (name, b), (_, c) in zip(fused.named_buffers(), plain.named_buffers()):
        _close(name, b.double(), c.double())
    plain.eval(), fused.eval()
    with torch.no_grad():
        _close("eval logits", fused(x), plain(x))


def test_sgd_loss_curves_match():
    """Six SGD steps on one batch from the same initialisation: the loss curves agree step by step.

    Tolerance: 1e-3 relative per step (fp32 sums in another order, amplified
    through six updates of a small network)."""
    plain, fused = _tiny_pair(seed=1)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 10, (4,), generator=generator))
    data = [batch] * 6
    curves = []
    for model, optimizer_class in ((plain, torch.optim.SGD), (fused, fastres.optim.SGD)):
        optimizer = optimizer_class(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-3, atol=1e-5)
    assert curves[0][-1] < curves[0][0]  # it learns, so the comparison means something


def test_state_dict_keys_and_factories():
    for name in ref.ARCHITECTURES:
        plain = getattr(ref, name)()
        fused = getattr(fastres, name)()
        assert list(plain.state_dict()) == list(fused.state_dict()), name
        assert type(fused.layer1[0]) is fastres.nn.ResidualBlock
    # The notes' network, and He et al.'s ResNet-20 with 3x3 projections (the notes' choice).
    notes = fastres.ResNet(fastres.nn.ResidualBlock, [2, 2, 2])
    assert [k for k in notes.state_dict()][:3] == ["conv.weight", "bn.weight", "bn.bias"]
    assert "layer2.0.downsample.0.weight" in notes.state_dict() and "fc.weight" in notes.state_dict()
    assert sum(p.numel() for p in fastres.resnet20().parameters()) == 292_954
    assert fastres.resnet18_cifar().fc.in_features == 512


def test_he_initialisation():
    torch.manual_seed(0)
    model = fastres.resnet20()
    w = model.layer3[1].conv1.weight
    torch.testing.assert_close(w.std().item(), (2 / (64 * 9)) ** 0.5, rtol=0.05, atol=0)
    assert model.fc.bias.abs().max() == 0 and model.bn.weight.min() == 1


def test_convert_in_place_keeps_weights():
    torch.manual_seed(0)
    plain = ref.resnet20()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    converted = fastres.convert(plain)
    assert converted is plain and type(plain) is fastres.ResNet
    assert all(type(b) is fastres.nn.ResidualBlock for layer in (plain.layer1, plain.layer2, plain.layer3) for b in layer)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_global_pooling_accepts_any_size():
    plain, fused = _tiny_pair()
    plain.eval(), fused.eval()
    with torch.no_grad():
        for size in (6, 9):
            x = torch.randn(2, 3, size, size, device=DEVICE)
            assert fused(x).shape == (2, 10)
            _close(f"{size}x{size}", fused(x), plain(x))
