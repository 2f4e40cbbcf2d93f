"""Packaging and backend decision."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import fastres


def _run(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    # Run outside the checkout: from its root, `python -c` would import the
    # source folder fastres/ (which has no kernels/) instead of the install.
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=tempfile.gettempdir()
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_puts_no_top_level_kernels_module():
    out = _run(
        "import sys, fastres, fastres.optim, fastres.kernels.optim, fastres.kernels.grad_norm\n"
        "bad = sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.'))\n"
        "print(bad, fastres.kernels.__name__)"
    )
    assert out.strip() == "[] fastres.kernels"


def test_import_prints_nothing():
    assert _run("import fastres, fastres.optim") == ""


def test_backend_decision_on_cpu():
    assert _run("import torch, fastres; print(fastres.backend_for(torch.zeros(1)).name)").strip() == "torch"
    out = _run("import torch, fastres; print(fastres.backend_for(torch.zeros(1)).name)", TRITON_INTERPRET="1")
    assert out.strip() == "interpreter"


def test_backend_reports_reason_and_dtype_rule(device):
    chosen = fastres.backend_for(torch.zeros(1, device=device))
    assert chosen.name in ("triton", "interpreter")  # the test session always runs the kernels
    assert chosen.reason
    float64 = fastres.backend_for(torch.zeros(1, dtype=torch.float64, device=device))
    assert float64.name == "torch" and "float64" in float64.reason


def test_backend_for_rejects_non_tensors():
    import pytest

    with pytest.raises(TypeError, match="torch.Tensor"):
        fastres.backend_for([1.0])  # type: ignore[arg-type]


def test_version_and_typing_marker():
    from importlib import metadata, resources

    assert fastres.__version__ == metadata.version("fastres")
    assert resources.files("fastres").joinpath("py.typed").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32])
@pytest.mark.parametrize("device", ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_uses_kernels_agrees_with_backend_for(dtype, device):
    """The per-call fast check and the reported decision are one decision."""
    from fastres._backend import uses_kernels

    t = torch.zeros(1, dtype=dtype, device=device)
    assert uses_kernels(t) == (fastres.backend_for(t).name != "torch")
