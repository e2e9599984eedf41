#!/usr/bin/env bash
# Creates .venv and installs ctrserve with its development extra (training, benchmarks, tests),
# pinned by requirements/constraints.txt (a CPU build of torch), plus the servers the tests start
# (redis-server, nginx, prometheus) and docker-compose (to validate the compose file, no engine
# needed) from Debian packages when they are missing. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in redis-server:redis-server nginx:nginx prometheus:prometheus \
        docker-compose:docker-compose; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        echo "installing ${missing[*]} (Debian packages)"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "warning: ${missing[*]} missing and no apt-get: the tests that start them fail" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# compat: a plain path entry for this folder, which type checkers and other static tools follow
# (the default editable mode installs an import hook they cannot run).
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c requirements/constraints.txt --config-settings editable_mode=compat -e ".[dev]"
