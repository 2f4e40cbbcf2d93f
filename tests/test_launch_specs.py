"""tests/launch_specs.py: the specs recorded from launches are Triton's own specialisations."""

from __future__ import annotations

import pytest
import torch

import launch_specs
from fastres.kernels import conv as K
from fastres.launchers import conv as L


def _native_specialise():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:  # triton before the native implementation (< 3.5)
        pytest.skip("this triton has no native_specialize_impl to compare with")
    return lambda arg, specialize, align: native_specialize_impl(CUDABackend, arg, False, specialize, align)


def test_specialise_agrees_with_triton():
    native = _native_specialise()
    base = torch.empty(64, dtype=torch.float32)
    args = [1, 0, 16, 17, -1, -16, 2**31 - 1, 2**31, 2**40, 2**63, 1.0, 0.5, True, False, None,
            base, base[1:], base[4:], torch.empty(3, dtype=torch.bfloat16)[1:], torch.empty(2, dtype=torch.int64),
            torch.empty(2, dtype=torch.int32), torch.empty(2, dtype=torch.float16)]
    for arg in args:
        for specialize in (True, False):
            for align in (True, False):
                assert launch_specs.specialise(arg, specialize, align) == native(arg, specialize, align), (
                    arg, specialize, align)


@pytest.mark.skipif(torch.cuda.is_available(), reason="records CPU launches, which take the kernels only under "
                    "the interpreter (a CPU-only session)")
def test_recorded_resnet20_step_specs():
    result = launch_specs.record(quick=True)
    specs = result["specs"]["fastres.kernels.conv"]
    assert set(specs) == {"_conv_kernel", "_conv_wgrad_kernel", "_conv_grads_kernel", "_bn_relu_apply_kernel",
                          "_bn_relu_backward_kernel"}
    # Launch options beyond warps and stages reach the spec: the fused gradients' register cap, sm_90's (the
    # interpreter plans as for it; tests/aot_compile.py builds each target with its own).
    assert all(s["maxnreg"] == K.maxnreg_for("_conv_grads_kernel", 90) == 168
               and s["num_warps"] == L.GRADS_NUM_WARPS for s in specs["_conv_grads_kernel"])
    assert "_sgd_kernel" in result["specs"]["fastres.kernels.optim"]
    conv = specs["_conv_kernel"]
    # Planned as on the GPU: no interpreter workaround, bf16 activations, 32-bit offsets at batch 512.
    assert all(not s["constexprs"]["UPCAST_DOT"] and not s["constexprs"]["IDX64"] for s in conv)
    assert all(s["signature"]["a_ptr"] == "*bf16" for s in conv)
    # channels_last: the channel stride is the constant 1, the pixel strides divisible by 16 (16+ channels),
    # except the stem's 3-channel input.
    assert all(s["constexprs"]["sa_c"] == 1 for s in conv)
    assert any("sa_w" in s["divisible_by_16"] for s in conv) and any("sa_w" not in s["divisible_by_16"] for s in conv)
    assert all("a_ptr" in s["divisible_by_16"] for s in conv)
    # Labels are unique; variants point at the first spec of their group; the covering set is a subset.
    for entries in specs.values():
        labels = [e["label"] for e in entries]
        assert len(labels) == len(set(labels))
        assert all(entries[e["variant"]]["variant"] == e["variant"] for e in entries)
        assert any(e["cover"] for e in entries)
    # The patched launchers are restored and their plans cleared.
    assert L._upcast_dot(torch.bfloat16, "cpu") is True
    assert L._plan_conv.cache_info().currsize == 0
