#!/usr/bin/env bash
# Sets up a fresh clone: .venv, torch==2.13.0 (CPU wheel, pinned exactly), the project (protobuf
# code generated and the C++ kernel compiled at install), and the default model.
# Usage: scripts/setup.sh [--dev]   (--dev adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and exactly pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extras}"
[ -f models/apex-tiny-llama/config.json ] || .venv/bin/apex-serve make-model --preset default
