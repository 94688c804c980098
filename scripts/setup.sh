#!/usr/bin/env bash
# Sets up a fresh clone: .venv, torch==2.13.0 (CPU wheel, pinned exactly), the project (protobuf
# code generated and the C++ kernel compiled at install), and the default model.
# Usage: scripts/setup.sh [--dev]   (--dev adds the test dependencies, and Chromium for the dashboard's
# browser test when it is missing and this runs as root with apt-get)
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

# tests/e2e/test_dashboard_browser.py renders /dashboard in a headless Chromium; it skips where none can be had.
if [ -n "$extras" ] && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "setup.sh: could not install chromium; the dashboard's browser test will skip" >&2
fi
