#!/usr/bin/env bash
# On a machine with a CUDA GPU and no network (see ../shared/GPU.md): install
# fastres into the machine's python without downloading anything, run the
# whole test suite compiled, the ahead-of-time compile report, and the
# benchmarks; write raw logs and JSON to OUT (default ./gpu-results).
#   bash scripts/gpu_check.sh OUT
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/gpu-results}"
python="${PYTHON:-python3}"
mkdir -p "$out"
cd "$repo"
export PYTHONUNBUFFERED=1
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"

{
    echo "date_utc: $stamp"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("device", torch.cuda.get_device_name())'
    git rev-parse HEAD 2>/dev/null || true
} | tee "$out/environment.txt"

"$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3

status=0
echo "==> tests (compiled kernels on the GPU)"
"$python" -m pytest tests -q -ra --durations=20 --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "==> ahead-of-time compile report"
env -u TRITON_INTERPRET "$python" tests/aot_compile.py --json "$out/aot.json" 2>&1 | tee "$out/aot.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "==> benchmarks"
"$python" -m pytest benchmarks --benchmark-only -q --benchmark-json="$out/benchmarks.json" 2>&1 | tee "$out/benchmarks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "results in $out (status $status)"
exit "$status"
