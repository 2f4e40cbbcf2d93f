# Sourced by the scripts: make (or reuse) the virtual environment and install
# fastres into it. torch is pinned and installed first: an unpinned torch pulls
# several GB of CUDA packages where a CPU build would do.
#   FASTRES_VENV  where the environment lives (default: .venv in the repo)
#   FASTRES_EXTRAS  pip extras to install, comma-separated (default: test; run.sh: examples)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTRES_VENV:-$repo/.venv}"
extras="${FASTRES_EXTRAS:-test}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "fastres needs Python 3.10 or newer; $python is $("$python" --version 2>&1)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
echo "==> installing torch==2.13.0, then fastres[$extras] into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$repo[$extras]"
