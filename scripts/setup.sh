#!/usr/bin/env bash
# Set up cwa_dist on a fresh machine: a virtual environment in .venv with everything installed,
# and the real test model (SmolLM2-135M, GGUF) cached in ~/.cache/cwa_dist. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build where a CPU one is wanted.
.venv/bin/python -m pip install --quiet "torch==${CWA_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m cwa_dist.smollm2 >/dev/null
