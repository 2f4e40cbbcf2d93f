"""Train a CIFAR-10 ResNet with fastres (fused model + fused optimizer) or plain PyTorch.

    python examples/train_cifar.py                          # the notes' recipe, fastres
    python examples/train_cifar.py --recipe fast            # time to accuracy: ResNet-20, bf16, one-cycle
    python examples/train_cifar.py --impl torch             # the same run on torch.nn + torch.optim
    python examples/train_cifar.py --resume runs/NAME       # continue an interrupted run
    torchrun --nproc_per_node 8 examples/train_cifar.py --recipe fast   # data-parallel, one GPU per process

The data set stays on the device (fastres.data.GPULoader, with the notes'
augmentation: pad 4, random crop, horizontal flip): no worker processes.
CIFAR-10 is read from ./data; without it the run uses fastres' synthetic
stand-in and says so. A --data PATH given without CIFAR-10 there is an error
(a mistyped path never trains on the stand-in). Each epoch writes OUT/log.json
and OUT/checkpoint.pt atomically (a temporary file, then a rename), so an
interrupted run (Ctrl-C, a crash, a lost machine) resumes with --resume and
ends with exactly the weights of an uninterrupted one on the same machine and
settings (on a GPU, bitwise only with --deterministic); a write that fails (a
full disk) stops the run with an error and leaves the previous checkpoint
intact. With torchrun every process reads the checkpoint, so
OUT must be on a file system they share. ``main(argv)`` runs in-process and
returns the final metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

MODELS = ["notes", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18_cifar", "resnet9",
          "preact_resnet18"]
# Written in plain PyTorch (fastres.testing.zoo), as public CIFAR code writes them; --impl fastres runs them
# through fastres.convert, which fuses what it can on their torch.fx graph and says what it left.
PLAIN_MODELS = {"resnet9": "ResNet9", "preact_resnet18": "PreActResNet18"}
OPTIMIZERS = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta"]
OPTIMIZER_CLASS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
                   "adagrad": "Adagrad", "adadelta": "Adadelta"}

# What each recipe sets unless a flag says otherwise. "notes" is the course
# notes' recipe verbatim; "fast" aims at ResNet-20 >= 91% test accuracy in
# little time: its values are common choices for this setting, not tuned here.
RECIPES: dict[str, dict[str, Any]] = {
    "notes": dict(model="notes", epochs=80, batch_size=100, optimizer="sgd", schedule="step", step_size=7, gamma=0.1,
                  label_smoothing=0.0, amp="none", channels_last=False, nesterov=False, target_acc=None),
    "fast": dict(model="resnet20", epochs=30, batch_size=512, optimizer="sgd", schedule="onecycle", step_size=7,
                 gamma=0.1, label_smoothing=0.1, amp="bf16", channels_last=True, nesterov=True, target_acc=0.91),
}
# Per recipe and optimizer: lr (the peak lr of the one-cycle schedule), momentum, weight decay.
# Only the notes' SGD values come from a source; the rest are untuned starting points.
OPTIMIZER_DEFAULTS: dict[str, dict[str, dict[str, float]]] = {
    "notes": {
        "sgd": dict(lr=1e-3, momentum=0.9, weight_decay=0.0),
        "adam": dict(lr=1e-3, momentum=0.0, weight_decay=0.0),
        "adamw": dict(lr=1e-3, momentum=0.0, weight_decay=1e-2),
        "rmsprop": dict(lr=1e-3, momentum=0.0, weight_decay=0.0),
        "adagrad": dict(lr=1e-2, momentum=0.0, weight_decay=0.0),
        "adadelta": dict(lr=1.0, momentum=0.0, weight_decay=0.0),
    },
    "fast": {
        "sgd": dict(lr=0.4, momentum=0.9, weight_decay=5e-4),
        "adam": dict(lr=2e-3, momentum=0.0, weight_decay=0.0),
        "adamw": dict(lr=2e-3, momentum=0.0, weight_decay=5e-2),
        "rmsprop": dict(lr=1e-3, momentum=0.0, weight_decay=5e-4),
        "adagrad": dict(lr=5e-2, momentum=0.0, weight_decay=5e-4),
        "adadelta": dict(lr=1.0, momentum=0.0, weight_decay=5e-4),
    },
}
ONECYCLE_PCT_START = 0.25  # fraction of the steps spent warming up to the peak lr

# The resolved training configuration (saved in the checkpoint and the log).
CONFIG_KEYS = ["recipe", "impl", "model", "optimizer", "epochs", "batch_size", "lr", "momentum", "weight_decay",
               "nesterov", "schedule", "step_size", "gamma", "label_smoothing", "amp", "channels_last", "seed",
               "train_subset", "test_subset", "target_acc", "compile", "cuda_graph", "sync_bn", "deterministic"]
# Keys that a resumed run must keep: changing them would not continue the same training.
LOCKED_ON_RESUME = ["model", "optimizer", "batch_size", "lr", "momentum", "weight_decay", "nesterov", "schedule",
                    "step_size", "gamma", "label_smoothing", "seed", "train_subset", "test_subset"]

CHECKPOINT = "checkpoint.pt"
LOG = "log.json"
PLOT = "curves.png"
CHECKPOINT_FORMAT = "fastres.examples.train_cifar/1"
THIS = os.path.abspath(__file__)


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    recipe_help = "\n".join(
        f"  {name:6s} " + ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
        for name, values in RECIPES.items()
    )
    parser = argparse.ArgumentParser(
        prog="train_cifar.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # absent flags stay absent: the recipe (or the checkpoint) decides
        epilog=(
            "recipes (any explicit flag overrides them):\n" + recipe_help + "\n"
            "  lr, momentum, weight decay per optimizer: notes SGD lr 0.001 momentum 0.9 (from the notes);\n"
            "  fast SGD peak lr 0.4 (batch 512), momentum 0.9, weight decay 5e-4; the one-cycle schedule warms up\n"
            f"  over the first {ONECYCLE_PCT_START:.0%} of the steps. The fast recipe's values and every non-SGD\n"
            "  default are untuned starting points, not measured optima.\n\n"
            "interrupting: Ctrl-C stops cleanly; OUT/checkpoint.pt then holds the last completed epoch and\n"
            "--resume OUT continues it with the same result as an uninterrupted run."
        ),
    )
    add = parser.add_argument
    g = parser.add_argument_group("what to train")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="hyperparameter set (default: notes)")
    g.add_argument("--impl", choices=["fastres", "torch"],
                   help="fastres: fastres model + fastres.optim; torch: fastres.reference.nn model + torch.optim "
                        "(default: fastres)")
    g.add_argument("--model", choices=MODELS,
                   help="notes = the notes' ResNet(ResidualBlock, [2, 2, 2]); resnet20..110 = He et al.'s 6n+2; "
                        "resnet18_cifar = the notes' wide variant; resnet9 (DAWNBench) and preact_resnet18 = plain "
                        "PyTorch models that --impl fastres runs through fastres.convert (default: the recipe's)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="(default: sgd)")
    g = parser.add_argument_group("hyperparameters (default: the recipe's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size, split evenly over torchrun processes")
    g.add_argument("--lr", type=float, help="learning rate (peak lr with --schedule onecycle)")
    g.add_argument("--momentum", type=float, help="SGD and RMSprop momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum (SGD)")
    g.add_argument("--schedule", choices=["step", "onecycle", "none"],
                   help="step: StepLR per epoch; onecycle: OneCycleLR per iteration; none: constant lr")
    g.add_argument("--step-size", type=int, help="StepLR step in epochs")
    g.add_argument("--gamma", type=float, help="StepLR factor")
    g.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing of the training loss")
    g.add_argument("--seed", type=int, help="seeds the weights, the shuffling and the augmentation (default 0)")
    g.add_argument("--target-acc", type=float,
                   help="report the training time at which the test accuracy first reaches this fraction")
    g = parser.add_argument_group("speed")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"],
                   help="autocast dtype; fp16 adds a torch.amp.GradScaler (the fast recipe's bf16 applies on "
                        "CUDA only unless given explicitly)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory format")
    g.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the model (optional mode, e.g. max-autotune)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="capture the whole training step (forward, backward, optimizer step) in one CUDA graph "
                        "replayed on static input buffers (CUDA only; the fast recipe's default on one GPU, so "
                        "the step never waits on Python)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (torch.use_deterministic_algorithms, no cudnn benchmark)")
    g.add_argument("--sync-bn", action="store_true",
                   help="with torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu; torchrun: "
                                    "cuda:LOCAL_RANK)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", help="CIFAR-10 root holding cifar-10-batches-py/ (default ./data, "
                                                  "the synthetic stand-in when it is not there; a PATH given "
                                                  "must hold it, or take --download)")
    g.add_argument("--download", action="store_true", help="download CIFAR-10 into --data if it is not there")
    g.add_argument("--synthetic", action="store_true", help="use the synthetic stand-in even if CIFAR-10 is there")
    g.add_argument("--train-subset", type=int, metavar="N", help="train on the first N training images (0: all)")
    g.add_argument("--test-subset", type=int, metavar="N", help="test on the first N test images (0: all)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", metavar="DIR",
                   help="run directory for log.json, checkpoint.pt, curves.png (default runs/MODEL-IMPL-TIME)")
    g.add_argument("--resume", nargs="?", const="", metavar="DIR",
                   help="continue the run in DIR (or in --out) from its checkpoint; its settings are kept, "
                        "flags given now override those that may change")
    g.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop as on Ctrl-C once EPOCHS epochs are done (the schedule still spans --epochs)")
    g.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    del add
    return parser


def graph_by_default(cfg: dict[str, Any], device: torch.device, world_size: int) -> bool:
    """The fast recipe captures its step in a CUDA graph wherever that is supported (see check_config)."""
    return (cfg["recipe"] == "fast" and device.type == "cuda" and world_size == 1 and cfg["amp"] != "fp16"
            and not cfg["compile"] and cfg["optimizer"] != "adagrad")


def resolve_config(parser: argparse.ArgumentParser, given: dict[str, Any], saved: dict[str, Any] | None,
                   device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """Flags given > the checkpoint's settings (when resuming) > the recipe's."""
    if saved is not None:
        changed = [k for k in LOCKED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if "recipe" in given and given["recipe"] != saved.get("recipe"):
            changed.insert(0, "recipe")
        if changed:
            parser.error(
                "--resume continues the saved run, which used "
                + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in changed)
                + f"; drop {', '.join('--' + k.replace('_', '-') for k in changed)} "
                "or start a new run with another --out"
            )
        cfg = {k: saved.get(k) for k in CONFIG_KEYS}
        for k in CONFIG_KEYS:
            if k in given:
                cfg[k] = given[k]
        if cfg["schedule"] == "onecycle" and cfg["epochs"] != saved.get("epochs"):
            parser.error(f"the saved run's one-cycle schedule spans {saved.get('epochs')} epochs; resume it with "
                         f"--epochs {saved.get('epochs')} (only step and constant schedules can be extended)")
        return cfg

    recipe = given.get("recipe", "notes")
    cfg: dict[str, Any] = {"recipe": recipe, "impl": "fastres", "seed": 0, "train_subset": 0, "test_subset": 0,
                           "compile": None, "cuda_graph": False, "sync_bn": False, "deterministic": False}
    cfg.update(RECIPES[recipe])
    for k in CONFIG_KEYS:
        if k in given:
            cfg[k] = given[k]
    for k, v in OPTIMIZER_DEFAULTS[recipe][cfg["optimizer"]].items():
        cfg[k] = given.get(k, v)
    if cfg["optimizer"] != "sgd":
        if given.get("nesterov"):
            parser.error(f"--nesterov applies to --optimizer sgd, not {cfg['optimizer']}")
        cfg["nesterov"] = False
    if cfg["optimizer"] not in ("sgd", "rmsprop") and cfg["momentum"]:
        parser.error(f"--momentum applies to sgd and rmsprop, not {cfg['optimizer']}")
    if "amp" not in given and cfg["amp"] != "none" and device.type != "cuda":
        cfg["amp"] = "none"  # the recipe's autocast is for GPUs; on a CPU it would only be slower
    if "cuda_graph" not in given:
        cfg["cuda_graph"] = graph_by_default(cfg, device, world_size)
    return cfg


def check_config(parser: argparse.ArgumentParser, cfg: dict[str, Any], device: torch.device, world_size: int) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            parser.error(message)

    need(cfg["epochs"] >= 1, f"--epochs must be >= 1, got {cfg['epochs']}")
    need(cfg["batch_size"] >= 1, f"--batch-size must be >= 1, got {cfg['batch_size']}")
    need(cfg["batch_size"] % world_size == 0,
         f"--batch-size {cfg['batch_size']} is the global batch and must divide evenly over {world_size} processes")
    need(cfg["lr"] > 0, f"--lr must be > 0, got {cfg['lr']}")
    need(cfg["momentum"] >= 0, f"--momentum must be >= 0, got {cfg['momentum']}")
    need(cfg["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {cfg['weight_decay']}")
    need(not cfg["nesterov"] or cfg["momentum"] > 0, "--nesterov needs --momentum > 0")
    need(0 <= cfg["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1), got {cfg['label_smoothing']}")
    need(cfg["step_size"] >= 1, f"--step-size must be >= 1, got {cfg['step_size']}")
    need(cfg["train_subset"] >= 0 and cfg["test_subset"] >= 0, "--train-subset and --test-subset must be >= 0")
    need(cfg["target_acc"] is None or 0 < cfg["target_acc"] <= 1,
         f"--target-acc is a fraction in (0, 1], got {cfg['target_acc']}")
    if cfg["cuda_graph"]:
        need(device.type == "cuda", f"--cuda-graph needs a CUDA device, but this run is on {device}: CUDA graphs "
                                    "capture GPU work only (drop --cuda-graph, or use --device cuda on a GPU machine)")
        need(world_size == 1, "--cuda-graph is not supported with torchrun in this example (DDP's all-reduce would "
                              "have to be captured too); use --compile for multi-GPU runs")
        need(cfg["amp"] != "fp16", "--cuda-graph with --amp fp16 is not supported (GradScaler's skipped steps "
                                   "change the graph); use --amp bf16, which needs no scaler")
        need(not cfg["compile"], "--cuda-graph and --compile together are not supported; --compile reduce-overhead "
                                 "makes torch.compile use CUDA graphs itself")
        need(cfg["optimizer"] != "adagrad", "--cuda-graph supports sgd, adam, adamw, rmsprop and adadelta, not "
                                            "adagrad (it has no capturable mode)")
    if cfg["sync_bn"] and world_size > 1:
        need(device.type == "cuda", "--sync-bn needs CUDA devices (torch.nn.SyncBatchNorm does not run on CPU)")


# --------------------------------------------------------------------------- small utilities

def atomic_write(path: str, write: Callable[[Any], None], binary: bool) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, then os.replace (never half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so a checkpoint and its log are written together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler's state_dict without callables (some torch versions keep a bound method in OneCycleLR's),
    so that the checkpoint loads with ``weights_only=True``; the rebuilt scheduler already has them."""
    return {k: v for k, v in state.items() if not callable(v)}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def reseed(seed: int, epoch: int) -> None:
    """All model-side randomness of an epoch is a function of (seed, epoch), so a resumed run matches."""
    s = (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)
    torch.manual_seed(s)  # also seeds every CUDA device
    random.seed(s)
    np.random.seed(s % 2**32)


def rng_state(device: torch.device) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """A per-epoch progress bar on stderr: tqdm when installed, else a small \\r bar (terminals only)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar = None
        self.tty = sys.stderr.isatty()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr,
                                dynamic_ncols=True)

    def update(self, done: int, images_per_s: float, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"{images_per_s:,.0f} img/s, loss {loss:.4f}", refresh=True)
        elif self.tty:
            width = 30
            filled = int(width * done / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                             f"{images_per_s:,.0f} img/s loss {loss:.4f}\x1b[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# --------------------------------------------------------------------------- distributed

class Dist:
    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.enabled = self.world_size > 1
        self.initialised_here = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            try:
                dist.init_process_group(backend, **kwargs)
            except TypeError:  # torch without device_id
                dist.init_process_group(backend)
            self.initialised_here = True

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.initialised_here = False


def pick_device(parser: argparse.ArgumentParser, requested: str | None, dist: Dist) -> torch.device:
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        parser.error(f"--device {requested!r}: {exc}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {requested}: no CUDA device is available (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            parser.error(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# --------------------------------------------------------------------------- data, model, optimizer

def load_data(parser: argparse.ArgumentParser, args: dict[str, Any], cfg: dict[str, Any], saved_source: str | None,
              dist: Dist, say: Callable[[str], None]):
    from fastres.data import CIFAR10_ARCHIVE, CIFAR10_DIR, DataError, load_cifar10, synthetic_cifar10

    root = args.get("data", "./data")
    n_train = cfg["train_subset"] or 50000
    n_test = cfg["test_subset"] or 10000

    def synthetic(reason: str):
        say(reason)
        return synthetic_cifar10(num_train=n_train, num_test=n_test, seed=0)

    if args.get("synthetic") or saved_source == "synthetic":
        why = "--synthetic" if args.get("synthetic") else "the resumed run used it"
        data = synthetic(f"data: fastres' synthetic CIFAR-10 stand-in ({why}); "
                         "its accuracies say nothing about CIFAR-10")
    else:
        present = os.path.exists(os.path.join(root, CIFAR10_DIR)) or os.path.exists(os.path.join(root, CIFAR10_ARCHIVE))
        if not present and not args.get("download") and saved_source != "cifar10" and "data" in args:
            where = (f"{os.path.abspath(root)} does not exist" if not os.path.exists(root) else
                     f"{os.path.abspath(root)} holds no {CIFAR10_DIR}/ (nor {CIFAR10_ARCHIVE})")
            parser.exit(2, f"train_cifar.py: error: --data {root}: {where}. Point --data at the folder holding "
                           f"{CIFAR10_DIR}/, add --download to fetch CIFAR-10 (163 MB) there, or use --synthetic "
                           f"for fastres' synthetic stand-in\n")
        if not present and not args.get("download") and saved_source != "cifar10":
            data = synthetic(
                f"NOTICE: CIFAR-10 was not found at {os.path.abspath(root)} (no {CIFAR10_DIR}/ there), so this "
                f"run uses fastres' synthetic stand-in, and its accuracies say nothing about CIFAR-10. To train on "
                f"the real data, rerun with --download (fetches 163 MB into --data), or place {CIFAR10_DIR}/ (or "
                f"{CIFAR10_ARCHIVE}) in {root}, or point --data at the folder holding it."
            )
        else:
            try:
                # With torchrun only rank 0 may download; the others read what it wrote.
                if dist.enabled and args.get("download"):
                    if dist.main:
                        load_cifar10(root, download=True)
                    dist.barrier()
                data = load_cifar10(root, download=bool(args.get("download")) and not dist.enabled)
            except DataError as exc:
                parser.exit(1, f"train_cifar.py: error: {exc}\n")
            say(f"data: CIFAR-10 from {os.path.abspath(root)}")
    if cfg["train_subset"] and cfg["train_subset"] < len(data.train_labels):
        data = data._replace(train_images=data.train_images[:cfg["train_subset"]],
                             train_labels=data.train_labels[:cfg["train_subset"]])
    if cfg["test_subset"] and cfg["test_subset"] < len(data.test_labels):
        data = data._replace(test_images=data.test_images[:cfg["test_subset"]],
                             test_labels=data.test_labels[:cfg["test_subset"]])
    return data


def build_model(cfg: dict[str, Any], num_classes: int) -> torch.nn.Module:
    import fastres
    from fastres.reference import nn as ref

    fused = cfg["impl"] == "fastres"
    if cfg["model"] in PLAIN_MODELS:
        from fastres.testing import zoo

        model = getattr(zoo, PLAIN_MODELS[cfg["model"]])(num_classes=num_classes)
        return fastres.convert(model) if fused else model
    if cfg["model"] == "notes":
        if fused:
            return fastres.ResNet(fastres.nn.ResidualBlock, [2, 2, 2], num_classes)
        return ref.ResNet(ref.ResidualBlock, [2, 2, 2], num_classes)
    if fused:
        return getattr(fastres.models, cfg["model"])(num_classes)
    return ref.build(cfg["model"], num_classes)


def build_optimizer(cfg: dict[str, Any], params, device: torch.device) -> torch.optim.Optimizer:
    name = cfg["optimizer"]
    if cfg["impl"] == "fastres":
        import fastres.optim

        cls = getattr(fastres.optim, OPTIMIZER_CLASS[name])
    else:
        cls = getattr(torch.optim, OPTIMIZER_CLASS[name])
    lr: float | torch.Tensor = cfg["lr"]
    extra: dict[str, Any] = {}
    if cfg["cuda_graph"]:
        # The scheduler must reach the captured step: lr as a device tensor that it updates in place.
        lr = torch.tensor(float(cfg["lr"]), device=device)
        if name != "sgd":
            extra = {"capturable": True}  # the step count on the device
            if cfg["impl"] == "torch":
                extra["foreach"] = True
        elif cfg["impl"] == "torch":
            extra = {"fused": True}  # torch's SGD takes a tensor lr in its fused form
    kw: dict[str, Any] = {"lr": lr, "weight_decay": cfg["weight_decay"], **extra}
    if name == "sgd":
        kw.update(momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    elif name == "rmsprop":
        kw.update(momentum=cfg["momentum"])
    return cls(params, **kw)


def build_scheduler(cfg: dict[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["step_size"], gamma=cfg["gamma"])
    if cfg["schedule"] == "onecycle":
        total = cfg["epochs"] * steps_per_epoch
        # At least 1.5 warm-up steps, so that very short runs (quick tests) still have both phases.
        pct_start = min(max(ONECYCLE_PCT_START, 1.5 / total), 0.75)
        # Momentum is not cycled: it stays a plain number (a captured CUDA graph could not see it change).
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg["lr"], total_steps=total, pct_start=pct_start, cycle_momentum=False)
    return None


class GraphedStep:
    """The whole training step (forward, loss, backward, optimizer.step) as one CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (they are real
    training steps and create the grads and the optimizer state); the next
    call captures the graph and replays it, and every later call copies the
    batch into the static input buffers and replays. The grads stay the
    tensors the first step allocated (zeroed in place, never set to None), so
    no address the optimizer has seen changes; the lr lives in a device
    tensor the scheduler fills in place, so schedules reach the graph.
    """

    def __init__(self, model, loss_fn, optimizer, autocast: Callable[[], Any], warmup: int = 3) -> None:
        self.model, self.loss_fn, self.optimizer, self.autocast = model, loss_fn, optimizer, autocast
        self.warmup = warmup
        self.calls = 0
        self.graph = None
        self.x = self.y = self.loss = self.out = None

    def _step(self):
        self.optimizer.zero_grad(set_to_none=False)  # in place: the grads keep their addresses
        with self.autocast():
            out = self.model(self.x)
            loss = self.loss_fn(out, self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), out.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        if x.shape != self.x.shape:
            raise RuntimeError(f"--cuda-graph needs equal batches, got {list(x.shape)} after {list(self.x.shape)}")
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss, out = self._step()
            torch.cuda.current_stream().wait_stream(side)
            return loss, out
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.loss, self.out = self._step()
            self.graph = graph
        self.graph.replay()
        return self.loss, self.out


# --------------------------------------------------------------------------- train / evaluate

@torch.no_grad()
def evaluate(model, loader, num_classes: int, autocast, dist: Dist, device: torch.device) -> dict[str, Any]:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    count = torch.zeros(num_classes, dtype=torch.int64, device=device)
    for x, y in loader:
        with autocast():
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        count += torch.bincount(y, minlength=num_classes)
        correct += torch.bincount(y[out.argmax(1) == y], minlength=num_classes)
    dist.all_reduce(loss_sum)
    dist.all_reduce(correct)
    dist.all_reduce(count)
    total = int(count.sum())
    return {"loss": float(loss_sum) / max(total, 1), "acc": int(correct.sum()) / max(total, 1),
            "correct": correct.tolist(), "count": count.tolist()}


def env_info(device: torch.device, dist: Dist, cfg: dict[str, Any]) -> dict[str, Any]:
    import fastres

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "fastres": fastres.__version__, "numpy": np.__version__, "device": str(device),
        "world_size": dist.world_size, "cpu_threads": torch.get_num_threads(),
        "fastres_backend": fastres.backend_for(torch.empty(0, device=device)).reason,
    }
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def write_plot(history: list[dict[str, Any]], path: str, title: str) -> str | None:
    """curves.png of loss and accuracy per epoch; returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (optimised loss)")
    ax1.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax2.plot(epochs, [100 * h["test_acc"] for h in history], "o-", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()

    def save(f) -> None:
        fig.savefig(f, format="png", dpi=100)

    atomic_write(path, save, binary=True)
    plt.close(fig)
    return None


def check_writable(parser: argparse.ArgumentParser, out: str) -> None:
    """OUT can be made and takes a file: a clear error before any training otherwise (the folder is made
    for the check and removed again if it was not there: a run that stops on another error leaves none)."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        parser.exit(1, f"train_cifar.py: error: cannot write to --out {out}: {exc.strerror or exc}\n")
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(out)


class WriteError(Exception):
    """A file of the run could not be written (a full disk, a lost mount): the run stops with this message."""


def write_or_stop(path: str, write: Callable[[], None], previous: str) -> None:
    """``write()`` (an :func:`atomic_write` of ``path``), or a :class:`WriteError` saying what is intact."""
    try:
        write()
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}. Nothing was half-written (each file is "
                         f"written to a temporary file, then renamed): {previous}") from exc


def resume_command(out: str, dist: Dist) -> str:
    script = os.path.relpath(THIS) if not os.path.relpath(THIS).startswith("..") else THIS
    launcher = f"torchrun --nproc_per_node {dist.world_size} " if dist.enabled else "python "
    return f"{launcher}{script} --resume {out}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(parser.parse_args(argv))
    if args.get("deterministic"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    dist = Dist()
    device = pick_device(parser, args.get("device"), dist)
    say: Callable[[str], None] = (lambda m: print(m, flush=True)) if dist.main else (lambda m: None)

    # Where the run lives and what it continues.
    saved = None
    if "resume" in args:
        where = args["resume"] or args.get("out")
        if not where:
            parser.error("--resume needs the run directory: --resume DIR (or --out DIR --resume)")
        ckpt_path = where if where.endswith(".pt") else os.path.join(where, CHECKPOINT)
        if not os.path.isfile(ckpt_path):
            parser.error(f"--resume: no checkpoint at {ckpt_path}")
        try:
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt, or not a torch file: torch's error types vary
            parser.exit(1, f"train_cifar.py: error: --resume: cannot read {ckpt_path} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); it is truncated or corrupt. "
                           f"This script replaces its checkpoint atomically, so a run's own writes never leave it "
                           f"half-written: was it copied or edited?\n")
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            parser.error(f"--resume: {ckpt_path} is not a checkpoint of this script")
        out = args.get("out") or os.path.dirname(os.path.abspath(ckpt_path))
    else:
        given = {k: v for k, v in args.items() if k in CONFIG_KEYS}
        name = f"{given.get('model') or RECIPES[given.get('recipe', 'notes')]['model']}-{given.get('impl', 'fastres')}"
        out = args.get("out") or os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if dist.main and os.path.isfile(os.path.join(out, CHECKPOINT)):
            parser.error(f"{out} already holds a run ({CHECKPOINT}); continue it with --resume {out}, "
                         "or pick another --out")
    given = {k: v for k, v in args.items() if k in CONFIG_KEYS}
    cfg = resolve_config(parser, given, saved["config"] if saved else None, device, dist.world_size)
    check_config(parser, cfg, device, dist.world_size)
    if dist.main:
        check_writable(parser, out)

    dist.init(device)
    try:
        result = _train(parser, args, cfg, saved, out, device, dist, say, argv)
        # Every rank past its last collective before any tears down (without it gloo aborted a rank at exit
        # in about 1 run in 10; the rarer abort left is _exit_without_teardown's). Not on an error: the
        # other ranks may never arrive.
        dist.barrier()
        return result
    finally:
        dist.close()


def _train(parser, args, cfg, saved, out, device, dist: Dist, say, argv) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True

    import fastres

    backend = fastres.backend_for(torch.empty(0, device=device))
    if cfg["impl"] == "fastres" and backend.name == "interpreter":
        say("WARNING: TRITON_INTERPRET=1 is set, so fastres runs its kernels under the Triton interpreter: "
            "correct but far too slow for training; unset it (or use --impl torch)")

    data = load_data(parser, args, cfg, saved.get("data_source") if saved else None, dist, say)
    from fastres.data import GPULoader, channel_stats

    num_classes = len(data.classes)
    world = dist.world_size
    per_rank_batch = cfg["batch_size"] // world
    if len(data.train_labels) < cfg["batch_size"]:
        parser.error(f"{len(data.train_labels)} training images are fewer than one batch of {cfg['batch_size']}")
    mean, std = channel_stats(data.train_images)
    common = dict(device=device, mean=mean, std=std, channels_last=cfg["channels_last"])
    train_loader = GPULoader(data.train_images, data.train_labels, per_rank_batch, train=True, seed=cfg["seed"],
                             drop_last=True if cfg["cuda_graph"] else None, rank=dist.rank, world_size=world,
                             **common)
    # The test set is split into disjoint slices (no wrap-around padding), so every image counts once.
    test_loader = GPULoader(data.test_images[dist.rank::world], data.test_labels[dist.rank::world],
                            max(per_rank_batch, 256), train=False, **common)
    steps_per_epoch = len(train_loader)
    if cfg["schedule"] == "onecycle" and cfg["epochs"] * steps_per_epoch < 2:
        parser.error(f"--schedule onecycle needs at least 2 steps, this run has {cfg['epochs'] * steps_per_epoch}: "
                     "use more epochs or images, or a smaller --batch-size")

    # Model, identical on every rank and for both --impl (same seed, same init code).
    torch.manual_seed(cfg["seed"])
    net = build_model(cfg, num_classes)
    report = getattr(net, "fastres_report", None)
    if cfg["model"] in PLAIN_MODELS and report is not None:
        say(f"fastres.convert: {sum(row.op is not None for row in report)} of {len(report)} convs and BatchNorms "
            "fused (fastres.convert(model, report=True) says which, and why not the others)")
    if cfg["sync_bn"] and dist.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # keeps the state_dict keys
    elif cfg["sync_bn"]:
        say("note: --sync-bn has no effect in a single process")
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    net = net.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(cfg, net.parameters(), device)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["amp"]]
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=not cfg["cuda_graph"])

    history: list[dict[str, Any]] = []
    start_epoch, best_acc, train_time, reached = 0, 0.0, 0.0, None
    if saved is not None:
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # lr stays a float, or the device tensor of --cuda-graph
            value = float(group["lr"])
            group["lr"] = torch.tensor(value, device=device) if cfg["cuda_graph"] else value
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"], device)
        start_epoch, best_acc = int(saved["epoch"]), float(saved["best_acc"])
        history = list(saved["history"])
        train_time = history[-1]["train_time_s"] if history else 0.0
        reached = saved.get("time_to_target")

    model: torch.nn.Module = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model: torch.nn.Module = net
    if cfg["compile"]:
        mode = None if cfg["compile"] == "default" else cfg["compile"]
        model = torch.compile(model, mode=mode)
        eval_model = torch.compile(net, mode=mode)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y, label_smoothing=cfg["label_smoothing"])

    graphed = GraphedStep(model, loss_fn, optimizer, autocast) if cfg["cuda_graph"] else None

    def train_step(x: torch.Tensor, y: torch.Tensor):
        if graphed is not None:
            return graphed(x, y)
        with autocast():
            out = model(x)
            loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach(), out.detach()

    if dist.main:
        os.makedirs(out, exist_ok=True)
    env = env_info(device, dist, cfg)
    data_info = {"source": data.source, "path": os.path.abspath(args.get("data", "./data")) if data.source == "cifar10"
                 else None, "train_images": len(data.train_labels), "test_images": len(data.test_labels),
                 "mean": mean, "std": std}
    if cfg["impl"] == "fastres":
        runs_on = {"triton": "Triton kernels", "interpreter": "Triton kernels under the interpreter"}.get(
            backend.name, f"PyTorch's ops: {backend.reason}")
        stack = f"fastres model + fastres.optim, on {runs_on}"
    else:
        stack = "torch.nn + torch.optim"
    say(f"{cfg['model']} ({cfg['impl']}: {stack}), {sum(p.numel() for p in net.parameters()):,} params, "
        f"{cfg['optimizer']} lr {cfg['lr']:g} ({cfg['schedule']} schedule), batch {cfg['batch_size']}"
        f"{f' ({world} x {per_rank_batch})' if world > 1 else ''}, {plural(cfg['epochs'], 'epoch')}, amp {cfg['amp']}, "
        f"{data.source} {len(data.train_labels)}/{len(data.test_labels)} images, on {device}"
        f"{' x ' + str(world) + ' processes' if world > 1 else ''}; recipe {cfg['recipe']}")
    say(f"output: {out}" + (f" (resuming after epoch {start_epoch})" if saved else ""))

    status = "completed"
    stop_after = args.get("stop_after")

    def log_json() -> None:
        record = {
            "config": cfg, "argv": argv, "env": env,
            "data": data_info, "classes": list(data.classes), "status": status, "epochs_done": len(history),
            "best_test_acc": best_acc, "time_to_target": reached, "epochs": history,
        }
        atomic_write(os.path.join(out, LOG), lambda f: json.dump(record, f, indent=1), binary=False)

    def checkpoint(epoch_done: int) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch_done, "config": cfg, "data_source": data.source,
            "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": plain_state(scheduler.state_dict()) if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(device), "best_acc": best_acc, "time_to_target": reached, "history": history,
        }
        atomic_write(os.path.join(out, CHECKPOINT), lambda f: torch.save(state, f), binary=True)

    if start_epoch >= cfg["epochs"]:
        say(f"the run already has {start_epoch} epochs (--epochs {cfg['epochs']}): nothing to train")
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            reseed(cfg["seed"], epoch)
            train_loader.set_epoch(epoch)
            model.train()
            lr_used = float(optimizer.param_groups[0]["lr"])  # at the start of the epoch
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}",
                           dist.main and not args.get("no_progress"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = last = time.perf_counter()
            for i, (x, y) in enumerate(train_loader):
                loss, out_ = train_step(x, y)
                loss_sum += loss.double() * y.shape[0]  # accumulated on the device: no synchronisation per step
                correct += (out_.argmax(1) == y).sum()
                seen += y.shape[0]
                if scheduler is not None and cfg["schedule"] == "onecycle":
                    scheduler.step()
                now = time.perf_counter()
                if bar.enabled and (now - last > 0.5 or i + 1 == steps_per_epoch):
                    last = now
                    running = float(loss_sum) / seen  # synchronises: only every half second
                    bar.update(i + 1, seen * world / (time.perf_counter() - t0), running)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t0
            bar.close()
            if scheduler is not None and cfg["schedule"] == "step":
                scheduler.step()
            train_time += epoch_time
            sums = dist.all_reduce(torch.stack([loss_sum, correct.double(),
                                                torch.tensor(float(seen), dtype=torch.float64, device=device)]))
            train_loss_sum, train_correct, train_seen = sums.tolist()

            t1 = time.perf_counter()
            if dist.enabled and not cfg["sync_bn"]:
                import torch.distributed as tdist

                for b in net.buffers():  # BN running stats of rank 0 everywhere, as DDP's next forward does
                    tdist.broadcast(b, 0)
            test_metrics = evaluate(eval_model, test_loader, num_classes, autocast, dist, device)
            eval_time = time.perf_counter() - t1
            best_acc = max(best_acc, test_metrics["acc"])
            if reached is None and cfg["target_acc"] is not None and test_metrics["acc"] >= cfg["target_acc"]:
                reached = {"epoch": epoch + 1, "train_time_s": train_time, "target_acc": cfg["target_acc"]}
            history.append({
                "epoch": epoch + 1, "train_loss": train_loss_sum / train_seen, "train_acc": train_correct / train_seen,
                "test_loss": test_metrics["loss"], "test_acc": test_metrics["acc"],
                "test_per_class_acc": [c / max(n, 1) for c, n in zip(test_metrics["correct"], test_metrics["count"])],
                "test_per_class_correct": test_metrics["correct"], "test_per_class_count": test_metrics["count"],
                "lr": lr_used, "epoch_time_s": epoch_time, "eval_time_s": eval_time,
                "train_time_s": train_time, "images_per_s": train_seen / epoch_time,
            })
            h = history[-1]
            say(f"epoch {epoch + 1:3d}/{cfg['epochs']}  "
                f"train loss {h['train_loss']:.4f} acc {100 * h['train_acc']:6.2f}%  "
                f"test loss {h['test_loss']:.4f} acc {100 * h['test_acc']:6.2f}%  lr {h['lr']:.4g}  "
                f"{epoch_time:6.1f}s ({h['images_per_s']:,.0f} img/s)  total {train_time:7.1f}s")
            if reached is not None and reached["epoch"] == epoch + 1:
                say(f"reached {100 * cfg['target_acc']:.1f}% test accuracy after {train_time:.1f}s of training")
            done = epoch + 1
            if dist.main:
                with deferred_interrupt():
                    status = "completed" if done == cfg["epochs"] else "running"
                    ckpt_path = os.path.join(out, CHECKPOINT)
                    intact = (f"{ckpt_path} still holds epoch {done - 1}; continue with: {resume_command(out, dist)}"
                              if done > 1 or saved is not None else "no checkpoint was written yet")
                    write_or_stop(ckpt_path, lambda: checkpoint(done), intact)
                    write_or_stop(os.path.join(out, LOG), log_json,
                                  f"{ckpt_path} holds epoch {done}; continue with: {resume_command(out, dist)}")
            if stop_after is not None and done >= stop_after and done < cfg["epochs"]:
                status = "stopped"
                say(f"stopped after epoch {done} (--stop-after {stop_after}); "
                    f"continue with: {resume_command(out, dist)}")
                break
    except KeyboardInterrupt:
        status = "interrupted"
        say(f"\ninterrupted during epoch {len(history) + 1}; {os.path.join(out, CHECKPOINT)} holds epoch "
            f"{len(history)}" + (f"; continue with: {resume_command(out, dist)}" if history else
                                 " (no epoch was completed: start again)"))

    if dist.main and history:
        with deferred_interrupt():
            write_or_stop(os.path.join(out, LOG), log_json,
                          f"{os.path.join(out, CHECKPOINT)} holds epoch {len(history)}")
    if history:
        last_eval = history[-1]
        say(f"per-class test accuracy after epoch {last_eval['epoch']}:")
        for k, name in enumerate(data.classes):
            say(f"  {name:12s} {100 * last_eval['test_per_class_acc'][k]:6.2f}%  "
                f"({last_eval['test_per_class_correct'][k]}/{last_eval['test_per_class_count'][k]})")
        say(f"test accuracy {100 * last_eval['test_acc']:.2f}% (best {100 * best_acc:.2f}%), "
            f"training time {last_eval['train_time_s']:.1f}s over {plural(len(history), 'epoch')}")
        if dist.main:
            if not args.get("no_plot"):
                try:
                    why = write_plot(history, os.path.join(out, PLOT),
                                     f"{cfg['model']} ({cfg['impl']}), {data.source}")
                except OSError as exc:
                    why = f"cannot write it ({exc.strerror or exc})"
                say(f"curves: {os.path.join(out, PLOT)}" if why is None else f"plot skipped: {why}")
            say(f"log: {os.path.join(out, LOG)}, checkpoint: {os.path.join(out, CHECKPOINT)}")
    result: dict[str, Any] = {"status": status, "out": out, "epochs_done": len(history), "best_test_acc": best_acc,
                              "time_to_target": reached, "data_source": data.source, "history": history}
    if history:
        h = history[-1]
        result.update({k: h[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "train_time_s")})
        result["test_per_class_acc"] = dict(zip(data.classes, h["test_per_class_acc"]))
    return result


def cli() -> int:
    try:
        result = main()
    except KeyboardInterrupt:  # before training started
        print("\ninterrupted", file=sys.stderr)
        return 130
    except WriteError as exc:
        print(f"train_cifar.py: error: {exc}", file=sys.stderr)
        return 1
    return 130 if result["status"] == "interrupted" else 0


def _exit_without_teardown(code: int) -> None:
    """End a torchrun rank without the interpreter's exit-time destructors.

    DDP keeps its process group alive in C++ past ``destroy_process_group()`` (torch 2.13: the gloo group's
    three threads outlive it), and those threads race the process's exit-time destructors: a finished rank
    aborted with "terminate called without an active exception" in 2 of 80 two-process runs of a 7-line DDP
    script, 0 of 120 ending this way. Everything is written (atomically) and synchronised by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = cli()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_teardown(exit_code)
    sys.exit(exit_code)
