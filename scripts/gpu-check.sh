#!/usr/bin/env bash
# Checks the CUDA paths in one call: every test marked `gpu`, then a CUDA benchmark of about three minutes of the
# three execution modes, both overlap layouts and decode graphs (apex-serve bench-hybrid --device cuda). Everything
# it writes goes under one directory, printed first: gpu-tests.log and gpu-tests.xml (junit), hybrid.log and
# hybrid.json.
# Without a CUDA device it says so, runs the gpu tests (they skip), and exits 0: its dry run on any machine.
# Usage: scripts/gpu-check.sh [OUT_DIR [TEST_PATH...]]
#   OUT_DIR defaults to bench_results/gpu-check/<UTC time>, TEST_PATH to tests; needs scripts/setup.sh --dev.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "gpu-check: no .venv here; run scripts/setup.sh --dev first" >&2
    exit 1
fi
out=${1:-bench_results/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)}
shift || true
test_paths=("$@")
[ ${#test_paths[@]} -gt 0 ] || test_paths=(tests)
mkdir -p "$out"
echo "gpu-check: results in $out"

probe="import torch; print(torch.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
{ read -r torch_version; read -r cuda || true; } < <("$PY" -c "$probe")
if [ -z "$cuda" ]; then
    echo "gpu-check: torch $torch_version sees no CUDA device: the gpu tests will skip and the CUDA benchmark" \
         "will not run"
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu-check: nvidia-smi lists a GPU, so this torch is a CPU build: install the CUDA build of torch" \
             "${torch_version%+*} for this machine's driver into .venv" >&2
    fi
else
    echo "gpu-check: CUDA device: $cuda"
fi

echo "gpu-check: pytest -m gpu"
"$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml "$out/gpu-tests.xml" "${test_paths[@]}" 2>&1 | tee "$out/gpu-tests.log"

if [ -z "$cuda" ]; then
    echo "gpu-check: dry run done (no CUDA device); results in $out"
    exit 0
fi

echo "gpu-check: bench-hybrid --device cuda"
"$PY" -m apex_tools bench-hybrid -- --device cuda --out "$out/hybrid.json" 2>&1 | tee "$out/hybrid.log"
echo "gpu-check: done; results in $out"
