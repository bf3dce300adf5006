#!/usr/bin/env bash
# Create .venv and install nextchar with the trainer and test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (the CPU build) comes from the [train] extra's pin.
.venv/bin/python -m pip install -q -e ".[train,dev]"
