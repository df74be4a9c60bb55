#!/usr/bin/env bash
# Set up cwa_dist on a fresh machine: a virtual environment in .venv with everything installed,
# and the real test model (SmolLM2-135M, GGUF) cached in ~/.cache/cwa_dist. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build where a CPU one is wanted.
.venv/bin/python -m pip install --quiet "torch==${CWA_TORCH_VERSION:-2.13.0}"
# DeepSpeed with its shared-memory communication op compiled now (about a minute), so no run pays
# for compiling it on first use with gloo.
if ! .venv/bin/python -c "import deepspeed.ops.comm.deepspeed_shm_comm_op" 2>/dev/null; then
  DS_BUILD_SHM_COMM=1 .venv/bin/python -m pip install --quiet --no-cache-dir --no-build-isolation "deepspeed==0.19.8"
fi
.venv/bin/python -m pip install --quiet -e ".[test,eval]"
# Debian's Chromium and its chromedriver, for the test that opens report.html in a real browser
# (installed where this runs as root with apt; elsewhere that test is skipped, unless
# CWA_DIST_REQUIRE_BROWSER=1, as in CI, makes it fail).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null \
    || echo "setup: could not install chromium (apt-get failed); the browser test will be skipped" >&2
fi
.venv/bin/python -m cwa_dist.smollm2 >/dev/null
