"""Test set-up: Triton's interpreter on machines without a GPU.

``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated, so it
must be set before anything imports triton or fastres. Without a CUDA device
every kernel then runs under the interpreter on CPU tensors; on a GPU machine
the same tests run the compiled kernels on CUDA tensors (``DEVICE``).
"""

from __future__ import annotations

import os
import sys

# Decide before torch/triton are imported anywhere in the test session.
if "torch" in sys.modules or "triton" in sys.modules:  # pragma: no cover - misuse guard
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
        raise RuntimeError("tests/conftest.py must run before triton is imported")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


EXAMPLE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_cifar.py")


@pytest.fixture(scope="module")
def train_cifar():
    """``examples/train_cifar.py`` imported as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cifar_example", EXAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def device() -> torch.device:
    """The device whose tensors take the Triton kernels in this session."""
    return DEVICE


def pytest_report_header(config: pytest.Config) -> str:
    import fastres

    probe = torch.empty(0, device=DEVICE)
    backend = fastres.backend_for(probe)
    return f"fastres {fastres.__version__}: tests run on {DEVICE} -> {backend.name} ({backend.reason})"
