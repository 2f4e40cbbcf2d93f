#!/usr/bin/env bash
# The GPU lease runner (README, "The GPU lease runner"): on a bare, offline machine with a CUDA GPU
# (../shared/GPU.md), install fastres without network, then run benchmarks/lease.py: environment and
# ceilings, a parallel compile warm-up, compiled correctness at full size, the headline ratios and the
# test suite, each stage under its own time budget, ~8 minutes in all. Results go to OUT as they come
# (at most 6 files); the last thing printed is the summary table. Exit status 1 when a check failed.
#   bash scripts/gpu_check.sh OUT
#   bash scripts/gpu_check.sh --dry-run OUT   # every stage on the CPU, tiny sizes, Triton's interpreter
# Options after OUT go to benchmarks/lease.py (--help). PYTHON picks the interpreter (default python3).
set -uo pipefail
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
if [ ${#dry[@]} -eq 0 ]; then
    # The machine's own torch/triton stay: no dependencies, no build isolation, nothing downloaded.
    "$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3
fi
exec "$python" benchmarks/lease.py ${dry[@]+"${dry[@]}"} "$out" "$@"
