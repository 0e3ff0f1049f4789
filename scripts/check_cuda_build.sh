#!/usr/bin/env bash
# Compile-and-link check of the CUDA build (no GPU needed): configures the extension with R4T_CUDA=ON in a
# scratch build directory and builds it. Exits non-zero when configuring, compiling or linking fails.
#
#   scripts/check_cuda_build.sh                  # archs "80;90", interpreter $PYTHON or python3
#   PYTHON=.venv/bin/python R4T_CUDA_ARCHS="90" scripts/check_cuda_build.sh
#
# Environment: PYTHON (interpreter with pybind11 installed, default python3), R4T_CUDA_ARCHS (default
# "80;90"), BUILD_DIR (default build/cuda-check), JOBS (default 2), CUDACXX (nvcc to use, optional).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
ARCHS="${R4T_CUDA_ARCHS:-80;90}"
BUILD_DIR="${BUILD_DIR:-build/cuda-check}"
JOBS="${JOBS:-2}"
cd "$ROOT"

PY_EXE="$(command -v "$PYTHON" || true)"
if [[ -z "$PY_EXE" ]]; then
  echo "check_cuda_build: PYTHON='$PYTHON' is not an executable on PATH" >&2
  exit 2
fi
if ! PYBIND11_DIR="$("$PY_EXE" -m pybind11 --cmakedir 2>/dev/null)"; then
  echo "check_cuda_build: pybind11 is not installed for $PY_EXE (pip install pybind11)" >&2
  exit 2
fi
if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_build: nvcc not found (put it on PATH or set CUDACXX)" >&2
  exit 2
fi

echo "check_cuda_build: python=$PY_EXE archs=$ARCHS build_dir=$BUILD_DIR"
cmake -S . -B "$BUILD_DIR" \
  -DR4T_CUDA=ON \
  -DR4T_CUDA_ARCHS="$ARCHS" \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
  -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DPython_EXECUTABLE="$PY_EXE"
cmake --build "$BUILD_DIR" -j"$JOBS"

# The CUDA objects must be in the module: a configure that silently built CPU-only is a failure.
for src in knn sets sampler; do
  if ! find "$BUILD_DIR" -name "$src.cu.o" | grep -q .; then
    echo "check_cuda_build: csrc/cuda/$src.cu was not compiled" >&2
    exit 1
  fi
done
echo "check_cuda_build: OK: $(find "$BUILD_DIR" -maxdepth 1 -name '_C*.so' -printf '%f ')"
