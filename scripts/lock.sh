#!/usr/bin/env bash
# Regenerates requirements/constraints.txt with pip-tools: every package that any install of
# ctrserve (the base and each extra: train, bench, gpu, dev) brings in, pinned, each with the
# requirement that pulls it in (ctrserve itself, which the dev extra names, is left out). torch is
# held at the CPU build this project is tested with.
# Run after changing a dependency in pyproject.toml; scripts/setup.sh and the Dockerfile install
# under these pins.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip-compile --quiet --all-extras --strip-extras --unsafe-package ctrserve \
    --no-emit-index-url --no-emit-find-links \
    --constraint requirements/torch-cpu.txt \
    --output-file requirements/constraints.txt pyproject.toml
