#!/usr/bin/env bash
# Fresh clone to a running stack: set up, then start all five services (Ctrl-C stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/apex-serve up "$@"
