"""The GPU lease runner's dry run (scripts/gpu_check.sh --dry-run) end to end, so a lease is never lost to it.

The runner spends a GPU lease's 7 minutes; these tests run it on the CPU (Triton's interpreter, tiny
sizes) in a subprocess, as CI does from a fresh clone, and check what a lease would return: the exit
status, at most 8 files in OUT, every stage reported, the warm-up in stage order, every timed variant
recorded, the table printed last, lease.json's keys. A second run checks the runner's own defences: a
stage that hangs is cut at its budget and the next stage still runs; a process that dies mid-item is
resumed after that item; a correctness check that fails makes the exit status non-zero. A third cuts a
ratio row after its first variant: the row keeps it. (tests/test_lease_runner.py tests the planning.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ["1", "2", "3a", "3b", "4a", "4b", "4c", "4d", "5"]


def _run(out: Path, *args: str, timeout: float, env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the runner sets it for its stages
    env["PYTHON"] = sys.executable
    env.update(env_extra or {})
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def _describe(run: subprocess.CompletedProcess, out: Path) -> str:
    log = (out / "lease.log").read_text()[-4000:] if (out / "lease.log").exists() else ""
    return f"exit {run.returncode}\nstdout tail:\n{run.stdout[-3000:]}\nstderr tail:\n{run.stderr[-2000:]}\nlease.log tail:\n{log}"


# The profile row's modeled times (the committed benchmarks/modeled_resnet20_b512.json on a lease): made-up
# figures under names the dry run's CPU profile has (aten ops) and one it has not (an interpreted kernel).
_ROW = {"calls": 1, "us": 10.0, "bytes": 0, "flops": 0.0, "tail_us": 0.0, "tail_share": 0.0}
FAKE_MODELED = {"bf16": {"batch": 512, "size": 32, "model": {"name": "H200"}, "summary": "modeled step: made up",
                         "eager": {}, "fastres": {n: _ROW for n in ("_conv_kernel", "addmm", "avg_pool2d", "_log_softmax")}}}
# Issue 18's CUDA-only checks: what each does on the dry run (the eager halves pass; the sync check skips).
ISSUE_18_CHECKS = {"optim CUDA graph tables kept after an eager rebuild SGD": "pass",
                   "optim first step without host sync Adam fresh": "skipped",
                   "optim first step without host sync Adam loaded from torch CPU state": "skipped",
                   "optim capture refused after zero_grad(set_to_none=True)": "pass",
                   "model tiny b2 two CUDA graphs on two streams + eager": "pass",
                   "conv fp32 TF32 operands rounded like cuDNN b2 8@6x6": "pass"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lease")
    modeled = tmp_path_factory.mktemp("modeled") / "modeled.json"
    modeled.write_text(json.dumps(FAKE_MODELED))
    run = _run(out, timeout=420, env_extra={"FASTRES_LEASE_MODELED": str(modeled)})
    return run, out


@pytest.mark.slow
def test_dry_run_passes_and_reports_every_stage(dry_run):
    run, out = dry_run
    why = _describe(run, out)
    assert run.returncode == 0, why
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"results.jsonl", "lease.json", "lease.log", "summary.txt", "tests.log"} <= set(files), files

    data = json.loads((out / "lease.json").read_text())
    assert {"meta", "stages", "environment", "ceilings", "compile", "checks", "ratios", "tests", "summary"} <= set(data)
    assert data["meta"]["dry_run"] is True
    assert [s["stage"] for s in data["stages"]] == PARTS, why
    assert all(s["status"] in ("done", "cut") for s in data["stages"]), data["stages"]
    env = data["environment"]
    assert env["torch"] and env["device"].startswith("CPU") and env["TRITON_INTERPRET"] == "1"
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_bf16_tflops"] > 0

    # Every item ran to a verdict or was cut by its budget (a busy machine); none hit a bug of the runner.
    checks, ratios = data["checks"], data["ratios"]
    assert checks and ratios, why
    assert not [c for c in checks if c["status"] in ("fail", "error")], checks
    assert not [r for r in ratios if r["status"] == "error"], ratios
    assert any(c["status"] == "pass" and c["name"].startswith("optim ") for c in checks), checks
    assert all(c.get("scaled_down") for c in checks if c["status"] == "pass"), "dry-run checks say what was scaled"
    timed = [r for r in ratios if r["status"] == "ok"]
    assert timed and all(r["medians_ms"].get("fastres", 0) > 0 for r in timed), ratios
    trained = [r for r in timed if r["name"].startswith("train ")]
    stage_4b = next(s for s in data["stages"] if s["stage"] == "4b")
    assert trained or stage_4b["status"] == "cut", ratios
    assert all(set(r["host_ms"]) == {"fastres", "fastres, Triton's launch path", "eager channels_last"}
               and min(r["host_ms"].values()) > 0 for r in trained), trained
    assert data["tests"]["status"] in ("pass", "cut") and data["tests"]["counts"].get("PASSED", 0) > 0, data["tests"]
    assert data["tests"]["selection"] == ["tests/test_optim_errors.py"] and data["tests"]["workers"] == 0
    assert data["summary"]["exit_status"] == 0 and data["summary"]["checks_failed"] == 0
    assert 0 < data["meta"]["startup_s"] < 60  # gpu_check.sh's start to the runner's: the install check

    # The warm-up started its tasks in stage order (Triton tasks and inductor builds each), a few builds at once.
    summary = next(c for c in data["compile"] if c["kind"] == "compile-summary")
    tasks = sorted((c for c in data["compile"] if c["kind"] == "compile"), key=lambda c: c["order"])
    assert len(tasks) == summary["tasks"] and not summary["not_finished"], summary
    for inductor in (False, True):
        ranks = [PARTS.index(c["for_stage"]) for c in tasks if c["inductor"] == inductor]
        assert ranks and ranks == sorted(ranks), tasks
    assert max(c["inductor_running"] for c in tasks) <= max(summary["inductor_limit"])
    assert sum(c["status"] == "ok" for c in tasks) == 2 and not [c for c in tasks if c["status"] == "error"]

    # Every timed variant was recorded as it was timed, and the rows' medians are those records'.
    for r in timed:
        recorded = {v["variant"]: v["median_ms"] for v in data["variants"]
                    if v["name"] == r["name"] and "median_ms" in v}
        assert r["name"].startswith("profile") or recorded == r["medians_ms"], (r["name"], recorded)
    profile = next(r for r in ratios if r["name"].startswith("profile"))
    assert profile["stage"] == "4d" and profile["status"] == "ok", profile
    assert all(set(k) >= {"ms", "launches"} for k in profile["kernels"].values()), profile
    # Beside the measured times, the model's, by name: the CPU profile's aten ops match, its kernels do not.
    modeled = profile["modeled"]
    assert modeled["status"] == "ok" and modeled["matched"] >= 1 and modeled["modeled_names"] == 4, modeled
    assert "_conv_kernel" in modeled["not_measured"] and modeled["total"]["modeled_ms"] == pytest.approx(0.04)
    assert any(k.get("modeled_ms") == 0.01 for k in profile["kernels"].values()), profile["kernels"]

    # Issue 18's CUDA-only checks ran their eager halves (the sync check has nothing to check on a CPU).
    by_name = {c["name"]: c for c in checks}
    assert {n: by_name[n]["status"] for n in ISSUE_18_CHECKS if n in by_name} == ISSUE_18_CHECKS, checks
    assert all(by_name[n]["scaled_down"] for n in ISSUE_18_CHECKS)
    tf32 = by_name["conv fp32 TF32 operands rounded like cuDNN b2 8@6x6"]
    assert tf32["fastres_vs_rna"]["max_ulps"] <= tf32["bound_ulps"] and tf32["fastres_vs_trunc"]["bias"] > 1e-4, tf32

    # The compact table is the last thing printed, and it is what summary.txt holds.
    table = (out / "summary.txt").read_text().strip()
    assert run.stdout.rstrip().endswith(table)
    assert table.splitlines()[-1].startswith("result: PASS (exit 0)")
    assert "DRY RUN" in table and "checks:" in table and "ratios" in table and "tests:" in table
    assert "    step total" in table and "of 4 modeled names measured" in table, table
    for record in (out / "results.jsonl").read_text().splitlines():
        json.loads(record)


@pytest.mark.slow
def test_hung_stage_is_cut_crash_resumed_and_failed_check_fails_the_run(tmp_path):
    """Stage 1 hangs: it is cut at its deadline (its 3 s budget plus what the start-up and its import left of
    their plan) and part 3a still runs. 3a's process aborts in its first item: that item is an error and 3a
    resumes after it. Its injected wrong element fails its check."""
    run = _run(tmp_path, "--stages", "1,3a", "--inject-hang", "1", "--budget", "1=3", "--budget", "3a=50",
               "--inject-crash", "3a", "--inject-failure", timeout=240)
    why = _describe(run, tmp_path)
    assert run.returncode == 1, why
    data = json.loads((tmp_path / "lease.json").read_text())
    stages = {s["stage"]: s for s in data["stages"]}
    one = stages["1"]
    assert one["status"] == "cut" and one["seconds"] <= one["budget_s"] + 5 and one["budget_s"] <= 3 + 25, stages
    assert stages["3a"]["status"] in ("done", "cut"), stages
    checks = {c["name"]: c for c in data["checks"]}
    crashed = data["checks"][0]
    assert crashed["status"] == "error" and "died" in crashed["detail"], data["checks"]
    assert checks["optim CUDA graph SGD"]["status"] == "pass", data["checks"]  # the item after the crash ran
    injected = checks["optim SGD resnet20 fp32"]  # the first parity check
    assert injected["status"] == "fail" and "differ" in injected["detail"], data["checks"]
    assert data["summary"]["exit_status"] == 1
    assert run.stdout.rstrip().splitlines()[-1].startswith("result: FAIL (exit 1)")


@pytest.mark.slow
def test_a_row_cut_mid_way_keeps_the_variants_it_timed(tmp_path):
    """Part 4a's first row hangs after its first variant (--inject-cut-row) until the watchdog ends the
    part: the row is recorded as cut, with that variant's time, and the table shows it as partial."""
    run = _run(tmp_path, "--stages", "4a", "--inject-cut-row", "4a", "--budget", "4a=4", timeout=240)
    why = _describe(run, tmp_path)
    assert run.returncode == 0, why
    data = json.loads((tmp_path / "lease.json").read_text())
    assert [s["status"] for s in data["stages"]] == ["cut"], data["stages"]
    row = data["ratios"][0]
    assert row["status"] == "cut" and row["partial"] is True, row
    assert list(row["medians_ms"]) == ["fastres"] and row["medians_ms"]["fastres"] > 0, row
    assert [v["variant"] for v in data["variants"]] == ["fastres"]
    line = next(line for line in (tmp_path / "summary.txt").read_text().splitlines() if row["name"] in line)
    assert "PARTIAL (cut)" in line and "fastres" in line, line
