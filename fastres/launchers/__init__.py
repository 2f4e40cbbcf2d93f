"""The launcher layer: the only code in fastres that calls kernels.

Launchers check their inputs, allocate, build grids and tables, and launch
(through :func:`fastres.launchers.core.launch`, which the launch counter sees).
Autograd Functions, the functional API, modules and optimizers build on them
and know nothing of Triton.
"""
