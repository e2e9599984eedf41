#!/usr/bin/env bash
# Creates .venv and installs ctrserve with its training and test extras, pinned by
# requirements/constraints.txt (a CPU build of torch). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c requirements/constraints.txt -e ".[train,dev]"
