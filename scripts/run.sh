#!/usr/bin/env bash
# The main job from nothing: virtual environment, install, then the CIFAR-10
# training example (examples/train_cifar.py), fastres' fused model and
# optimizers end to end: per-epoch loss and accuracy, per-class test accuracy,
# runs/<name>/log.json, checkpoint.pt (resumable) and curves.png (fastres[examples]
# installs matplotlib and tqdm; FASTRES_EXTRAS overrides which extras).
#
# With a CUDA device: the fast recipe (ResNet-20, batch 512, bf16, one-cycle,
# 30 epochs). Without one: a short CPU run of a few minutes on a subset (the
# full recipes take hours on a CPU). Arguments after run.sh go to the example
# (try --help); on a CPU box, giving any replaces the short-run defaults.
# Without CIFAR-10 in ./data the example trains on a synthetic stand-in and
# says so; add --download to fetch the real data.
set -euo pipefail
FASTRES_EXTRAS="${FASTRES_EXTRAS:-examples}"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$repo"
if "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    defaults=(--recipe fast)
    echo "==> CUDA device found: the fast recipe (arguments you give override it)"
elif [ "$#" -eq 0 ]; then
    defaults=(--recipe fast --epochs 3 --batch-size 128 --lr 0.1 --train-subset 8000 --test-subset 1000)
    echo "==> no CUDA device: a short CPU run instead of the full recipe: ${defaults[*]}"
    echo "    (a few minutes). The full recipes (hours on a CPU, minutes on a GPU):"
    echo "    bash scripts/run.sh --recipe fast      or      bash scripts/run.sh --recipe notes"
else
    defaults=()
    echo "==> no CUDA device: running examples/train_cifar.py $* on the CPU"
fi
exec "$venv/bin/python" examples/train_cifar.py ${defaults[@]+"${defaults[@]}"} "$@"
