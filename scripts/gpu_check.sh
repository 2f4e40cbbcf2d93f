#!/usr/bin/env bash
# The GPU lease runner (README, "The GPU lease runner"): on a bare, offline machine with a CUDA GPU
# (../shared/GPU.md), install fastres without network, check that its kernels import and CUDA is there,
# then run benchmarks/lease.py: environment and ceilings, a parallel compile warm-up, compiled correctness
# at full size, the headline ratios and a GPU test subset, each stage under its own time budget, 7 minutes
# in all from this script's start. Results go to OUT as they come (at most 6 files); the last thing
# printed is the summary table. Exit status 1 when a check or a test failed, 2 when the install failed
# (one line says why; nothing else ran).
#   bash scripts/gpu_check.sh OUT
#   bash scripts/gpu_check.sh --dry-run OUT   # every stage on the CPU, tiny sizes, Triton's interpreter
# Options after OUT go to benchmarks/lease.py (--help). PYTHON picks the interpreter (default python3).
# FASTRES_INSTALL_PATH: what pip installs (default: this checkout); set, it is installed on a dry run too.
set -uo pipefail
export FASTRES_LEASE_START="$(date +%s.%N)"  # lease.py's total budget counts from here: the install is in it
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dry=()
if [ "${1:-}" = "--dry-run" ]; then
    dry=(--dry-run)
    shift
fi
out="${1:-$repo/gpu-results}"
[ $# -gt 0 ] && shift
cd "$repo"
export PYTHONUNBUFFERED=1
target="${FASTRES_INSTALL_PATH:-}"
if [ ${#dry[@]} -eq 0 ] || [ -n "$target" ]; then
    target="${target:-.}"
    pip_log="$(mktemp)"
    # The machine's own torch/triton stay: no dependencies, no build isolation, nothing downloaded.
    "$python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$target" >"$pip_log" 2>&1
    status=$?
    if [ $status -ne 0 ]; then
        tail -n 5 "$pip_log" >&2
        echo "gpu_check: FAILED before stage 1, nothing ran: pip install -e $target exited $status:" \
             "$(grep -v '^\s*$' "$pip_log" | tail -n 1 | cut -c 1-300)"
        rm -f "$pip_log"
        exit 2
    fi
    rm -f "$pip_log"
fi
# One line either way; exit status 2 when fastres's kernels do not import (or, on the GPU, CUDA is missing).
"$python" benchmarks/lease.py --check-install ${dry[@]+"${dry[@]}"} || exit 2
exec "$python" benchmarks/lease.py ${dry[@]+"${dry[@]}"} "$out" "$@"
