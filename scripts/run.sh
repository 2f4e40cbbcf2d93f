#!/usr/bin/env bash
# The main job from nothing: virtual environment, install, then the
# demonstration of what fastres has today: its fused optimizers trained side by
# side with torch.optim on the same model and data (examples/optim_demo.py).
# On a machine without a GPU the Triton kernels run under the interpreter.
# Extra arguments go to the example (try --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$repo"
exec "$venv/bin/python" examples/optim_demo.py "$@"
