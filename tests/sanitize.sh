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
  if [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
CXX=${CXX:-g++}
LIBASAN=$($CXX -print-file-name=libasan.so)
# libstdc++ is preloaded too: the interpreter does not link it, and ASan's C++ exception
# interceptor (__cxa_throw) must find it when libasan starts, or every throw aborts
LIBSTDCXX=$($CXX -print-file-name=libstdc++.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize: $CXX has no libasan.so; install the compiler's sanitizer runtime" >&2
  exit 2
fi
if [ -n "${REUSE:-}" ]; then  # REUSE=<dir kept by KEEP=1>: run the tests on that build
  TMP=$REUSE
  rm -f "$TMP"/asan.*
else
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bitpress-sanitize.XXXXXX")
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$TMP"' EXIT; fi
echo "sanitize: building into $TMP" >&2

# a copy of the package without any prebuilt extension; the sanitized _C goes into it
mkdir -p "$TMP/pkg"
cp -r bitpress "$TMP/pkg/"
rm -f "$TMP"/pkg/bitpress/_C*.so
find "$TMP/pkg" -name '__pycache__' -type d -prune -exec rm -rf {} +
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
# -O1: the usual level for ASan (readable reports, fast to build); OPT=-O3 builds like setup.py
OPT=${OPT:--O1}
# the extension's sources and defines, as setup.py builds them (read from it, so they stay in sync)
SOURCES=$("$PY" -c "import re; print(' '.join(re.findall(r'\"(csrc/[^\"]+\\.cpp)\"', open('setup.py').read())))")
INC="-I$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])') -I$("$PY" -c 'import pybind11; print(pybind11.get_include())')"
if SIMDE=$("$PY" -c 'import simde_py; print(simde_py.get_include())' 2>/dev/null); then
  INC="$INC -I$SIMDE -DBITPRESS_HAVE_SIMDE=1"
fi
EXT=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
t0=$(date +%s)
mkdir -p "$TMP/obj"
: > "$TMP/build.log"
pids=()
for src in $SOURCES; do
  obj="$TMP/obj/$(basename "$src" .cpp).o"
  $CXX -c -std=c++17 -fPIC -fvisibility=hidden -fopenmp -ffp-contract=off $OPT $SAN $INC \
       "$src" -o "$obj" >>"$TMP/build.log" 2>&1 &
  pids+=($!)
done
ok=1
for p in "${pids[@]}"; do wait "$p" || ok=0; done
if [ "$ok" = 1 ]; then
  $CXX -shared -fopenmp $SAN "$TMP"/obj/*.o -o "$TMP/pkg/bitpress/_C$EXT" >>"$TMP/build.log" 2>&1 || ok=0
fi
if [ "$ok" != 1 ] || [ -z "$SOURCES" ]; then
  tail -30 "$TMP/build.log" >&2
  echo "sanitize: build failed" >&2
  exit 2
fi
echo "sanitize: built in $(( $(date +%s) - t0 )) s" >&2
fi

# detect_leaks=0: CPython and torch keep allocations until exit by design.
# alloc_dealloc_mismatch=0: torch's own (uninstrumented) libraries mix allocators.
# Reports go to $TMP/asan.<pid> as well (pytest's output capture would swallow them).
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=0:halt_on_error=1:exitcode=86:print_summary=1:log_path=$TMP/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:log_path=$TMP/asan"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LOG="$TMP/pytest.log"
t0=$(date +%s)
(cd "$TMP" && LD_PRELOAD="$LIBASAN $LIBSTDCXX" PYTHONPATH="$TMP/pkg" \
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys --rootdir="$ROOT" -c "$ROOT/pyproject.toml" \
  "$ROOT/tests/test_cpu_kernels.py" "$ROOT/tests/test_fuzz.py" "$@") 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "sanitize: tests ran in $(( $(date +%s) - t0 )) s, pytest exit $rc" >&2
# the package under test must be the sanitized copy
if ! (cd "$TMP" && LD_PRELOAD="$LIBASAN $LIBSTDCXX" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$TMP/pkg" "$PY" -c \
    "import bitpress._C as c, sys; sys.exit(0 if c.__file__.startswith('$TMP/pkg/') else 1)"); then
  echo "sanitize: the tests did not load the sanitized extension" >&2
  exit 2
fi
if ls "$TMP"/asan.* >/dev/null 2>&1; then
  cat "$TMP"/asan.* | tee -a "$LOG"
fi
if [ "$rc" -ne 0 ] || grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
  echo "sanitize: UNCLEAN (pytest exit $rc; see the report above)"
  exit 1
fi
echo "sanitize: clean"
