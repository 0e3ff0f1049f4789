#!/usr/bin/env bash
# The project's test command (README, .ci/run): install from scratch into .venv (CPU build), check that
# the CUDA sources compile when nvcc is present, lint, then run the default (non-slow) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
R4T_CUDA=OFF bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1; then
  PYTHON=.venv/bin/python bash scripts/check_cuda_build.sh
else
  echo "nvcc not found: skipping the CUDA compile check"
fi
.venv/bin/ruff check python tests benchmarks
.venv/bin/python -m pytest -m "not slow" "$@"
