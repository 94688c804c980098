#!/usr/bin/env bash
# Fresh clone to a test run: set up with the dev extras, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest -q "$@"
