"""examples/train_cifar.py end to end on a tiny synthetic subset, on the CPU.

In-process runs use ``--impl torch`` (this session may have set
TRITON_INTERPRET=1, under which fastres' kernels would run interpreted: far
too slow for a training loop); ``--impl fastres`` and the two-process DDP run
go through subprocesses without TRITON_INTERPRET, so fastres takes its
pure-PyTorch CPU path there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastres.data import CIFAR10_CLASSES
from fastres.reference import nn as ref

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cifar.py"
TINY = ["--train-subset", "256", "--test-subset", "128", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The in-process runs share a small, busy machine: one thread avoids OpenMP oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    # The synthetic stand-in, whatever ./data holds.
    return [*TINY, "--synthetic", *extra]


def _run(args: list[str], cwd: Path, launcher: list[str] | None = None, timeout: int = 240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # cwd outside the checkout, like tests/test_package.py: fastres is imported from the install.
    cmd = [sys.executable, *(launcher or []), str(SCRIPT), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_run(out: Path, impl: str, epochs: int, stdout: str) -> dict:
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["impl"] == impl and log["status"] == "completed"
    assert log["data"]["source"] == "synthetic" and log["data"]["train_images"] == 256
    assert log["env"]["torch"] == torch.__version__ and log["env"]["fastres"]
    assert [e["epoch"] for e in log["epochs"]] == list(range(1, epochs + 1))
    for e in log["epochs"]:
        assert set(e) >= {"train_loss", "train_acc", "test_loss", "test_acc", "test_per_class_acc", "lr",
                          "epoch_time_s", "train_time_s", "images_per_s"}
        assert 0 <= e["test_acc"] <= 1 and len(e["test_per_class_acc"]) == 10
        assert sum(e["test_per_class_count"]) == 128  # every test image once, also split over processes
    ckpt = _load(out / "checkpoint.pt")
    assert ckpt["epoch"] == epochs and ckpt["history"] == log["epochs"]
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "best_acc", "config"}
    assert set(ckpt["rng"]) >= {"torch", "python", "numpy"}
    # Both --impl save the plain model's state_dict keys.
    ref.ResNet(ref.ResidualBlock, [2, 2, 2]).load_state_dict(ckpt["model"])
    assert "per-class test accuracy" in stdout
    assert all(name in stdout for name in CIFAR10_CLASSES)
    assert "synthetic CIFAR-10 stand-in (--synthetic)" in stdout
    if importlib.util.find_spec("matplotlib") is not None:  # installed by fastres[test] and fastres[examples]
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no curves.png:\n{stdout}"
        assert f"curves: {out / 'curves.png'}" in stdout
    else:
        assert "plot skipped: matplotlib is not installed" in stdout
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    return log


def test_one_epoch_torch_in_process(train_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    result = train_cifar.main(_args(tmp_path, "--impl", "torch", "--model", "notes", "--epochs", "1",
                                    "--out", str(out)))
    log = _check_run(out, "torch", 1, capsys.readouterr().out)
    assert result["status"] == "completed" and result["epochs_done"] == 1
    assert result["test_acc"] == log["epochs"][0]["test_acc"]
    assert list(result["test_per_class_acc"]) == CIFAR10_CLASSES
    # The notes' recipe: SGD lr 0.001 momentum 0.9, StepLR(7, 0.1), batch overridden to 64.
    assert log["config"]["optimizer"] == "sgd" and log["config"]["lr"] == 1e-3 and log["config"]["momentum"] == 0.9
    assert log["config"]["schedule"] == "step" and log["config"]["batch_size"] == 64


def test_one_epoch_fastres_subprocess(tmp_path):
    out = tmp_path / "run"
    result = _run(_args(tmp_path, "--impl", "fastres", "--model", "notes", "--epochs", "1", "--amp", "bf16",
                        "--out", str(out)), cwd=tmp_path)
    log = _check_run(out, "fastres", 1, result.stdout)
    assert log["config"]["amp"] == "bf16"
    assert "pure-PyTorch" in log["env"]["fastres_backend"]
    # Which path runs is said, not only the stack (issue #19, item 7).
    assert ("fastres model + fastres.optim, on PyTorch's ops: CPU tensor and TRITON_INTERPRET is not set"
            in result.stdout), result.stdout


def _same_training(a: Path, b: Path) -> None:
    ca, cb = _load(a / "checkpoint.pt"), _load(b / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"]
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), f"{key} differs after resuming"
    for p, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(cb["optimizer"]["state"][p][name])), name
    timing = ("epoch_time_s", "eval_time_s", "train_time_s", "images_per_s")
    strip = lambda h: [{k: v for k, v in e.items() if k not in timing} for e in h]  # noqa: E731
    assert strip(ca["history"]) == strip(cb["history"])


def test_interrupted_then_resumed_equals_uninterrupted(train_cifar, tmp_path, capsys, monkeypatch):
    # The fast recipe (one-cycle per iteration, Nesterov, weight decay, label smoothing), fp32 on the CPU.
    common = _args(tmp_path, "--impl", "torch", "--recipe", "fast", "--model", "notes", "--epochs", "2", "--seed", "3")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_cifar.main([*common, "--out", str(straight)])

    evaluate = train_cifar.evaluate
    calls = []

    def ctrl_c_in_second_epoch(*args, **kwargs):  # Ctrl-C after epoch 2 trained, before it was saved
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_cifar, "evaluate", ctrl_c_in_second_epoch)
    result = train_cifar.main([*common, "--out", str(broken)])
    monkeypatch.setattr(train_cifar, "evaluate", evaluate)
    printed = capsys.readouterr().out
    assert result["status"] == "interrupted" and result["epochs_done"] == 1
    assert f"--resume {broken}" in printed
    assert _load(broken / "checkpoint.pt")["epoch"] == 1
    assert json.loads((broken / "log.json").read_text())["status"] == "interrupted"

    resumed = train_cifar.main(["--resume", str(broken), "--no-progress"])
    assert resumed["status"] == "completed" and resumed["epochs_done"] == 2
    _same_training(straight, broken)


def test_resume_extends_a_step_schedule(train_cifar, tmp_path):
    common = _args(tmp_path, "--impl", "torch", "--model", "notes", "--step-size", "1", "--lr", "0.05")
    train_cifar.main([*common, "--epochs", "2", "--out", str(tmp_path / "straight")])
    train_cifar.main([*common, "--epochs", "1", "--out", str(tmp_path / "short")])
    train_cifar.main(["--resume", str(tmp_path / "short"), "--epochs", "2", "--no-progress"])
    _same_training(tmp_path / "straight", tmp_path / "short")


@pytest.mark.parametrize("device", [
    "cpu",  # gloo
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="NCCL with one GPU per process needs two GPUs")),
])
def test_ddp_two_processes(tmp_path, device):
    # The device is explicit: left to the example, a CUDA machine gives rank 1 cuda:1, absent on a one-GPU one.
    out = tmp_path / "ddp"
    result = _run(_args(tmp_path, "--impl", "torch", "--model", "notes", "--epochs", "1", "--device", device,
                        "--out", str(out)),
                  cwd=tmp_path, launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert result.stdout.count("epoch   1/1") == 1  # only rank 0 prints
    log = _check_run(out, "torch", 1, result.stdout)
    assert log["env"]["world_size"] == 2
    assert "(2 x 32)" in result.stdout  # global batch 64 = 2 processes x 32


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet7"], "invalid choice: 'resnet7'"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
        (["--optimizer", "adam", "--nesterov"], "--nesterov applies to --optimizer sgd"),
        (["--batch-size", "1024", "--train-subset", "256"], "fewer than one batch"),
        (["--resume", "nowhere"], "no checkpoint at"),
    ],
)
def test_bad_arguments_give_clear_errors(train_cifar, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train_cifar.main([*argv, "--out", str(tmp_path / "run"), "--synthetic", "--test-subset", "16",
                          "--no-progress"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_incomplete_cifar_folder_is_an_error_not_a_silent_fallback(train_cifar, tmp_path, capsys):
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        train_cifar.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--impl", "torch"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "--download" in err


def test_resume_refuses_changed_hyperparameters(train_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    train_cifar.main(_args(tmp_path, "--impl", "torch", "--model", "notes", "--epochs", "1", "--out", str(out)))
    with pytest.raises(SystemExit):
        train_cifar.main(["--resume", str(out), "--lr", "0.1"])
    assert "--lr 0.001" in capsys.readouterr().err


def test_without_data_the_synthetic_stand_in_says_so(train_cifar, tmp_path, capsys, monkeypatch):
    """No --data and no ./data: the synthetic stand-in, with a notice saying how to get CIFAR-10."""
    monkeypatch.chdir(tmp_path)
    result = train_cifar.main([*TINY, "--impl", "torch", "--model", "notes", "--epochs", "1", "--out", "run",
                               "--no-plot"])
    out = capsys.readouterr().out
    assert result["data_source"] == "synthetic" and "CIFAR-10 was not found" in out and "--download" in out


def test_a_data_path_without_cifar_is_an_error(train_cifar, tmp_path, capsys):
    """A mistyped --data never trains on the synthetic stand-in (issue #19, item 7); nothing is left behind."""
    for data in (tmp_path / "no-such-folder", tmp_path):
        with pytest.raises(SystemExit) as exc:
            train_cifar.main([*TINY, "--data", str(data), "--out", str(tmp_path / "run"), "--impl", "torch"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--data {data}" in err and "--download" in err and "--synthetic" in err
        assert not (tmp_path / "run").exists()


def test_a_corrupt_checkpoint_is_a_clear_error(train_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    train_cifar.main(_args(tmp_path, "--impl", "torch", "--model", "notes", "--epochs", "1", "--out", str(out),
                           "--no-plot"))
    data = (out / "checkpoint.pt").read_bytes()
    for corrupt in (data[: len(data) // 2], b"not a checkpoint"):
        (out / "checkpoint.pt").write_bytes(corrupt)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            train_cifar.main(["--resume", str(out), "--epochs", "2", "--no-progress"])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert f"cannot read {out / 'checkpoint.pt'}" in err and "truncated or corrupt" in err


def test_an_unwritable_out_is_a_clear_error_before_training(train_cifar, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exc:
        train_cifar.main(_args(tmp_path, "--impl", "torch", "--out", str(tmp_path / "a-file" / "run")))
    assert exc.value.code == 1
    assert f"cannot write to --out {tmp_path / 'a-file' / 'run'}" in capsys.readouterr().err


def test_a_full_disk_stops_with_the_previous_checkpoint_intact(train_cifar, tmp_path, capsys, monkeypatch):
    """The second epoch's checkpoint fails half-written (ENOSPC from torch.save): exit 1 with a message
    (no traceback), checkpoint.pt still holds epoch 1 (written to a temporary file, then renamed), no
    temporary file is left, and the run resumes from it."""
    import errno

    out = tmp_path / "run"
    save = torch.save
    calls = []

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    monkeypatch.setattr(sys, "argv", ["train_cifar.py", *_args(tmp_path, "--impl", "torch", "--model", "notes",
                                                               "--epochs", "2", "--out", str(out))])
    assert train_cifar.cli() == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"{out / 'checkpoint.pt'} still holds epoch 1" in err
    assert "Traceback" not in err
    monkeypatch.setattr(torch, "save", save)
    assert _load(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert train_cifar.main(["--resume", str(out), "--no-progress"])["epochs_done"] == 2
