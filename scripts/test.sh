#!/usr/bin/env bash
# The project's test command (README, .ci/run): install from scratch into .venv (CPU build), check that
# the CUDA sources compile when nvcc is present, lint, run the default (non-slow) test suite, then the
# kernel tests again against an ASan + UBSan build of _C (scripts/sanitize.sh; a few minutes on 2 cores;
# it skips itself with a message where the compiler has no sanitizers; R4T_SKIP_SANITIZE=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
R4T_CUDA=OFF bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1; then
  PYTHON=.venv/bin/python bash scripts/check_cuda_build.sh
else
  echo "nvcc not found: skipping the CUDA compile check"
fi
.venv/bin/ruff check python tests benchmarks
# As root, setup.sh installed Debian's chromium: the page's browser test must run, not skip.
if [ "$(id -u)" = "0" ]; then export R4T_REQUIRE_BROWSER=1; fi
.venv/bin/python -m pytest -m "not slow" "$@"
if [ "${R4T_SKIP_SANITIZE:-0}" = "1" ]; then
  echo "sanitize: skipped (R4T_SKIP_SANITIZE=1)"
else
  timeout 1500 bash scripts/sanitize.sh
fi
