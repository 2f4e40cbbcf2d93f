#!/usr/bin/env bash
# The whole test suite from nothing: virtual environment, install, pytest.
# Without a GPU the Triton kernels run under the interpreter on CPU tensors
# (tests/conftest.py), and tests/test_aot_compile.py compiles every kernel for
# sm_80 and sm_90 ahead of time. Extra arguments go to pytest. The tests run on
# one pytest-xdist worker per core (interpreted kernels are single-threaded);
# FASTRES_TEST_WORKERS sets the number (0: in this process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$repo"
echo "==> pytest tests"
set +e
"$venv/bin/pytest" tests -n "${FASTRES_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$status"
