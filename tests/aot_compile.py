"""Ahead-of-time compile check of fastres's Triton kernels, without a GPU.

Builds every kernel of a package (by default ``fastres.kernels``) for CUDA
targets sm_80 and sm_90 with ``triton.compile`` and reports, per kernel x spec
x autotune config x target, the launch shape, shared memory, registers and a
census of interesting PTX instructions. It fails (exit status 1) on a compile
error, on shared memory above the target's per-block limit, on a kernel
without a spec, and on a hazard ``tests/ptx_hazards.py`` finds in the PTX (a
one-thread store or atomic racing with every thread's loads).

Rule: which ``@triton.jit`` functions must have a spec
-----------------------------------------------------
Every ``@triton.jit`` function *defined* in a module of the package (its
function's ``__module__`` is that module; imported/re-exported ones are
checked where they are defined), together with any ``@triton.autotune`` /
``@triton.heuristics`` wrapping it, must be declared in that same module in
exactly one of:

* ``AOT_SPECS[name]``: a non-empty list of specs. The function is a kernel
  launched from the host; each spec is compiled for every target (and, for an
  autotuned kernel, for every config in ``autotuner.configs``).
* ``DEVICE_FUNCTIONS = ("name", ...)``: a module-level tuple naming helpers
  that are only called from other jit functions. They are compiled as part of
  their callers, not on their own.

Specs recorded from real launches
---------------------------------
For the default package the check also runs ``tests/launch_specs.py`` (in a
subprocess, with ``TRITON_INTERPRET=1``): it runs ResNet training steps with
the kernel bodies skipped and records the specialisation Triton's JIT derives
from every launch (dtypes, 16-byte alignment, integers equal to 1 as
constants, integers divisible by 16). Those specs are compiled in addition to
the module's own; ``AOT_SPECS[name] = "launches"`` says a kernel has no hand
specs because the recorded launches cover it (a failure if none was recorded).
``--launch-specs none`` skips the recording, ``--launch-specs PATH`` reads a
saved ``launch_specs.py --json`` file instead.

``name`` is the Python function's name (``fn.__name__``), which for an
autotuned kernel is the name of the decorated function too. Anything else is
a failure: a jit function in neither, one in both, an empty spec list, a name
in ``AOT_SPECS``/``DEVICE_FUNCTIONS`` that is no jit function of the module.

Spec format
-----------
::

    AOT_SPECS = {
        "_adam_kernel": [
            {
                # required: a Triton type for every non-constexpr argument
                # (constexpr arguments may also appear, typed "constexpr", as
                # triton's ASTSource wants them; they are optional here)
                "signature": {"table_ptr": "*i64", "lr": "fp32", "n_chunks": "i32"},
                # every constexpr argument without a default value; for an
                # autotuned kernel only the ones its configs do not set
                "constexprs": {"BLOCK": 1024, "AMSGRAD": False},
                "num_warps": 4,          # optional, default 4 (not for autotuned kernels)
                "num_stages": 3,         # optional, default 3 (not for autotuned kernels)
                # optional: arguments specialised as multiples of 16 (pointers:
                # 16-byte aligned), as the JIT does at launch. Default: every
                # pointer argument (torch allocations are 16-byte aligned).
                # Integers divisible by 16 (e.g. a padded length) must be
                # listed explicitly; without them masked accesses cannot be
                # vectorised.
                "divisible_by_16": ["table_ptr"],
                "label": "amsgrad",      # optional, shown in the report
            },
            # A non-constexpr argument the JIT turns into a constant (an
            # integer equal to 1, or None) is typed "constexpr" in the
            # signature and given its value in "constexprs":
            {"signature": {"table_ptr": "*i64", "lr": "fp32", "n_chunks": "constexpr"},
             "constexprs": {"BLOCK": 1024, "AMSGRAD": False, "n_chunks": 1}},
        ],
    }
    DEVICE_FUNCTIONS = ("_adam_math",)
    # optional: a register cap (maxnreg) per target, for a kernel whose launcher
    # picks it by the device's architecture: each target is compiled with the
    # entry of the highest target at or below it, in place of the recorded
    # launch's (the interpreter plans as for one architecture)
    MAXNREG = {"_adam_kernel": {80: 255, 90: 168}}

Usage
-----
::

    python tests/aot_compile.py                      # fastres.kernels, sm_80 + sm_90
    python tests/aot_compile.py --path /tmp/pkg      # a package directory instead
    python tests/aot_compile.py --kernel adam --targets 90 --json report.json
    python tests/aot_compile.py --dump-dir /tmp/ptx  # keep each compile's TTGIR and PTX
    python tests/aot_compile.py --jobs 0             # one compile process per CPU
    python tests/aot_compile.py --launch-specs none  # only the modules' own specs
    python tests/aot_compile.py --targets 90 --launch-set variants --jobs 0 --markdown table.md
                                                     # every recorded variant; the README's resource table

The check imports the package, so ``fastres.kernels`` must be installed
(``pip install -e .``; the folder ``kernels/`` is only *mapped* to that name).
``TRITON_INTERPRET`` must be unset: ``@triton.jit`` reads it when a kernel is
decorated. Run as a script this file removes it itself; the pytest suite sets
it, which is why ``tests/test_aot_compile.py`` runs this script in a
subprocess.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Must happen before triton is imported: kernels decorated while it is set
    # become interpreter objects that cannot be compiled.
    os.environ.pop("TRITON_INTERPRET", None)

import argparse
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import pkgutil
import re
import shutil
import subprocess
import tempfile
import time
import traceback
import types
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptx_hazards  # noqa: E402  (tests/ptx_hazards.py, beside this file)

# Triton 3.9 warns once per process that TRITON_DEFAULT_FP_FUSION is unset.
# The check compiles with the same default a launch gets, so the warning is
# only noise in the report.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

DEFAULT_PACKAGE = "fastres.kernels"
DEFAULT_TARGETS = (80, 90)
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3  # triton's default for CUDA

# Largest dynamic shared memory one block may opt into (CUDA programming guide,
# "Technical Specifications per Compute Capability"), in bytes.
SHARED_MEMORY_LIMITS = {
    75: 65536,
    80: 166912,  # 163 KiB
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,  # 227 KiB
}

JSON_SCALARS = (bool, int, float, str, type(None))
SPEC_KEYS = {"signature", "constexprs", "num_warps", "num_stages", "maxnreg", "divisible_by_16", "label", "runs"}
LAUNCH_SPECS_SCRIPT = Path(__file__).with_name("launch_specs.py")
FROM_LAUNCHES = "launches"  # AOT_SPECS[name] = "launches": the recorded launches are its only specs
RULE = (
    "every @triton.jit function defined in a kernels module must be listed in that module either in "
    "AOT_SPECS (a launched kernel: a non-empty list of specs, "
    '{"signature": {arg: type}, "constexprs": {name: value}, "num_warps": n}) '
    "or in the tuple DEVICE_FUNCTIONS (a helper only called from other jit functions)"
)

# PTX instruction census. Each entry: report key -> predicate on the mnemonic
# (the instruction name with its modifiers, e.g. "ld.global.v4.b32").
PTX_COUNTERS: dict[str, re.Pattern[str]] = {
    "mma": re.compile(r"^mma\."),
    "wgmma": re.compile(r"^wgmma\.mma_async"),
    "ldmatrix": re.compile(r"^ldmatrix\."),
    "cp.async": re.compile(r"^cp\.async\.c[ag]\."),
    "cp.async.bulk": re.compile(r"^cp\.async\.bulk\.(?!commit_group|wait_group)"),  # TMA
    "ld.global": re.compile(r"^ld\.global\."),
    "ld.global.v2": re.compile(r"^ld\.global\.(?:[\w:]+\.)*v2\."),
    "ld.global.v4": re.compile(r"^ld\.global\.(?:[\w:]+\.)*v4\."),
    "st.global": re.compile(r"^st\.global\."),
    "st.global.v2": re.compile(r"^st\.global\.(?:[\w:]+\.)*v2\."),
    "st.global.v4": re.compile(r"^st\.global\.(?:[\w:]+\.)*v4\."),
    "atom": re.compile(r"^atom\."),
    "red": re.compile(r"^red\."),
    "bar.sync": re.compile(r"^(?:bar|barrier)\.sync\b"),
    "f64": re.compile(r"\.f64\b"),
    "call": re.compile(r"^call\b"),
}
# An instruction line: optional predicate guard, then the mnemonic. Directives
# (".reg"), labels ("$L__BB0_1:"), braces and comments do not match.
_PTX_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)", re.MULTILINE)
# Short column names for the text table, in PTX_COUNTERS order.
_PTX_COLUMNS = {
    "mma": "mma", "wgmma": "wgmma", "ldmatrix": "ldsm", "cp.async": "cpasync", "cp.async.bulk": "tma",
    "ld.global": "ldg", "ld.global.v2": "ldg2", "ld.global.v4": "ldg4",
    "st.global": "stg", "st.global.v2": "stg2", "st.global.v4": "stg4",
    "atom": "atom", "red": "red", "bar.sync": "bar", "f64": "f64", "call": "call",
}


class CheckSetupError(Exception):
    """The check cannot run at all (bad package path, interpreter mode)."""


@dataclass
class Kernel:
    """A launchable kernel found in a module: the outermost module-level wrapper of one jit function."""

    module: str
    name: str
    obj: Any  # JITFunction, Autotuner or Heuristics
    jit_fn: JITFunction
    configs: list[Any] | None  # triton.Config list of an autotuned kernel, else None
    specs: list[Any] | None = None  # its AOT_SPECS entry; None when it has no usable one
    maxnreg: dict[int, int] | None = None  # its module's MAXNREG entry: a register cap per target (cc)

    @property
    def kind(self) -> str:
        if isinstance(self.obj, Autotuner):
            return "autotune"
        return "heuristics" if isinstance(self.obj, Heuristics) else "jit"


@dataclass
class CompileTask:
    """One triton.compile call: a kernel, one of its specs, one config, one target."""

    module: str
    kernel: str
    spec_index: int
    spec_label: str
    config_index: int | None  # None: not autotuned
    config_label: str
    cc: int
    signature: dict[str, str]  # ASTSource signature: every argument, constexprs typed "constexpr"
    constexprs: dict[str, Any]
    divisible_by_16: list[str]
    options: dict[str, Any]  # num_warps, num_stages (+ num_ctas, maxnreg from a config)
    config_keys: list[str] = field(default_factory=list)  # constexprs the autotune config sets
    runs: list[str] = field(default_factory=list)  # recorded runs that launched this spec (launch specs only)
    jit_fn: Any = field(repr=False, default=None)

    @property
    def where(self) -> str:
        cfg = "" if self.config_index is None else f" config {self.config_index} ({self.config_label})"
        return f"{self.module}.{self.kernel} spec {self.spec_label}{cfg} sm_{self.cc}"


@dataclass
class Failure:
    kind: str  # import-error, missing-spec, spec-error, compile-error, shared-memory
    where: str
    message: str


@dataclass
class CheckReport:
    package: str
    targets: list[int]
    triton_version: str
    kernels: list[dict[str, Any]] = field(default_factory=list)
    device_functions: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    kernels_discovered: int = 0
    kernels_compiled: int = 0  # kernels whose every compile succeeded within limits
    launch_specs: dict[str, Any] = field(default_factory=dict)  # where recorded specs came from, how many, time
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# ----------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------


def _interpreter_active() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and getattr(knobs.runtime, "interpret", False):
        return True
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def load_package(package: str | None, path: str | None) -> types.ModuleType:
    """Import the package to check: by dotted name, or from a directory (named after it)."""
    if path is None:
        return importlib.import_module(package or DEFAULT_PACKAGE)
    directory = Path(path).resolve()
    if not directory.is_dir():
        raise CheckSetupError(f"--path {path}: not a directory")
    name = directory.name
    if not name.isidentifier():
        raise CheckSetupError(f"--path {path}: folder name {name!r} is not a valid package name")
    if name in sys.modules:
        raise CheckSetupError(f"--path {path}: a module named {name!r} is already imported; rename the folder")
    init = directory / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(directory)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:  # a plain folder of modules: a namespace-like package
        module = types.ModuleType(name)
        module.__path__ = [str(directory)]
        sys.modules[name] = module
    return module


def iter_modules(package: types.ModuleType, failures: list[Failure]) -> list[types.ModuleType]:
    """The package itself and every module below it; import errors become failures."""
    modules = [package]
    if not hasattr(package, "__path__"):
        return modules
    # walk_packages' onerror only covers subpackages; import each name ourselves.
    walk = pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".", onerror=lambda _: None)
    names = [info.name for info in walk]
    for name in sorted(names):
        try:
            modules.append(importlib.import_module(name))
        except Exception:
            failures.append(Failure("import-error", name, f"cannot import {name}:\n{traceback.format_exc()}"))
    return modules


def _unwrap(obj: Any) -> tuple[JITFunction | None, int, list[Any] | None]:
    """(jit function, wrapper depth, autotune configs) of a module-level object."""
    depth, configs = 0, None
    while isinstance(obj, (Autotuner, Heuristics)):
        if isinstance(obj, Autotuner) and configs is None:
            configs = list(obj.configs)
        obj, depth = obj.fn, depth + 1
    return (obj, depth, configs) if isinstance(obj, JITFunction) else (None, depth, configs)


def discover(module: types.ModuleType, failures: list[Failure],
             recorded: dict[str, list[Any]] | None = None) -> tuple[list[Kernel], list[str]]:
    """Kernels (with their specs, or None) and device functions defined in ``module``, checked against the rule.

    ``recorded``: specs from recorded launches (kernel name -> specs), compiled before the module's own.
    """
    recorded = recorded or {}
    by_fn: dict[int, tuple[int, Kernel]] = {}  # id(jit fn) -> (depth, kernel): keep the outermost wrapper
    for value in vars(module).values():
        if type(value).__name__ == "InterpretedFunction":
            raise CheckSetupError(
                f"{module.__name__} was imported with TRITON_INTERPRET set, so its kernels are interpreter "
                "objects; run this check in a process without TRITON_INTERPRET"
            )
        jit_fn, depth, configs = _unwrap(value)
        if jit_fn is None or getattr(jit_fn.fn, "__module__", None) != module.__name__:
            continue  # not a jit function, or one re-exported from another module
        kernel = Kernel(module.__name__, jit_fn.fn.__name__, value, jit_fn, configs,
                        maxnreg=getattr(module, "MAXNREG", {}).get(jit_fn.fn.__name__))
        if id(jit_fn) not in by_fn or depth > by_fn[id(jit_fn)][0]:
            by_fn[id(jit_fn)] = (depth, kernel)
    found = sorted((k for _, k in by_fn.values()), key=lambda k: k.name)

    specs = getattr(module, "AOT_SPECS", {})
    device = getattr(module, "DEVICE_FUNCTIONS", ())
    where = module.__name__
    if not isinstance(specs, dict):
        failures.append(Failure("spec-error", where, "AOT_SPECS must be a dict of kernel name -> list of specs"))
        specs = {}
    if isinstance(device, str) or not isinstance(device, (tuple, list)):
        failures.append(Failure("spec-error", where, "DEVICE_FUNCTIONS must be a tuple of names"))
        device = ()

    kernels, device_functions = [], []
    names = {k.name for k in found}
    for kernel in found:
        at = f"{where}.{kernel.name}"
        in_specs, in_device = kernel.name in specs, kernel.name in device
        if in_device and not in_specs and kernel.kind == "jit":
            device_functions.append(at)
            continue
        kernels.append(kernel)  # a launched kernel, counted as discovered whether or not its spec is usable
        if in_specs and in_device:
            failures.append(Failure("spec-error", at, "listed in both AOT_SPECS and DEVICE_FUNCTIONS"))
        elif in_device:
            message = f"a {kernel.kind} kernel is launched, not a device function: give it AOT_SPECS"
            failures.append(Failure("spec-error", at, message))
        elif not in_specs:
            failures.append(Failure(
                "missing-spec", at,
                f"@triton.jit function {kernel.name!r} has no AOT spec: add AOT_SPECS[{kernel.name!r}] = [{{...}}] "
                f"to {where}, or list it in DEVICE_FUNCTIONS if it is only called from other jit functions",
            ))
        elif specs[kernel.name] == FROM_LAUNCHES:
            if recorded.get(kernel.name):
                kernel.specs = list(recorded[kernel.name])
            else:
                failures.append(Failure(
                    "spec-error", at,
                    f"AOT_SPECS[{kernel.name!r}] is {FROM_LAUNCHES!r} but no launch of it was recorded "
                    f"({LAUNCH_SPECS_SCRIPT.name} did not run: --launch-specs none, or another package)",
                ))
        elif not isinstance(specs[kernel.name], list) or not specs[kernel.name]:
            failures.append(Failure(
                "spec-error", at,
                f"AOT_SPECS[{kernel.name!r}] must be a non-empty list of specs or {FROM_LAUNCHES!r} "
                "(a helper called only from other jit functions goes into DEVICE_FUNCTIONS instead)",
            ))
        else:
            kernel.specs = list(recorded.get(kernel.name, [])) + specs[kernel.name]
    for table, listed in (("AOT_SPECS", specs), ("DEVICE_FUNCTIONS", device), ("recorded launches", recorded)):
        for name in sorted(set(listed) - names):
            message = f"{table} names {name!r}, which is no @triton.jit function defined in {where}"
            failures.append(Failure("spec-error", f"{where}.{name}", message))
    return kernels, device_functions


# ----------------------------------------------------------------------------
# Specs -> compile tasks
# ----------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _config_label(config: Any) -> str:
    kwargs = " ".join(f"{k}={_format_value(v)}" for k, v in config.kwargs.items())
    return f"{kwargs} w{config.num_warps} s{config.num_stages}".strip()


def _is_jit_constant(value: Any) -> bool:
    """The values Triton's JIT specialises a non-constexpr argument to: the integer 1 and None."""
    return value is None or (type(value) is int and value == 1)


def build_tasks(kernel: Kernel, targets: list[int], failures: list[Failure]) -> list[CompileTask]:
    """Validate the kernel's specs and expand them into compile tasks."""
    params = list(inspect.signature(kernel.jit_fn.fn).parameters.values())
    kparams = {p.name: p for p in kernel.jit_fn.params}
    constexpr_names = [p.name for p in params if kparams[p.name].is_constexpr]
    runtime_names = [p.name for p in params if not kparams[p.name].is_constexpr]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    configs = kernel.configs
    tasks: list[CompileTask] = []

    for index, spec in enumerate(kernel.specs or []):
        label = str(spec.get("label", f"#{index}")) if isinstance(spec, dict) else f"#{index}"
        at = f"{kernel.module}.{kernel.name} spec {label}"
        errors: list[str] = []
        if not isinstance(spec, dict):
            failures.append(Failure("spec-error", at, f"a spec must be a dict, got {type(spec).__name__}"))
            continue
        unknown_keys = set(spec) - SPEC_KEYS
        if unknown_keys:
            errors.append(f"unknown spec key(s) {sorted(unknown_keys)}; allowed: {sorted(SPEC_KEYS)}")
        signature = spec.get("signature")
        constexprs = spec.get("constexprs", {})
        if not isinstance(signature, dict) or not isinstance(constexprs, dict):
            failures.append(Failure("spec-error", at, '"signature" (required) and "constexprs" must be dicts'))
            continue

        arguments = f"{kernel.name}{tuple(p.name for p in params)}"
        typed_constexprs = [n for n in signature if n in constexpr_names and signature[n] != "constexpr"]
        if typed_constexprs:
            errors.append(
                f"signature gives a type for constexpr argument(s) {typed_constexprs}: "
                'put their values in "constexprs"'
            )
        unknown = [n for n in signature if n not in constexpr_names and n not in runtime_names]
        if unknown:
            errors.append(f"signature names {', '.join(map(repr, unknown))}, which is no argument of {arguments}")
        # Arguments the JIT turns into constants (the integer 1, None): typed "constexpr", value in constexprs.
        runtime_constants = [
            n for n in runtime_names
            if signature.get(n) == "constexpr" and n in constexprs and _is_jit_constant(constexprs[n])
        ]
        untyped = [
            n for n in runtime_names
            if n in signature and n not in runtime_constants
            and (not isinstance(signature[n], str) or signature[n] == "constexpr")
        ]
        if untyped:
            errors.append(
                f"signature types of {untyped} must be strings such as '*fp32' or 'i32' (these are not "
                "tl.constexpr; only the constants the JIT makes, 1 or None, may be typed 'constexpr' with their "
                "value in constexprs)"
            )
        missing = [n for n in runtime_names if n not in signature]
        if missing:
            errors.append(
                f"signature is missing argument(s) {missing}; "
                f"it needs a type for every non-constexpr argument {runtime_names}"
            )
        not_constexpr = [n for n in constexprs if n in runtime_names and n not in runtime_constants]
        if not_constexpr:
            errors.append(
                f"constexprs gives {not_constexpr}, which are not tl.constexpr arguments: "
                'give their types in "signature"'
            )
        unknown = [n for n in constexprs if n not in runtime_names and n not in constexpr_names]
        if unknown:
            errors.append(f"constexprs names {', '.join(map(repr, unknown))}, which is no argument of {arguments}")

        divisible = spec.get("divisible_by_16")
        if divisible is None:
            divisible = [
                n for n in runtime_names
                if str(signature.get(n, "")).startswith("*")
                and not kparams[n].do_not_specialize
                and not getattr(kparams[n], "do_not_specialize_on_alignment", False)
            ]
        elif not isinstance(divisible, (list, tuple)) or any(
            n not in runtime_names or n in runtime_constants for n in divisible
        ):
            errors.append(f"divisible_by_16 must list non-constexpr arguments of {kernel.name} ({runtime_names})")

        if configs is not None and ("num_warps" in spec or "num_stages" in spec):
            errors.append("num_warps/num_stages come from the autotune configs: remove them from the spec")
        num_warps = spec.get("num_warps", DEFAULT_NUM_WARPS)
        num_stages = spec.get("num_stages", DEFAULT_NUM_STAGES)

        variants: list[tuple[int | None, str, dict[str, Any], dict[str, Any]]] = []
        for config_index, config in enumerate(configs if configs is not None else [None]):
            merged = {k: v for k, v in defaults.items() if k in constexpr_names}
            merged.update(constexprs)
            options = {"num_warps": num_warps, "num_stages": num_stages}
            if spec.get("maxnreg") is not None:
                options["maxnreg"] = spec["maxnreg"]
            config_label = ""
            if config is not None:
                clash = sorted(set(constexprs) & set(config.kwargs))
                if clash:
                    errors.append(f"constexprs {clash} are set by the autotune configs: remove them from the spec")
                merged.update(config.kwargs)
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                if getattr(config, "num_ctas", 1) not in (None, 1):
                    options["num_ctas"] = config.num_ctas
                if getattr(config, "maxnreg", None) is not None:
                    options["maxnreg"] = config.maxnreg
                config_label = _config_label(config)
            merged.update({n: constexprs[n] for n in runtime_constants})
            merged = {p.name: merged[p.name] for p in params if p.name in merged}  # argument order, for the report
            unset = [n for n in constexpr_names if n not in merged]
            if unset:
                source = "the spec's constexprs" + (" or the autotune configs" if config is not None else "")
                errors.append(f"constexpr argument(s) {unset} are not given by {source}")
            variants.append((None if config is None else config_index, config_label, merged, options))

        if errors:
            failures.append(Failure("spec-error", at, "; ".join(dict.fromkeys(errors))))
            continue
        full_signature = {
            p.name: ("constexpr" if p.name in constexpr_names or p.name in runtime_constants else signature[p.name])
            for p in params
        }
        for config_index, config_label, merged, options in variants:
            for cc in targets:
                if kernel.maxnreg:  # the module's cap for this target replaces the recorded launch's
                    eligible = [target for target in kernel.maxnreg if target <= cc] or [min(kernel.maxnreg)]
                    options = {**options, "maxnreg": kernel.maxnreg[max(eligible)]}
                tasks.append(CompileTask(
                    module=kernel.module, kernel=kernel.name, spec_index=index, spec_label=label,
                    config_index=config_index, config_label=config_label, cc=cc,
                    signature=full_signature, constexprs=merged, divisible_by_16=list(divisible),
                    options=options, config_keys=[] if config_index is None else list(configs[config_index].kwargs),
                    runs=list(spec.get("runs", [])),
                    jit_fn=kernel.jit_fn,
                ))
    return tasks


# ----------------------------------------------------------------------------
# Compilation and inspection
# ----------------------------------------------------------------------------


def count_ptx(ptx: str) -> dict[str, int]:
    """Count instruction kinds (PTX_COUNTERS) in PTX text."""
    counts = dict.fromkeys(PTX_COUNTERS, 0)
    for match in _PTX_INSTRUCTION.finditer(ptx):
        mnemonic = match.group(1)
        for key, pattern in PTX_COUNTERS.items():
            if pattern.search(mnemonic):
                counts[key] += 1
    return counts


def _find_cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for candidate in (os.environ.get("TRITON_CUOBJDUMP_PATH"), str(bundled), shutil.which("cuobjdump")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def resource_usage(cubin: bytes | None) -> dict[str, int]:
    """Registers, stack and local memory of the cubin's kernel, from ``cuobjdump -res-usage``.

    The driver reports n_regs only when it loads the binary, which needs a GPU;
    cuobjdump (bundled with triton) reads the same numbers from the cubin.
    """
    tool = _find_cuobjdump()
    if tool is None or not cubin:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        try:
            out = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not match:
        return {}
    regs, stack, _static_shared, local = map(int, match.groups())
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local}


def _make_source(task: CompileTask) -> ASTSource:
    jit_fn = task.jit_fn
    attrs: Any = {(jit_fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in task.divisible_by_16}
    if hasattr(triton.backends.compiler, "AttrsDescriptor") or hasattr(triton.compiler.compiler, "AttrsDescriptor"):
        attrs = None  # triton <= 3.2 takes a different attrs object; compile without alignment hints
    # Positional: the third parameter is `constexprs` in triton >= 3.3 and `constants` before.
    return ASTSource(jit_fn, task.signature, task.constexprs, attrs)


def _base_result(task: CompileTask) -> dict[str, Any]:
    """The report entry of a task, before compiling."""
    return {
        "module": task.module, "kernel": task.kernel, "spec": task.spec_index, "spec_label": task.spec_label,
        "config": task.config_index, "config_label": task.config_label, "target": f"sm_{task.cc}",
        "cc": task.cc, "num_warps": task.options["num_warps"], "num_stages": task.options["num_stages"],
        "maxnreg": task.options.get("maxnreg"),
        "constexprs": {k: v if isinstance(v, JSON_SCALARS) else str(v) for k, v in task.constexprs.items()},
        "config_keys": sorted(task.config_keys),
        "signature": {k: v for k, v in task.signature.items() if v != "constexpr"},
        "divisible_by_16": task.divisible_by_16, "runs": task.runs, "ok": False, "error": None,
        "shared_bytes": None, "shared_limit": SHARED_MEMORY_LIMITS.get(task.cc), "registers": None,
        "stack_bytes": None, "local_bytes": None, "ptx": None, "ptx_lines": None, "hazards": [], "seconds": None,
        "cpu_seconds": None,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): unlike wall time, not inflated by
    other processes competing for the CPU."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_task(task: CompileTask, dump_dir: str | None = None) -> dict[str, Any]:
    """Compile one task; never raises: errors are returned in the result."""
    result = _base_result(task)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        compiled = triton.compile(_make_source(task), target=GPUTarget("cuda", task.cc, 32), options=dict(task.options))
    except Exception as exc:  # CompilationError and anything a pass or ptxas raises
        result["seconds"] = round(time.perf_counter() - start, 3)
        result["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 3)
        result["error"] = f"{type(exc).__name__}: {exc}".strip()
        return result
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 3)
    result["ok"] = True
    result["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0) or 0)
    ptx = compiled.asm.get("ptx")
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    result["ptx"] = count_ptx(ptx) if ptx else None
    result["ptx_lines"] = ptx.count("\n") if ptx else None
    result["hazards"] = [str(h) for h in ptx_hazards.scan(ptx)] if ptx else []
    result.update(resource_usage(compiled.asm.get("cubin")))
    if dump_dir:
        stem = f"{task.module}.{task.kernel}.spec{task.spec_index}"
        stem += "" if task.config_index is None else f".cfg{task.config_index}"
        for ext in ("ttgir", "ptx"):
            text = compiled.asm.get(ext)
            if text:
                Path(dump_dir, f"{stem}.sm{task.cc}.{ext}").write_text(text if isinstance(text, str) else text.decode())
    return result


# The process pool forks after discovery, so workers find the tasks (and the
# jit functions they hold, which do not pickle) in this module global.
_POOL_TASKS: list[CompileTask] = []
_POOL_DUMP_DIR: str | None = None


def _compile_pooled(index: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    return compile_task(_POOL_TASKS[index], _POOL_DUMP_DIR)


def compile_all(tasks: list[CompileTask], jobs: int, dump_dir: str | None) -> list[dict[str, Any]]:
    global _POOL_TASKS, _POOL_DUMP_DIR
    if jobs <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [compile_task(task, dump_dir) for task in tasks]
    _POOL_TASKS, _POOL_DUMP_DIR = tasks, dump_dir
    results: list[dict[str, Any]] = []
    try:
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=fork) as pool:
            futures = [pool.submit(_compile_pooled, i) for i in range(len(tasks))]
            for task, future in zip(tasks, futures):
                try:
                    results.append(future.result())
                except BrokenProcessPool:
                    # A crash (not an exception) inside the compiler takes the whole pool down,
                    # so the culprit is one of the tasks in flight; a serial run names it.
                    dead = _base_result(task)
                    dead["error"] = (
                        "the compile worker process died (compiler crash?); rerun with --jobs 1 to find the culprit"
                    )
                    results.append(dead)
    finally:
        _POOL_TASKS, _POOL_DUMP_DIR = [], None
    return results


# ----------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------


LAUNCH_SETS = ("cover", "variants", "all")


def select_launch_specs(entries: list[dict[str, Any]], launch_set: str) -> list[dict[str, Any]]:
    """The recorded specs to compile: "all" distinct ones; "variants": one per variant (specs that differ
    only in the divisibility of row extents or the types of unread placeholder pointers collapse);
    "cover": a covering set of the variants (every argument type, constant, divisibility and pair of
    constexpr values at least once; see launch_specs.covering). Bookkeeping keys are dropped."""
    keep = {"all": lambda i, e: True, "variants": lambda i, e: e["variant"] == i,
            "cover": lambda i, e: e["cover"]}[launch_set]
    return [{k: v for k, v in e.items() if k not in ("variant", "cover", "unused")}
            for i, e in enumerate(entries) if keep(i, e)]


def load_launch_specs(source: str, failures: list[Failure],
                      launch_set: str = "cover") -> tuple[dict[str, dict[str, list[Any]]], dict[str, Any]]:
    """Specs recorded from real launches, by module and kernel name: ``source`` "record" runs
    ``launch_specs.py`` (TRITON_INTERPRET=1, in a subprocess), "none" records nothing, else a saved JSON
    file; ``launch_set`` selects among them (:func:`select_launch_specs`)."""
    if source == "none":
        return {}, {}
    start = time.perf_counter()
    if source == "record":
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp, "launch_specs.json")
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            try:
                proc = subprocess.run([sys.executable, str(LAUNCH_SPECS_SCRIPT), "--json", str(out)], env=env,
                                      capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                failures.append(Failure("launch-specs", str(LAUNCH_SPECS_SCRIPT), "recording took over 600 s"))
                return {}, {}
            if proc.returncode != 0 or not out.exists():
                failures.append(Failure("launch-specs", str(LAUNCH_SPECS_SCRIPT),
                                        f"recording failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"))
                return {}, {}
            data = json.loads(out.read_text())
    else:
        try:
            data = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            failures.append(Failure("launch-specs", source, f"cannot read recorded launch specs: {exc}"))
            return {}, {}
    recorded = data["specs"]
    specs = {module: {name: select_launch_specs(entries, launch_set) for name, entries in kernels.items()}
             for module, kernels in recorded.items()}
    info = {"source": source, "set": launch_set, "runs": data.get("runs", []), "launches": data.get("launches"),
            "distinct": sum(len(v) for kernels in recorded.values() for v in kernels.values()),
            "compiled": sum(len(v) for kernels in specs.values() for v in kernels.values()),
            "seconds": round(time.perf_counter() - start, 2)}
    return specs, info



def run_check(
    package: str | None = None,
    path: str | None = None,
    targets: list[int] | tuple[int, ...] = DEFAULT_TARGETS,
    kernel_filter: str | None = None,
    jobs: int = 1,
    dump_dir: str | None = None,
    launch_specs: str = "auto",
    launch_set: str = "cover",
) -> CheckReport:
    """Discover, validate and compile; the report says what failed.

    ``launch_specs``: "auto" records launches (``launch_specs.py``) when checking the default package,
    "record", "none", or the path of a saved recording.
    """
    if _interpreter_active():
        raise CheckSetupError(
            "TRITON_INTERPRET is set: kernels are decorated as interpreter objects; "
            "unset it (run this file as a script)"
        )
    start = time.perf_counter()
    failures: list[Failure] = []
    pkg = load_package(package, path)
    report = CheckReport(package=pkg.__name__, targets=list(targets), triton_version=triton.__version__)

    if launch_specs == "auto":
        launch_specs = "record" if path is None and pkg.__name__ == DEFAULT_PACKAGE else "none"
    recorded, report.launch_specs = load_launch_specs(launch_specs, failures, launch_set)
    kernels: list[Kernel] = []
    for module in iter_modules(pkg, failures):
        found, device_functions = discover(module, failures, recorded.get(module.__name__))
        kernels.extend(found)
        report.device_functions.extend(device_functions)
    if kernel_filter:
        kernels = [k for k in kernels if kernel_filter in f"{k.module}.{k.name}"]
        failures = [f for f in failures if kernel_filter in f.where or f.kind == "launch-specs"]

    tasks: list[CompileTask] = []
    for kernel in kernels:
        kernel_tasks = build_tasks(kernel, list(targets), failures)
        tasks.extend(kernel_tasks)
        report.kernels.append({
            "module": kernel.module, "name": kernel.name, "kind": kernel.kind,
            "specs": len(kernel.specs or []), "configs": None if kernel.configs is None else len(kernel.configs),
            "compiles": len(kernel_tasks),
        })
    report.kernels_discovered = len(kernels)

    report.results = compile_all(tasks, jobs, dump_dir)
    for task, res in zip(tasks, report.results):
        if not res["ok"]:
            src = inspect.getsourcefile(task.jit_fn.fn)
            line = inspect.getsourcelines(task.jit_fn.fn)[1]
            failures.append(Failure(
                "compile-error", task.where,
                f"{task.kernel} ({src}:{line}) does not compile for sm_{task.cc} with "
                f"constexprs {res['constexprs']}, options {task.options}:\n{res['error']}",
            ))
        elif res["hazards"]:
            failures.append(Failure(
                "ptx-hazard", task.where,
                f"{task.kernel} for sm_{task.cc}: a one-thread store or atomic races with the other threads' "
                "loads (tests/ptx_hazards.py; a tl.debug_barrier() before it orders them):\n"
                + "\n".join(res["hazards"][:3]),
            ))
        elif res["shared_limit"] is not None and res["shared_bytes"] > res["shared_limit"]:
            failures.append(Failure(
                "shared-memory", task.where,
                f"{task.kernel} needs {res['shared_bytes']} bytes of shared memory per block, above the "
                f"sm_{task.cc} limit of {res['shared_limit']} bytes ({res['shared_limit'] // 1024} KiB): "
                "use smaller blocks or fewer pipeline stages",
            ))

    failed_kernels = {f.where.split(" ")[0] for f in failures}
    report.kernels_compiled = sum(
        1 for k in report.kernels if k["compiles"] > 0 and f"{k['module']}.{k['name']}" not in failed_kernels
    )
    report.failures = failures
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def format_table(report: CheckReport) -> str:
    """The per-compile results as an aligned text table, with a legend of the specs."""
    head = ["kernel", "spec", "cfg", "sm", "warps", "stages", "smem", "regs", "stack", "lmem", *_PTX_COLUMNS.values(),
            "sec"]
    rows: list[list[str]] = []
    prefix = report.package + "."
    legend: dict[str, str] = {}
    # Argument types that differ between a kernel's specs (e.g. the param dtype) go into the legend too.
    types_seen: dict[tuple[str, str], dict[str, set[str]]] = {}
    for res in report.results:
        for arg, ty in res["signature"].items():
            types_seen.setdefault((res["module"], res["kernel"]), {}).setdefault(arg, set()).add(ty)
    for res in report.results:
        name = res["kernel"]
        if res["module"] != report.package:
            name = f"{res['module'].removeprefix(prefix)}.{name}"
        cfg = "-" if res["config"] is None else str(res["config"])
        spec_constexprs = {k: v for k, v in res["constexprs"].items() if k not in res["config_keys"]}
        varying = types_seen[(res["module"], res["kernel"])]
        types = [f"{arg}:{ty}" for arg, ty in res["signature"].items() if len(varying[arg]) > 1]
        values = [f"{k}={v}" for k, v in spec_constexprs.items()]
        legend.setdefault(f"{name} spec {res['spec_label']}", " ".join(types + values) or "(no constexprs)")
        if res["config"] is not None:
            legend.setdefault(f"{name} config {cfg}", res["config_label"])
        shape = [name, res["spec_label"], cfg, str(res["cc"]), str(res["num_warps"]), str(res["num_stages"])]
        if not res["ok"]:
            rows.append([*shape, "COMPILE ERROR"])
            continue
        smem = str(res["shared_bytes"])
        if res["shared_limit"] is not None and res["shared_bytes"] > res["shared_limit"]:
            smem += "!"
        ptx = res["ptx"] or {}
        rows.append([
            *shape, smem,
            "?" if res["registers"] is None else str(res["registers"]),
            "?" if res["stack_bytes"] is None else str(res["stack_bytes"]),
            "?" if res["local_bytes"] is None else str(res["local_bytes"]),
            *(str(ptx.get(key, "?")) for key in _PTX_COLUMNS), f"{res['seconds']:.1f}",
        ])
    if not rows:
        return "(nothing compiled)"
    widths = [max(len(head[i]), *(len(r[i]) for r in rows if i < len(r))) for i in range(len(head))]
    numeric_from = 3  # right-align the numbers

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            last = i == len(cells) - 1 and len(cells) < len(head)
            out.append(cell if last else (cell.rjust(widths[i]) if i >= numeric_from else cell.ljust(widths[i])))
        return "  ".join(out).rstrip()

    text = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    text.append("")
    text.append("smem: dynamic shared memory bytes per block ('!' = above the target limit); regs/stack/lmem: registers")
    text.append("per thread, stack frame (spilled registers go there) and local-array bytes from cuobjdump; PTX counts:")
    text.append("ldsm=ldmatrix, cpasync=cp.async,")
    text.append("tma=cp.async.bulk, ldg/stg=ld/st.global (2/4: .v2/.v4 vector), bar=bar.sync, f64=fp64 instructions.")
    text.extend(f"  {key}: {value}" for key, value in legend.items())
    return "\n".join(text)


def format_markdown(report: CheckReport, cc: int = 90) -> str:
    """The resources of every compile for ``sm_{cc}`` as a Markdown table (the README's kernel resources)."""
    rows = [r for r in report.results if r["cc"] == cc and r["ok"]]
    lines = [
        "| kernel | variant | warps | regs | stack / local B | ld.v4 / ld | st.v4 / st | wgmma | mma |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        ptx = r["ptx"] or {}
        lines.append(
            f"| {r['kernel']} | {r['spec_label']} | {r['num_warps']} | {r['registers']} | "
            f"{r['stack_bytes']} / {r['local_bytes']} | {ptx.get('ld.global.v4')} / {ptx.get('ld.global')} | "
            f"{ptx.get('st.global.v4')} / {ptx.get('st.global')} | {ptx.get('wgmma')} | {ptx.get('mma')} |"
        )
    return "\n".join(lines)


def format_summary(report: CheckReport) -> str:
    compiles = len(report.results)
    targets = ", ".join(f"sm_{cc}" for cc in report.targets)
    head = (
        f"AOT compile check of {report.package} (triton {report.triton_version}, {targets}): "
        f"{report.kernels_compiled}/{report.kernels_discovered} kernels compiled, {compiles} compiles, "
        f"{len(report.device_functions)} device function(s), {report.seconds:.1f} s"
    )
    info = report.launch_specs
    if info:
        head += (f"\nrecorded launches ({info['source']}): {info['launches']} launches in {len(info['runs'])} runs, "
                 f"{info['distinct']} distinct specialisations, {info['compiled']} compiled (--launch-set "
                 f"{info['set']}), recording {info['seconds']:.1f} s")
    if report.ok:
        return head + "\nOK"
    lines = [head, f"FAILED: {len(report.failures)} problem(s)"]
    for failure in report.failures:
        lines.append(f"  [{failure.kind}] {failure.where}: {failure.message}".replace("\n", "\n      "))
    if any(f.kind in ("missing-spec", "spec-error") for f in report.failures):
        lines.append(f"Rule: {RULE}. Spec format: see the docstring of tests/aot_compile.py.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--package", help=f"dotted name of the package to check (default {DEFAULT_PACKAGE})")
    where.add_argument("--path", help="a package directory to check instead (imported under its folder name)")
    parser.add_argument(
        "--targets", default=",".join(map(str, DEFAULT_TARGETS)),
        help="comma-separated compute capabilities (default 80,90)",
    )
    parser.add_argument("--kernel", default=None, help="only kernels whose 'module.name' contains this text")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="parallel compile processes, 0 = one per CPU (default 1: a compile takes ~0.3 s, and on small "
        "machines the workers' start-up costs more than they save)",
    )
    parser.add_argument(
        "--launch-specs", default="auto", metavar="auto|record|none|PATH",
        help="specs recorded from real launches (tests/launch_specs.py): auto = record them when checking "
        "fastres.kernels; none; or a file written by launch_specs.py --json",
    )
    parser.add_argument(
        "--launch-set", choices=LAUNCH_SETS, default="cover",
        help="which recorded specs to compile: cover (default: a covering set, for CI), variants (one per "
        "code variant), all (every distinct specialisation)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write the sm_90 resources (the README's table) as Markdown")
    parser.add_argument("--dump-dir", default=None, help="write each compile's TTGIR and PTX here")
    args = parser.parse_args(argv)

    try:
        targets = [int(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--targets: expected numbers such as 80,90, got {args.targets!r}")
    jobs = args.jobs if args.jobs > 0 else os.cpu_count() or 1
    if args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
    try:
        report = run_check(args.package, args.path, targets, args.kernel, jobs, args.dump_dir, args.launch_specs,
                           args.launch_set)
    except (CheckSetupError, ImportError) as exc:
        hint = ""
        if isinstance(exc, ImportError) and args.path is None:
            hint = " (is the project installed? `pip install -e .` maps kernels/ to fastres.kernels)"
        print(f"AOT compile check could not run: {exc}{hint}", file=sys.stderr)
        return 2
    print(format_table(report))
    print()
    print(format_summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(report) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
