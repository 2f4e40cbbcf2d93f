"""Triton device code of fastres, installed as ``fastres.kernels``.

Only ``@triton.jit`` functions live here; they import triton and each other
(relatively), never torch.nn or the rest of fastres. The host code in
``fastres`` is their only caller.

Each module lists, in ``AOT_SPECS``, the argument types and constexpr
combinations that the ahead-of-time compile check builds for every kernel it
defines (``tests/aot_compile.py`` finds the kernels itself and fails on one
without a spec).
"""
