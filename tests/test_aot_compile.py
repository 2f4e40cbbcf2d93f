"""Tests of the ahead-of-time compile check (tests/aot_compile.py).

The suite runs with TRITON_INTERPRET=1 (see conftest.py), and ``@triton.jit``
reads it when a kernel is decorated, so every check runs in a subprocess
whose environment lacks it. Besides the real ``fastres.kernels`` package, the
checker is pointed (``--path``) at small packages written into a temporary
folder: one that must pass, and broken ones that must fail naming the culprit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any


CHECKER = Path(__file__).with_name("aot_compile.py")
TIMEOUT_S = 600


def run_checker(*args: str, interpret: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Run the checker in a fresh interpreter; return the process and its JSON report (if written)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    json_path = None
    if "--json" in args:
        json_path = Path(args[args.index("--json") + 1])
    proc = subprocess.run(
        [sys.executable, str(CHECKER), *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    # Shown by pytest when a test fails: the checker's table and problems.
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    report = json.loads(json_path.read_text()) if json_path is not None and json_path.exists() else None
    return proc, report


def make_package(root: Path, name: str, modules: dict[str, str]) -> Path:
    """Write a package ``root/name`` with the given modules (name -> source)."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text('"""Fixture kernels for test_aot_compile."""\n')
    for module, source in modules.items():
        (package / f"{module}.py").write_text(textwrap.dedent(source))
    return package


HEADER = """
import triton
import triton.language as tl
"""

# A correct package: a plain kernel calling a device helper, an autotuned
# kernel, a heuristics kernel, and a re-export that must not be counted twice.
GOOD_ELEMENTWISE = HEADER + '''
@triton.jit
def _scale(x, factor):
    return x * factor


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, SQUARE: tl.constexpr = False):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    if SQUARE:
        x = x * x
    tl.store(y_ptr + offsets, _scale(x, factor), mask=mask)


@triton.autotune(
    configs=[triton.Config({"BLOCK": 256}, num_warps=2), triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=2)],
    key=["n"],
)
@triton.jit
def _tuned_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets) + tl.load(y_ptr + offsets))
    else:
        mask = offsets < n
        total = tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, total, mask=mask)


@triton.heuristics({"BLOCK": lambda args: 512})
@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)))


DEVICE_FUNCTIONS = ("_scale",)
AOT_SPECS = {
    "_scale_kernel": [
        # n divisible by 16: the masked accesses vectorise (ld.global.v4).
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "factor": "fp32"},
         "constexprs": {"BLOCK": 1024}, "divisible_by_16": ["x_ptr", "y_ptr", "n"], "label": "aligned"},
        {"signature": {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i64", "factor": "fp32"},
         "constexprs": {"BLOCK": 512, "SQUARE": True}, "num_warps": 8, "num_stages": 1},
    ],
    "_tuned_add_kernel": [
        # Constexprs may also appear in the signature typed "constexpr", as ASTSource wants them.
        {"signature": {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32", "EVEN": "constexpr"},
         "constexprs": {"EVEN": True}},
    ],
    "_sum_kernel": [
        {"signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}, "constexprs": {"BLOCK": 512}},
    ],
}
'''

GOOD_REEXPORT = HEADER + '''
from .elementwise import _scale_kernel, _scale  # re-exported: checked where defined

AOT_SPECS = {}
'''

DOT_KERNEL = HEADER + '''
@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))
'''


def dot_module(bk: int, bn: int = 64) -> str:
    """A single-tile fp32 dot: A (64 x BK) and B (BK x BN) are staged in shared memory together."""
    return DOT_KERNEL + f'''
AOT_SPECS = {{
    "_dot_kernel": [
        {{"signature": {{"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}},
         "constexprs": {{"BM": 64, "BN": {bn}, "BK": {bk}}}, "num_stages": 1}},
    ],
}}
'''


def failures_of(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in report["failures"] if f["kind"] == kind]


def test_real_package_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    # Records the launches of the models (launch_specs.py) and compiles their covering set.
    proc, report = run_checker("--jobs", "2", "--json", str(tmp_path / "report.json"))
    assert report is not None, f"checker wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"AOT compile check of fastres.kernels failed:\n{proc.stdout[-8000:]}"
    assert report["package"] == "fastres.kernels"
    assert report["kernels_discovered"] > 0, "no kernels found in fastres.kernels"
    assert report["kernels_compiled"] == report["kernels_discovered"]
    assert {r["target"] for r in report["results"]} == {"sm_80", "sm_90"}
    assert all(r["ok"] for r in report["results"])
    recorded = report["launch_specs"]
    assert recorded["source"] == "record" and recorded["set"] == "cover"
    assert 0 < recorded["compiled"] < recorded["distinct"]
    conv = [r for r in report["results"] if r["kernel"] == "_conv_kernel"]
    assert conv and all(r["runs"] for r in conv), "conv specs come from recorded launches"
    # channels_last activations and weights: the channel strides are the JIT's constant 1.
    assert all(r["constexprs"]["sa_c"] == 1 and r["constexprs"]["so_c"] == 1 for r in conv)
    # Issue 10's targets on sm_90: no spill and no stack frame anywhere, at most 168 registers in the conv
    # kernels (the weight gradients' 16-bit variants with stack frames went with the stride-1 weight
    # gradients into _conv_grads_kernel).
    sm90 = [r for r in report["results"] if r["cc"] == 90 and r["registers"] is not None]
    assert all(r["local_bytes"] == 0 and r["stack_bytes"] == 0 for r in sm90), [
        (r["kernel"], r["spec_label"]) for r in sm90 if r["local_bytes"] or r["stack_bytes"]]
    convs = ("_conv_kernel", "_conv_wgrad_kernel", "_conv_grads_kernel")
    assert {r["kernel"] for r in sm90} >= set(convs)
    assert all(r["registers"] <= 168 for r in sm90 if r["kernel"] in convs)
    # The fused gradients' register cap per target (kernels/conv.py, MAXNREG): no stack frame on sm_80 either,
    # where under sm_90's 168 they spilled 8-136 B.
    grads = [r for r in report["results"] if r["kernel"] == "_conv_grads_kernel"]
    assert {(r["cc"], r["maxnreg"]) for r in grads} == {(80, 255), (90, 168)}
    assert all(r["stack_bytes"] == 0 and r["local_bytes"] == 0 for r in grads), [
        (r["target"], r["spec_label"], r["stack_bytes"]) for r in grads if r["stack_bytes"] or r["local_bytes"]]


def test_good_package_passes_with_full_report(tmp_path: Path) -> None:
    package = make_package(tmp_path, "aot_fixture_good", {"elementwise": GOOD_ELEMENTWISE, "reexport": GOOD_REEXPORT})
    proc, report = run_checker("--path", str(package), "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stdout
    assert report is not None and report["ok"]
    assert report["kernels_discovered"] == report["kernels_compiled"] == 3
    assert report["device_functions"] == ["aot_fixture_good.elementwise._scale"]
    # 2 specs + 2 autotune configs + 1 heuristics spec, each for sm_80 and sm_90.
    assert len(report["results"]) == 10
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for result in report["results"]:
        by_kernel.setdefault(result["kernel"], []).append(result)
    tuned = by_kernel["_tuned_add_kernel"]
    assert sorted((r["num_warps"], r["num_stages"], r["constexprs"]["BLOCK"]) for r in tuned) == [
        (2, 3, 256), (2, 3, 256), (4, 2, 1024), (4, 2, 1024)
    ]
    aligned = [r for r in by_kernel["_scale_kernel"] if r["spec_label"] == "aligned"]
    assert all(r["ptx"]["ld.global.v4"] > 0 and r["ptx"]["st.global.v4"] > 0 for r in aligned)
    assert all(r["ptx"]["atom"] + r["ptx"]["red"] > 0 for r in by_kernel["_sum_kernel"])
    assert all(r["shared_bytes"] <= r["shared_limit"] for r in report["results"])
    assert "AOT compile check of aot_fixture_good" in proc.stdout and "\nOK" in proc.stdout


def test_checker_removes_triton_interpret_itself(tmp_path: Path) -> None:
    package = make_package(tmp_path, "aot_fixture_interp", {"dot": dot_module(64)})
    proc, _ = run_checker("--path", str(package), "--targets", "80", interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


BROKEN = HEADER + '''
@triton.jit
def _fine_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + 1)


@triton.jit
def _not_power_of_two_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets))


@triton.jit
def _undefined_name_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, no_such_value)


AOT_SPECS = {
    "_fine_kernel": [{"signature": {"x_ptr": "*fp32"}, "constexprs": {"BLOCK": 128}}],
    "_not_power_of_two_kernel": [{"signature": {"x_ptr": "*fp32"}, "constexprs": {"BLOCK": 1000}}],
    "_undefined_name_kernel": [{"signature": {"x_ptr": "*fp32"}, "constexprs": {"BLOCK": 128}}],
}
'''


def test_compile_errors_fail_naming_kernel_and_target(tmp_path: Path) -> None:
    package = make_package(tmp_path, "aot_fixture_broken", {"broken": BROKEN})
    # Two processes: errors must come back from the pool's workers as well.
    proc, report = run_checker("--path", str(package), "--jobs", "2", "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    assert report is not None and not report["ok"]
    errors = failures_of(report, "compile-error")
    assert {(f["where"].split(" ")[0], f["where"].split(" ")[-1]) for f in errors} == {
        (f"aot_fixture_broken.broken.{name}", target)
        for name in ("_not_power_of_two_kernel", "_undefined_name_kernel")
        for target in ("sm_80", "sm_90")
    }
    assert "power of 2" in proc.stdout and "no_such_value" in proc.stdout
    assert report["kernels_discovered"] == 3 and report["kernels_compiled"] == 1
    assert "FAILED" in proc.stdout


MISSING_SPEC = HEADER + '''
@triton.jit
def _helper(x):
    return x + 1


@triton.jit
def _listed_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, _helper(tl.load(x_ptr + offsets)))


@triton.jit
def _forgotten_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)


DEVICE_FUNCTIONS = ("_helper",)
AOT_SPECS = {"_listed_kernel": [{"signature": {"x_ptr": "*fp32"}, "constexprs": {"BLOCK": 128}}]}
'''


def test_kernel_without_spec_fails(tmp_path: Path) -> None:
    package = make_package(tmp_path, "aot_fixture_missing", {"mod": MISSING_SPEC})
    proc, report = run_checker("--path", str(package), "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    assert report is not None
    assert [f["where"] for f in report["failures"]] == ["aot_fixture_missing.mod._forgotten_kernel"]
    assert failures_of(report, "missing-spec")
    assert "_forgotten_kernel" in proc.stdout and "AOT_SPECS" in proc.stdout and "DEVICE_FUNCTIONS" in proc.stdout
    assert report["kernels_discovered"] == 2 and report["kernels_compiled"] == 1


BAD_SPECS = HEADER + '''
@triton.jit
def _add_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def _helper(x):
    return x


AOT_SPECS = {
    "_add_kernel": [
        {"signature": {"x_ptr": "*fp32", "n": "i32"}, "constexprs": {"BLOCK": 128}, "label": "missing_arg"},
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "z_ptr": "*fp32"},
         "constexprs": {"BLOCK": 128}, "label": "unknown_arg"},
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, "constexprs": {}, "label": "no_block"},
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, "constexprs": {"BLOCK": 128},
         "num_warp": 4, "label": "typo_key"},
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "i32"}, "constexprs": {"BLOCK": 128},
         "label": "typed_constexpr"},
    ],
    "_gone_kernel": [],
}
DEVICE_FUNCTIONS = ("_helper", "_gone_helper")
'''


def test_bad_specs_fail_with_clear_messages(tmp_path: Path) -> None:
    package = make_package(tmp_path, "aot_fixture_specs", {"mod": BAD_SPECS})
    proc, report = run_checker("--path", str(package), "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    assert report is not None and report["results"] == []  # nothing valid to compile
    messages = {f["where"]: f["message"] for f in report["failures"]}
    prefix = "aot_fixture_specs.mod."
    assert "missing argument(s) ['y_ptr']" in messages[prefix + "_add_kernel spec missing_arg"]
    assert "'z_ptr', which is no argument" in messages[prefix + "_add_kernel spec unknown_arg"]
    assert "['BLOCK'] are not given" in messages[prefix + "_add_kernel spec no_block"]
    assert "unknown spec key(s) ['num_warp']" in messages[prefix + "_add_kernel spec typo_key"]
    assert "type for constexpr argument(s) ['BLOCK']" in messages[prefix + "_add_kernel spec typed_constexpr"]
    assert "no @triton.jit function" in messages[prefix + "_gone_kernel"]
    assert "no @triton.jit function" in messages[prefix + "_gone_helper"]


def test_shared_memory_above_limit_fails_per_target(tmp_path: Path) -> None:
    # fp32 tiles 64x256 + 256x128: 196608 bytes, above sm_80's 163 KiB and within sm_90's 227 KiB;
    # 64x512 + 512x64: 262144 bytes, above both.
    modules = {"mid": dot_module(256, bn=128), "huge": dot_module(512).replace("_dot_kernel", "_huge_dot_kernel")}
    package = make_package(tmp_path, "aot_fixture_smem", modules)
    proc, report = run_checker("--path", str(package), "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    assert report is not None
    over = {f["where"] for f in failures_of(report, "shared-memory")}
    assert over == {
        "aot_fixture_smem.mid._dot_kernel spec #0 sm_80",
        "aot_fixture_smem.huge._huge_dot_kernel spec #0 sm_80",
        "aot_fixture_smem.huge._huge_dot_kernel spec #0 sm_90",
    }
    assert failures_of(report, "compile-error") == []
    assert "166912" in proc.stdout and "232448" in proc.stdout


RUNTIME_CONSTANT = HEADER + """
@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets * stride, tl.load(x_ptr + offsets * stride, mask=mask), mask=mask)


AOT_SPECS = {
    "_copy_kernel": [
        # stride == 1 at launch: the JIT makes it a constant, and the accesses vectorise.
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "stride": "constexpr"},
         "constexprs": {"BLOCK": 1024, "stride": 1}, "divisible_by_16": ["x_ptr", "y_ptr", "n"], "label": "unit"},
        {"signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "stride": "i32"},
         "constexprs": {"BLOCK": 1024}, "divisible_by_16": ["x_ptr", "y_ptr", "n"], "label": "strided"},
    ],
}
"""


def test_runtime_constants_compile_as_the_jit_specialises_them(tmp_path: Path) -> None:
    package = make_package(tmp_path, "aot_fixture_const", {"mod": RUNTIME_CONSTANT})
    proc, report = run_checker("--path", str(package), "--targets", "90", "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stdout
    assert report is not None and report["launch_specs"] == {}  # another package: nothing recorded
    by_label = {r["spec_label"]: r for r in report["results"]}
    assert by_label["unit"]["constexprs"]["stride"] == 1
    assert by_label["unit"]["ptx"]["ld.global.v4"] > 0
    assert by_label["strided"]["ptx"]["ld.global.v4"] == 0


def test_only_the_jits_constants_may_be_typed_constexpr(tmp_path: Path) -> None:
    bad = RUNTIME_CONSTANT.replace('"constexprs": {"BLOCK": 1024, "stride": 1}', '"constexprs": {"BLOCK": 1024, "stride": 2}')
    package = make_package(tmp_path, "aot_fixture_const_bad", {"mod": bad})
    proc, report = run_checker("--path", str(package), "--targets", "90", "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    assert report is not None
    message = {f["where"]: f["message"] for f in report["failures"]}["aot_fixture_const_bad.mod._copy_kernel spec unit"]
    assert "['stride'] must be strings" in message and "1 or None" in message


# ----------------------------------------------------------------- PTX hazards (tests/ptx_hazards.py)

RACY_STEP = HEADER + '''
@triton.jit
def _step_kernel(step_ptr, x_ptr, n, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    step = tl.load(step_ptr) + 1.0  # every thread reads the step, as the optimizers' advance_step did
    if BARRIER:
        tl.debug_barrier()
    tl.store(step_ptr, step)  # one thread writes the next: a lagging warp may read it instead
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(x_ptr + offsets, x * step, mask=offsets < n)
'''


def racy_step_module(barrier: bool) -> str:
    return RACY_STEP + f'''
AOT_SPECS = {{
    "_step_kernel": [
        {{"signature": {{"step_ptr": "*fp32", "x_ptr": "*fp32", "n": "i32"}},
         "constexprs": {{"BLOCK": 1024, "BARRIER": {barrier}}}}},
    ],
}}
'''


def test_ptx_hazard_check_fails_on_the_step_counter_race_and_passes_with_a_barrier(tmp_path: Path) -> None:
    """advance_step's race as it was: every thread loads the step, thread 0 stores step + 1 with no barrier
    between, and the threads go on using the value. The check fails on it (for sm_90, the lease GPU's),
    naming the store and the load, and passes once a tl.debug_barrier() orders them."""
    racy = make_package(tmp_path, "racy", {"steps": racy_step_module(barrier=False)})
    proc, report = run_checker("--path", str(racy), "--targets", "90", "--json", str(tmp_path / "racy.json"))
    assert proc.returncode == 1, proc.stdout[-3000:]
    hazards = failures_of(report, "ptx-hazard")
    assert len(hazards) == 1 and "_step_kernel" in hazards[0]["where"], report["failures"]
    assert "store after load" in hazards[0]["message"] and "st.global" in hazards[0]["message"]
    (tmp_path / "fixed").mkdir()
    fixed = make_package(tmp_path / "fixed", "racy", {"steps": racy_step_module(barrier=True)})
    proc, report = run_checker("--path", str(fixed), "--targets", "90", "--json", str(tmp_path / "fixed.json"))
    assert proc.returncode == 0 and not failures_of(report, "ptx-hazard"), proc.stdout[-3000:]


# triton 3.6's PTX for an arrival counter after a load of the step (3.9 puts a bar.sync before the atom
# itself, so this one is kept as text): the multi-chunk advance_step's hole on the lease machine.
PTX_ATOMIC_AFTER_LOAD = """
	ld.param.b64 	%rd3, [_step_kernel_param_0];
	// begin inline asm
	mov.u32 %r4, 0x0;
	ld.global.b32 { %r4 }, [ %rd3 + 0 ];
	// end inline asm
	ld.param.b64 	%rd2, [_step_kernel_param_1];
	add.f32 	%r13, %r4, 0f3F800000;
	mov.u32 	%r1, %tid.x;
	and.b32 	%r8, %r1, 31;
	bfe.u32 	%r9, %r1, 5, 2;
	or.b32 	%r2, %r9, %r8;
	setp.eq.b32 	%p1, %r2, 0;
	mov.b32 	%r6, 1;
	// begin inline asm
	mov.u32 %r5, 0x0;
	@%p1 atom.global.gpu.acq_rel.add.u32 %r5, [ %rd2 + 0 ], %r6;
	// end inline asm
"""


def test_ptx_hazard_scan_rules() -> None:
    """The scan's two rules on PTX text: a one-thread atomic after every thread's load (triton 3.6's
    arrival counter) is a hazard, and a bar.sync between clears it; a one-thread store that only writes
    back what the threads loaded (a running-statistics update) is not."""
    import ptx_hazards

    hazards = ptx_hazards.scan(PTX_ATOMIC_AFTER_LOAD)
    assert [h.kind for h in hazards] == ["atomic after load"] and "atom.global" in hazards[0].instruction
    barrier = PTX_ATOMIC_AFTER_LOAD.replace("\tmov.b32 \t%r6, 1;", "\tbar.sync \t0;\n\tmov.b32 \t%r6, 1;")
    assert ptx_hazards.scan(barrier) == []
    write_back = PTX_ATOMIC_AFTER_LOAD.replace(
        "@%p1 atom.global.gpu.acq_rel.add.u32 %r5, [ %rd2 + 0 ], %r6;", "@%p1 st.global.b32 [ %rd3 + 0 ], { %r13 };")
    assert ptx_hazards.scan(write_back) == []
    used = write_back + "\tld.global.b32 { %r20 }, [ %rd2 + 0 ];\n\tmul.f32 \t%r21, %r20, %r13;\n" \
                        "\tst.global.b32 [ %rd2 + 0 ], { %r21 };\n"
    assert [h.kind for h in ptx_hazards.scan(used)] == ["store after load"]
