#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on a machine with CUDA, within 10 minutes; its JSON goes to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
