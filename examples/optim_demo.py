"""fastres' fused optimizers side by side with torch.optim.

Trains the same small convolutional network on the same synthetic data twice
per optimizer, once with ``torch.optim.X`` and once with ``fastres.optim.X``,
and prints the loss curves, the largest difference between the two models'
weights, and the time per step.

On a CUDA device fastres runs its compiled Triton kernels (one launch per
step); on a CPU it runs the same kernels under Triton's interpreter when
``--interpret`` is given (the default of scripts/run.sh without a GPU), else
its pure-PyTorch path.

    python examples/optim_demo.py                 # every optimizer
    python examples/optim_demo.py --optimizers Adam SGD --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta"])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--interpret",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the Triton kernels under the interpreter on CPU (default: on when there is no GPU)",
    )
    return parser.parse_args()


# Hyperparameters of the notes (momentum 0.9; Adam "usually only lr is tuned").
SETTINGS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "Adam": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-3, alpha=0.9),
    "Adagrad": dict(lr=1e-2),
    "Adadelta": dict(lr=1.0),
}


def main() -> int:
    args = parse_args()
    unknown = [name for name in args.optimizers if name not in SETTINGS]
    if unknown:
        print(f"unknown optimizer(s) {unknown}; choose from {sorted(SETTINGS)}", file=sys.stderr)
        return 2

    import torch

    interpret = args.interpret if args.interpret is not None else not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the import of triton (via fastres)
    import fastres
    import fastres.optim

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = fastres.backend_for(torch.empty(0, device=device))
    print(f"fastres {fastres.__version__}, torch {torch.__version__}, device {device}: {backend.reason}")

    torch.manual_seed(args.seed)
    # A learnable synthetic task: labels from a fixed random linear map of the
    # images; four batches seen in turn, so the loss visibly falls.
    n_batches = 4
    images = torch.randn(n_batches * args.batch_size, 3, 8, 8, device=device)
    labels = (images.flatten(1) @ torch.randn(3 * 8 * 8, 10, device=device)).argmax(1)

    def model() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
        ).to(device)

    def train(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[float], float]:
        losses, elapsed = [], 0.0
        for step in range(args.steps):
            first = (step % n_batches) * args.batch_size
            batch = slice(first, first + args.batch_size)
            loss = torch.nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            losses.append(loss.item())
        return losses, elapsed / args.steps

    print(f"{'optimizer':<10} {'impl':<8} {'loss: first -> last':>22} {'step ms':>9} {'max |w_torch - w_fastres|':>27}")
    worst = 0.0
    for name in args.optimizers:
        kwargs = SETTINGS[name]
        net_torch, net_fast = model(), model()
        losses_torch, ms_torch = train(net_torch, getattr(torch.optim, name)(net_torch.parameters(), **kwargs))
        losses_fast, ms_fast = train(net_fast, getattr(fastres.optim, name)(net_fast.parameters(), **kwargs))
        diff = max((a - b).abs().max().item() for a, b in zip(net_torch.parameters(), net_fast.parameters()))
        worst = max(worst, diff)
        print(f"{name:<10} {'torch':<8} {losses_torch[0]:>10.4f} -> {losses_torch[-1]:<9.4f} {ms_torch * 1e3:>9.2f}")
        print(f"{'':<10} {'fastres':<8} {losses_fast[0]:>10.4f} -> {losses_fast[-1]:<9.4f} {ms_fast * 1e3:>9.2f} {diff:>27.2e}")
    if interpret:
        print("(step times under the interpreter measure Python, not the kernels: run on a GPU for speed)")
    print(f"largest weight difference after {args.steps} steps: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
