#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ CPU kernels.
#
# Builds csrc/ into bitpress._C with -fsanitize=address,undefined in a temporary directory
# (a copy of the Python package; the checkout's own bitpress/_C*.so is not touched), then
# runs tests/test_cpu_kernels.py and tests/test_fuzz.py against that build with libasan
# preloaded (the Python interpreter itself is not instrumented). Any ASan report or UBSan
# "runtime error" fails the run. Prints "sanitize: clean" (exit 0) or "sanitize: UNCLEAN"
# (exit 1); build problems exit 2.
#
#   tests/sanitize.sh                       # python: .venv/bin/python, else python3
#   PYTHON=/path/to/python tests/sanitize.sh -k dense   # extra args go to pytest
#   KEEP=1 tests/sanitize.sh                # keep the temporary directory (printed)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
CXX=${CXX:-g++}
LIBASAN=$($CXX -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize: $CXX has no libasan.so; install the compiler's sanitizer runtime" >&2
  exit 2
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bitpress-sanitize.XXXXXX")
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$TMP"' EXIT; fi
echo "sanitize: building into $TMP" >&2

# a copy of the package without any prebuilt extension; the sanitized _C goes into it
mkdir -p "$TMP/pkg"
cp -r bitpress "$TMP/pkg/"
rm -f "$TMP"/pkg/bitpress/_C*.so
find "$TMP/pkg" -name '__pycache__' -type d -prune -exec rm -rf {} +
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
t0=$(date +%s)
if ! CC=${CC:-gcc} CXX=$CXX CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="-fsanitize=address,undefined" \
     BITPRESS_REQUIRE_EXT=1 "$PY" setup.py -q build_ext --parallel "${JOBS:-2}" --build-lib "$TMP/lib" \
     --build-temp "$TMP/build" >"$TMP/build.log" 2>&1; then
  tail -30 "$TMP/build.log" >&2
  echo "sanitize: build failed" >&2
  exit 2
fi
cp "$TMP"/lib/bitpress/_C*.so "$TMP/pkg/bitpress/"
echo "sanitize: built in $(( $(date +%s) - t0 )) s" >&2

# detect_leaks=0: CPython and torch keep allocations until exit by design.
# alloc_dealloc_mismatch=0: torch's own (uninstrumented) libraries mix allocators.
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=0:halt_on_error=1:exitcode=86:print_summary=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export BITPRESS_FUZZ_EXAMPLES=${BITPRESS_FUZZ_EXAMPLES:-}
LOG="$TMP/pytest.log"
t0=$(date +%s)
(cd "$TMP" && LD_PRELOAD="$LIBASAN" PYTHONPATH="$TMP/pkg" \
  "$PY" -m pytest -q -p no:cacheprovider --rootdir="$ROOT" -c "$ROOT/pyproject.toml" \
  "$ROOT/tests/test_cpu_kernels.py" "$ROOT/tests/test_fuzz.py" "$@") 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "sanitize: tests ran in $(( $(date +%s) - t0 )) s, pytest exit $rc" >&2
# the package under test must be the sanitized copy
if ! LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$TMP/pkg" "$PY" -c \
    "import bitpress._C as c, sys; sys.exit(0 if c.__file__.startswith('$TMP') else 1)"; then
  echo "sanitize: the tests did not load the sanitized extension" >&2
  exit 2
fi
if [ "$rc" -ne 0 ] || grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
  echo "sanitize: UNCLEAN (pytest exit $rc; see the report above)"
  exit 1
fi
echo "sanitize: clean"
