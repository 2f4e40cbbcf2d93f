"""The GPU lease runner's (benchmarks/lease.py) planning, without running its stages.

What a lease machine does and a CPU cannot show: the warm-up's order and its limit on inductor builds at
full size, the budgets' carry-over, stage 5's selection on one GPU and on two, the summary's partial rows,
the install check. tests/test_lease_dry_run.py runs the runner itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import lease  # noqa: E402  (stdlib only at import: the runner's own process imports no torch)


def _stage_rank(task: tuple) -> int:
    return lease.ITEM_PARTS.index(task[0])


def _tasks(rng: random.Random) -> list:
    """Triton tasks and inductor builds of every part, shuffled."""
    tasks = [(key, f"item {i}", "") for key in lease.ITEM_PARTS for i in range(rng.randint(1, 9))]
    tasks += [(key, f"item {i}", "torch.compile") for key in ("3b", "4b", "4c") for i in range(rng.randint(1, 4))]
    rng.shuffle(tasks)
    return tasks


def test_warm_order_is_stage_order_then_item_order():
    tasks = [("4c", "b", ""), ("3a", "x", ""), ("4b", "t", "torch.compile"), ("3a", "a", ""), ("3b", "m", "default")]
    assert lease.warm_order(tasks) == [("3a", "x", ""), ("3a", "a", ""), ("3b", "m", "default"),
                                       ("4b", "t", "torch.compile"), ("4c", "b", "")]


@pytest.mark.parametrize("seed", range(5))
def test_warm_up_starts_triton_tasks_in_stage_order_and_few_inductor_builds(seed):
    """The scheduler as warmup_stage drives it, with tasks ending in random order: Triton tasks and inductor
    builds each start in stage order, and no more inductor builds run at once than the limit allows."""
    rng = random.Random(seed)
    workers, limits = 16, lease.INDUCTOR_LIMIT["gpu"]
    pending = lease.warm_order(_tasks(rng))
    everything = list(pending)
    running, started = [], []
    while pending or running:
        for task in lease.tasks_to_start(pending, running, workers, limits):
            running.append(task)
            started.append(task)
            inductor = sum(bool(t[2]) for t in running)
            triton_waits = any(not t[2] for t in pending)
            assert inductor <= (limits[0] if triton_waits else limits[1]), (task, running)
        assert len(running) <= workers
        running.remove(rng.choice(running))
    assert sorted(started) == sorted(everything)
    for kind in (lambda t: not t[2], lambda t: bool(t[2])):
        ranks = [_stage_rank(t) for t in started if kind(t)]
        assert ranks == sorted(ranks)
    # Inductor builds are long: they start beside the first Triton tasks, not after all of them.
    first_build = next(i for i, t in enumerate(started) if t[2])
    assert first_build < workers


def test_gpu_warm_up_builds_only_what_the_stages_reach():
    """The lease's own task list (its GPU item lists, built here without a GPU): stage order, a Triton task
    for every item that has kernels, and inductor builds only for the compiled checks, the training rows and
    the first bf16 block rows 4c's budget holds."""
    lease.setup_paths()
    import lease_items as li

    tasks = lease.warm_tasks(li.Config(dry=False), Path("/nonexistent"))
    assert [_stage_rank(t) for t in tasks] == sorted(_stage_rank(t) for t in tasks)
    builds = [t for t in tasks if t[2]]
    by_part = {key: [t for t in builds if t[0] == key] for key in lease.ITEM_PARTS}
    assert len(by_part["3b"]) == len(li.COMPILE_CHECK_MODES)
    assert {t[2] for t in by_part["4b"]} == {"torch.compile", "torch.compile(fastres)"}
    assert len(by_part["4c"]) == li.BLOCK_ROWS_COMPILED
    assert all(t[1].endswith(" bf16") for t in by_part["4c"])
    assert not by_part["3a"] and not by_part["4a"] and not by_part["4d"]
    triton = [t for t in tasks if not t[2]]
    assert len(triton) > 100 and len({t[:2] for t in triton}) == len(triton)


def test_time_a_part_leaves_goes_to_the_next_part():
    parts = [p for p in lease.PARTS if p.key != "5"]
    plan = lease.plan_ends(parts, lambda p: p.gpu_s, 100.0, "gpu")
    gpu_s = {p.key: p.gpu_s for p in parts}
    assert plan["1"] == 100 + lease.IMPORT_S["gpu"] + gpu_s["1"]
    assert plan["2"] == plan["1"] + gpu_s["2"]  # stage 2's process imports no torch: its workers do, in its budget
    assert plan["3a"] == plan["2"] + lease.IMPORT_S["gpu"] + gpu_s["3a"] and plan["3b"] == plan["3a"] + gpu_s["3b"]
    hard, b = 1000.0, gpu_s["3b"]
    # 3b starts 30 s early (3a ended early): it gets its own budget and the 30 s 3a left.
    assert lease.part_deadline(plan["3a"] - 30, b, plan["3b"], hard) == plan["3b"]
    # 3b starts 20 s late (an import took long): its own budget from its start; the tests pay.
    assert lease.part_deadline(plan["3a"] + 20, b, plan["3b"], hard) == plan["3a"] + 20 + b
    # Never past what the tests must keep.
    assert lease.part_deadline(plan["3a"], b, plan["3b"], plan["3a"] + 10) == plan["3a"] + 10


def test_the_gpu_plan_fits_seven_minutes_and_leaves_the_tests_their_time():
    plan = lease.plan_ends(lease.PARTS, lambda p: p.gpu_s, lease.STARTUP_S["gpu"], "gpu")
    total = lease.TOTAL_S["gpu"]
    assert total <= 7 * 60
    assert max(plan.values()) + lease.TESTS_MIN_S["gpu"] + lease.FINAL_S <= total
    assert list(plan) == [p.key for p in lease.PARTS if p.key != "5"] and list(plan)[-1] == "4d"  # profile last


def test_lease_start_comes_from_the_script_unless_implausible():
    assert lease.lease_start("1000.5", 1010.0) == 1000.5
    for value in (None, "", "soon", "2000", "100"):  # unset, garbage, in the future, long ago
        assert lease.lease_start(value, 1010.0) == 1010.0


def test_stage_5_on_one_gpu_selects_no_multi_gpu_test():
    one, two = lease.tests_to_run(False, 1), lease.tests_to_run(False, 2)
    assert one and not set(one) & set(lease.MULTI_GPU_TESTS)
    assert set(lease.MULTI_GPU_TESTS) <= set(two)
    assert lease.tests_to_run(True, 0) == list(lease.DRY_TESTS)
    for node in set(one) | set(two) | set(lease.DRY_TESTS):
        path, _, name = node.partition("::")
        assert (REPO / path).is_file(), path
        assert not name or re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), node
    assert "tests/test_lease_dry_run.py" not in one
    # Few workers: each starts torch and compiles its own kernels.
    assert lease.xdist_workers(False, 33, 16, True) == 2
    assert lease.xdist_workers(False, 200, 16, True) == lease.TEST_WORKERS
    assert lease.xdist_workers(False, 10, 16, True) == 1
    assert lease.xdist_workers(True, 200, 16, True) == lease.xdist_workers(False, 200, 16, False) == 0


def test_multi_gpu_test_skips_below_two_gpus():
    """The two-process example's NCCL case, the multi-GPU test, skips on a machine with fewer than two GPUs
    (this one has none); its gloo case takes an explicit CPU device, so it never asks for cuda:1."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs here: the multi-GPU case runs")
    node = lease.MULTI_GPU_TESTS[0]
    # PYTHONSAFEPATH: the installed fastres, not the checkout's (as stage 5 runs it).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONSAFEPATH": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", node + "[cuda]", "-q", "-rs", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert run.returncode == 0 and "1 skipped" in run.stdout and "needs two GPUs" in run.stdout, run.stdout[-2000:]


def _data(ratios: list) -> dict:
    return {"meta": {"dry_run": False}, "environment": None, "ceilings": None, "stages": [], "compile": [],
            "checks": [], "ratios": ratios, "tests": None,
            "summary": {"checks_passed": 0, "checks_failed": 0, "checks_not_run": 0, "exit_status": 0}}


def test_a_cut_row_keeps_its_timed_variants_and_shows_as_partial():
    variants = [{"variant": "fastres", "median_ms": 1.25, "launches": 79, "host_ms": 2.5},
                {"variant": "eager channels_last", "median_ms": 2.0},
                {"variant": "torch.compile", "error": "skipped: no compile"}]
    fields = lease.partial_row(variants)
    assert fields == {"medians_ms": {"fastres": 1.25, "eager channels_last": 2.0},
                      "errors": {"torch.compile": "skipped: no compile"}, "launches": {"fastres": 79},
                      "host_ms": {"fastres": 2.5}, "partial": True}
    cut = dict(name="train resnet20 b512 bf16", kind="ratio", status="cut", detail="still running", **fields)
    not_run = {"name": "train resnet18_cifar b512 bf16", "kind": "ratio", "status": "not run", "detail": "no time"}
    table = lease.render(_data([cut, not_run]))
    line = next(line for line in table.splitlines() if "train resnet20" in line)
    assert "PARTIAL (cut)" in line and "fastres 1.25 ms" in line and "eager-cl 2 ms" in line
    assert "not run: compile" in line
    assert "not run: train resnet18_cifar b512 bf16: no time" in table


def test_the_profile_row_is_a_dict_per_kernel():
    row = {"name": "profile resnet20 b512 bf16", "kind": "ratio", "status": "ok", "medians_ms": {"fastres": 3.0},
           "kernels_per_step": 79, "kernels": {"_conv_kernel": {"ms": 2.0, "launches": 20},
                                               "_tail_kernel": {"ms": 1.0, "launches": 9}}}
    line = lease.render(_data([row])).splitlines()[-2]
    assert "79 kernels; top: _conv_kernel 2 ms, _tail_kernel 1 ms" in line


def _fake_modeled(path: Path) -> Path:
    """A modeled-times file in the format of ``python -m fastres.testing.traffic --time --json`` (the
    committed benchmarks/modeled_resnet20_b512.json), with made-up figures."""
    row = lambda calls, us: {"calls": calls, "us": us, "bytes": 1, "flops": 0.0, "tail_us": 0.0, "tail_share": 0.0}
    path.write_text(json.dumps({"bf16": {
        "batch": 512, "size": 32, "model": {"name": "H200"}, "summary": "modeled step: fastres 1.105 ms, ...",
        "fastres": {"_conv_kernel": row(27, 800.0), "_tail_kernel": row(9, 300.0), "addmm": row(1, 5.0)},
        "eager": {"convolution": row(21, 900.0)}}}))
    return path


def _li():
    lease.setup_paths()
    import lease_items

    return lease_items


def test_the_profile_row_joins_the_modeled_times_by_kernel_name(tmp_path, monkeypatch):
    li = _li()
    monkeypatch.setenv(li.MODELED_ENV, str(_fake_modeled(tmp_path / "modeled.json")))
    kernels = {"_conv_kernel": {"ms": 1.0, "launches": 27},
               "void at::native::elementwise_kernel": {"ms": 0.2, "launches": 10},
               "aten::addmm": {"ms": 0.01, "launches": 1}}
    m = li.join_modeled(kernels, li.load_modeled(), "bf16")
    assert m["status"] == "ok" and m["matched"] == 2 and m["modeled_names"] == 3 and m["batch"] == 512
    conv = kernels["_conv_kernel"]
    assert conv["modeled_ms"] == 0.8 and conv["modeled_calls"] == 27
    assert conv["measured_over_modeled"] == pytest.approx(1.25)
    assert kernels["aten::addmm"]["modeled_ms"] == 0.005  # an aten op (the dry run's CPU profile) by its bare name
    assert "modeled_ms" not in kernels["void at::native::elementwise_kernel"]
    assert m["total"]["measured_ms"] == pytest.approx(1.21) and m["total"]["modeled_ms"] == pytest.approx(1.105)
    assert m["total"]["modeled_calls"] == 37 and m["total"]["measured_launches"] == 38
    assert m["matched_total"] == pytest.approx({"measured_ms": 1.01, "modeled_ms": 0.805,
                                                "measured_over_modeled": 1.01 / 0.805})
    assert m["not_measured"] == {"_tail_kernel": 0.3}

    row = {"name": "profile resnet20 b512 bf16", "kind": "ratio", "status": "ok", "medians_ms": {"fastres": 1.21},
           "kernels_per_step": 38, "kernels": kernels, "modeled": m}
    lines = lease.render(_data([row])).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  profile resnet20"))
    assert "_conv_kernel" in lines[at + 1]
    assert "measured 1 ms, modeled 0.8 ms: x1.25; launches 27 vs 27" in lines[at + 1]
    assert "aten::addmm" in lines[at + 2] and "x2.00" in lines[at + 2]
    assert "step total" in lines[at + 3]
    assert "measured 1.21 ms, modeled 1.1 ms: x1.10; 2 of 3 modeled names measured (1.01 vs 0.805 ms)" in lines[at + 3]
    assert lines[at + 4].startswith("result:")


def test_the_profile_row_says_when_there_is_no_model(tmp_path, monkeypatch):
    li = _li()
    monkeypatch.setenv(li.MODELED_ENV, str(tmp_path / "none.json"))
    kernels = {"_conv_kernel": {"ms": 1.0, "launches": 27}}
    m = li.join_modeled(kernels, li.load_modeled(), "bf16")
    assert m["status"] == "missing" and "fastres.testing.traffic" in m["detail"]
    assert kernels["_conv_kernel"] == {"ms": 1.0, "launches": 27}
    (tmp_path / "none.json").write_text(json.dumps({"fp32": {}}))
    assert li.join_modeled(kernels, li.load_modeled(), "bf16")["status"] == "error"
    row = {"name": "profile resnet20 b512 bf16", "kind": "ratio", "status": "ok", "medians_ms": {"fastres": 1.0},
           "kernels_per_step": 27, "kernels": kernels, "modeled": m}
    line = lease.render(_data([row])).splitlines()[-2]
    assert line.startswith("    modeled: missing: no none.json: `python -m fastres.testing.traffic")


def test_the_committed_modeled_times_join():
    """The lead's benchmarks/modeled_resnet20_b512.json, once committed, has what the profile row reads."""
    li = _li()
    if not li.MODELED_JSON.is_file():
        pytest.skip("benchmarks/modeled_resnet20_b512.json is not committed yet")
    data = json.loads(li.MODELED_JSON.read_text())
    rows = data["bf16"]["fastres"]
    assert data["bf16"]["batch"] == 512 and "_conv_kernel" in rows
    assert all({"calls", "us"} <= set(r) for r in rows.values())
    kernels = {name: {"ms": r["us"] / 1e3, "launches": r["calls"]} for name, r in rows.items()}
    m = li.join_modeled(kernels, {"path": str(li.MODELED_JSON), "data": data}, "bf16")
    assert m["matched"] == len(rows) and m["total"]["measured_over_modeled"] == pytest.approx(1.0)


def test_tf32_reference_rounding_is_the_kernels_rule():
    """The TF32 check's reference operands (lease_items.tf32_operands): to nearest with ties away from zero
    in the float32 bits (kernels/conv.py's _to_tf32, cuDNN's cvt.rna), or truncated; and its bias measure."""
    import torch

    li = _li()
    x = torch.tensor([1.0 + 2**-11, -(1.0 + 2**-11), 1.0 + 2**-11 - 2**-23, 2.0 - 2**-23, float("inf"), 0.0,
                      -2.0**-130])
    rna, trunc = li.tf32_operands(x, "rna"), li.tf32_operands(x, "trunc")
    assert rna[:4].tolist() == [1.0 + 2**-10, -(1.0 + 2**-10), 1.0, 2.0] and rna[4] == float("inf")
    assert trunc[:4].tolist() == [1.0, -1.0, 1.0, 2.0 - 2**-10] and rna[6] == trunc[6] == -2.0**-130
    assert li.tf32_operands(torch.tensor([float("nan")]), "rna").isnan().all()
    ref = torch.randn(1000, dtype=torch.float64)
    shrunk = li.conv_error((ref * (1 - 2**-10)).float(), ref, ref.abs())
    assert shrunk["bias"] == pytest.approx(-(2**-10), rel=0.05) and shrunk["max_ulps"] < 2**14 + 10


def test_issue_18s_lease_items_are_planned_and_warmed():
    """The lease's GPU item lists have issue 18's CUDA-only checks (short ones, before the long parity checks
    and block checks), each with its kernels warmed in stage 2 at the same sizes."""
    li = _li()
    cfg = li.Config(dry=False)
    names = {"3a": [i.name for i in li.optim_checks(cfg)], "3b": [i.name for i in li.block_checks(cfg)]}
    new = {"3a": ["optim CUDA graph tables kept after an eager rebuild SGD",
                  "optim first step without host sync Adam fresh",
                  "optim first step without host sync Adam loaded from torch CPU state",
                  "optim capture refused after zero_grad(set_to_none=True)"],
           "3b": ["model resnet20 b64 two CUDA graphs on two streams + eager",
                  "conv fp32 TF32 operands rounded like cuDNN b256 16@32x32"]}
    for key, wanted in new.items():
        at = [names[key].index(n) for n in wanted]
        assert at == sorted(at) and at[-1] < len(names[key]) // 2, (key, at, len(names[key]))
    assert names["3a"].index(new["3a"][-1]) < min(i for i, n in enumerate(names["3a"]) if "stress" in n)
    tasks = {t[1] for t in lease.warm_tasks(cfg, Path("/nonexistent"))}
    assert set(new["3a"] + new["3b"]) - tasks == {"optim first step without host sync Adam loaded from torch CPU state"}


def test_converted_models_have_lease_rows_and_checks():
    """Issue 20: a 1x1-shortcut ResNet-18 and ResNet-9 in plain PyTorch, fused by fastres.convert, get a
    full-size parity check (3b) and a training row against eager and torch.compile (4b), each warmed with
    its one inductor build; the fastres variant is the converted zoo model with the plain one's state_dict."""
    li = _li()
    cfg = li.Config(dry=False)
    checks = [i.name for i in li.block_checks(cfg)]
    rows = {i.name: i for i in li.train_rows(cfg)}
    for model in ("kuangliu_resnet18", "resnet9"):
        assert f"model {model} 5 SGD steps" in checks
        item = rows[f"train {model} (convert) b512 bf16"]
        assert list(item.compiles) == ["torch.compile"]
        plain = li.test_train.build_model(model, fused=False)
        fused = li.test_train.build_model(model, fused=True)
        assert list(fused.state_dict()) == list(plain.state_dict())
        assert all(row.op for row in fused.fastres_report), [str(r) for r in fused.fastres_report if not r.op]
    assert li.CONVERTED_VARIANTS == ["fastres", "eager channels_last", "torch.compile"]


def _one_line_failure(run: subprocess.CompletedProcess) -> str:
    lines = run.stdout.strip().splitlines()
    assert run.returncode == lease.INSTALL_FAILED and lines, (run.returncode, run.stdout, run.stderr[-2000:])
    assert lines[-1].startswith("gpu_check: FAILED before stage 1, nothing ran: "), lines
    return lines[-1]


def test_install_check_passes_here():
    assert lease.install_problem(dry=True) == ""


def test_a_broken_install_stops_the_runner_with_one_line(tmp_path):
    """fastres importable but its kernels not, as a package shadowing the installed one."""
    broken = tmp_path / "site" / "fastres"
    (broken / "kernels").mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "kernels" / "__init__.py").write_text("raise ImportError('no kernels in this install')\n")
    env = dict(os.environ, PYTHONPATH=str(broken.parent), PYTHON=sys.executable)
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert "import fastres.kernels failed" in _one_line_failure(run)
    assert not (tmp_path / "out").exists()


def test_a_failed_pip_install_stops_the_runner_with_one_line(tmp_path):
    env = dict(os.environ, FASTRES_INSTALL_PATH=str(tmp_path / "no-such-checkout"), PYTHON=sys.executable)
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert f"pip install -e {tmp_path / 'no-such-checkout'} exited" in _one_line_failure(run)
    assert not (tmp_path / "out").exists()
