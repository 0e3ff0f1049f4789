#!/usr/bin/env bash
# Build r4t_fast._C with AddressSanitizer + UndefinedBehaviorSanitizer (CPU kernels, R4T_CUDA=OFF) in a
# scratch build directory and run the kernel tests (tests/test_ops*.py) against it. Any ASan or UBSan report
# aborts the test process, so the run fails. Skips (exit 0, with a message) when the compiler cannot build
# and run a sanitized program.
#
#   scripts/sanitize.sh                          # interpreter $PYTHON or .venv/bin/python
#   SANITIZE_TESTS="tests/test_ops.py" scripts/sanitize.sh -x -k knn   # extra args go to pytest
#
# Environment: PYTHON, SANITIZERS (default "address,undefined"), BUILD_DIR (default build/sanitize), JOBS
# (default 2), SANITIZE_TESTS (default tests/test_ops*.py), R4T_HYPOTHESIS_EXAMPLES (default 10: property
# tests run fewer examples; the sanitized build is several times slower).
#
# How the sanitized module is used without touching the installed one: python/r4t_fast is copied into a
# temporary site directory together with the sanitized _C, that directory goes first on PYTHONPATH, and a
# sitecustomize.py there removes scikit-build-core's editable-install finder (which would otherwise win
# over PYTHONPATH). The ASan runtime is LD_PRELOADed (Python itself is not instrumented); leak detection is
# off (the interpreter keeps its allocations until exit by design).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-.venv/bin/python}"
SANITIZERS="${SANITIZERS:-address,undefined}"
BUILD_DIR="${BUILD_DIR:-build/sanitize}"
JOBS="${JOBS:-2}"
CXX="${CXX:-c++}"
read -r -a TESTS <<<"${SANITIZE_TESTS:-$(ls tests/test_ops*.py | tr '\n' ' ')}"

PY_EXE="$(command -v "$PYTHON" || true)"
if [[ -z "$PY_EXE" ]]; then
  echo "sanitize: PYTHON='$PYTHON' is not an executable" >&2
  exit 2
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/r4t-sanitize.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# 1. Does this compiler build and run sanitized code at all?
printf 'int main() { return 0; }\n' >"$TMP/probe.cpp"
if ! "$CXX" -fsanitize="$SANITIZERS" "$TMP/probe.cpp" -o "$TMP/probe" >/dev/null 2>&1 || ! "$TMP/probe"; then
  echo "sanitize: SKIPPED: $CXX cannot build/run -fsanitize=$SANITIZERS programs (no ASan/UBSan runtime)"
  exit 0
fi
ASAN_LIB="$("$CXX" -print-file-name=libasan.so)"
if [[ "$SANITIZERS" == *address* && ! -e "$ASAN_LIB" ]]; then
  echo "sanitize: SKIPPED: $CXX has no shared ASan runtime (libasan.so) to preload into Python"
  exit 0
fi
if ! PYBIND11_DIR="$("$PY_EXE" -m pybind11 --cmakedir 2>/dev/null)"; then
  echo "sanitize: pybind11 is not installed for $PY_EXE (pip install pybind11)" >&2
  exit 2
fi

# 2. Build the sanitized module.
echo "sanitize: building _C with -fsanitize=$SANITIZERS in $BUILD_DIR"
t0=$SECONDS
cmake -S . -B "$BUILD_DIR" -DR4T_CUDA=OFF -DR4T_SANITIZE="$SANITIZERS" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$(command -v "$CXX")" -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$PY_EXE" \
  >"$TMP/configure.log" || { cat "$TMP/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j"$JOBS" >"$TMP/build.log" || { tail -50 "$TMP/build.log"; exit 1; }
SO="$(find "$BUILD_DIR" -maxdepth 1 -name '_C*.so' | head -1)"
[[ -n "$SO" ]] || { echo "sanitize: no _C*.so in $BUILD_DIR" >&2; exit 1; }
echo "sanitize: built $(basename "$SO") in $((SECONDS - t0)) s"

# 3. A private copy of the package with the sanitized module.
mkdir -p "$TMP/site"
cp -r python/r4t_fast "$TMP/site/"
find "$TMP/site/r4t_fast" -name '_C*.so' -delete
cp "$SO" "$TMP/site/r4t_fast/"
cat >"$TMP/site/sitecustomize.py" <<'EOF'
import sys

# Let PYTHONPATH's r4t_fast (with the sanitized _C) win over an editable install's import hook.
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_")]
EOF

# 4. Run the kernel tests against it.
export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
export R4T_SANITIZE=1 R4T_HYPOTHESIS_EXAMPLES="${R4T_HYPOTHESIS_EXAMPLES:-10}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:print_summary=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
PRELOAD=""
[[ "$SANITIZERS" == *address* ]] && PRELOAD="$ASAN_LIB"
where="$(LD_PRELOAD="$PRELOAD" "$PY_EXE" -c 'import r4t_fast.kernels._backend as b; print(b.lib().__file__)')"
if [[ "$where" != "$TMP/site/"* ]]; then
  echo "sanitize: r4t_fast._C resolved to $where, not the sanitized build" >&2
  exit 1
fi
echo "sanitize: running ${TESTS[*]} against $where"
LD_PRELOAD="$PRELOAD" "$PY_EXE" -m pytest "${TESTS[@]}" -q -p no:cacheprovider -m "not slow" "$@"
echo "sanitize: OK (no ASan/UBSan report) in $((SECONDS - t0)) s"
