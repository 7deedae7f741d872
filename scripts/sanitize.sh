#!/usr/bin/env bash
# Build convfast with a sanitizer into its own virtual environment and run the test suite under it.
#
#   bash scripts/sanitize.sh                 # address, then undefined
#   bash scripts/sanitize.sh address         # one of: address, undefined, all (default)
#   bash scripts/sanitize.sh address -k pad  # anything after the sanitizer name goes to pytest
#
# Per sanitizer SAN (asan = address, ubsan = undefined):
# 1. A virtual environment build/SAN-venv/ (created once, reused; delete it to start over) with the
#    build tools and the test dependencies from the package index: scikit-build-core, pybind11,
#    cmake, ninja, numpy, pytest, hypothesis, and the test extras torch==2.13.0 and matplotlib (so the
#    torch-parity, interop and examples tests run too: torch loads and runs fine under the preloaded
#    ASan runtime). The system Python is never touched.
# 2. `pip install --no-build-isolation --no-deps .` into that venv with
#    -Ccmake.define.CONVFAST_SANITIZE=SAN, its own CMake build directory build/SAN/ and
#    RelWithDebInfo (-g for symbolised reports; the kernels keep their -O3). The script then checks
#    that the installed extension really carries the sanitizer runtime.
# 3. python -m pytest -q tests with that venv's interpreter, from the repository root (the sources
#    live in python/convfast/, so `import convfast` is the venv's sanitized build; the script
#    prints which file was imported).
#    - address: the interpreter is not instrumented, so libasan must be loaded first:
#      LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" (libstdc++
#      as well, or C++ exceptions abort under ASan); ASAN_OPTIONS=detect_leaks=0 (CPython leaks by
#      design at exit) :abort_on_error=1 (any report kills the run) :allocator_may_return_null=1 (a
#      failed malloc is a MemoryError, as without ASan).
#    - undefined: libubsan comes in as a dependency of the extension; UBSAN_OPTIONS=halt_on_error=1
#      :print_stacktrace=1 makes the first report fatal (the build uses GCC's recoverable default,
#      halt_on_error gives -fno-sanitize-recover behaviour at run time).
#    pytest runs with --capture=sys: its default fd capture would swallow a sanitizer report written
#    to file descriptor 2 by a process that then exits at once (halt_on_error), leaving only "rc=1".
#    The log (build/SAN-pytest.log) is also searched for sanitizer reports ("ERROR: AddressSanitizer",
#    "runtime error:"), so a report in a subprocess or a swallowed one still fails the script.
#    Deselected under ASan only, because the sanitizer, not the code, breaks their premise:
#    - test_threads.py::test_repeated_calls_do_not_leak: ASan's quarantine keeps freed memory
#      resident, so resident memory grows by design;
#    - test_errors.py::test_huge_sizes_raise_cleanly / test_huge_parameters_with_tiny_result: their
#      worker sets a 1 GiB RLIMIT_AS, under which ASan (terabytes of shadow mappings) aborts before
#      convfast runs. scripts/sanitize_huge_cases.py runs the same cases instead, one fresh
#      interpreter each under ASan, with the 1 GiB cap emulated by ASan's max_allocation_size_mb.
#    SANITIZE_KEEP_ALL=1 runs them anyway. Under UBSan everything runs.
# Exits non-zero on a build failure, a test failure or any sanitizer report. Times are printed at the
# end (on 2 busy cores: ASan ~1-2 min build + ~3-4 min tests; UBSan similar).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
which_san="${1:-all}"
shift || true
PYTEST_EXTRA=("$@")

# Tests whose premise the sanitizer breaks (see above); ASan only.
ASAN_DESELECT=(
  --deselect tests/test_threads.py::test_repeated_calls_do_not_leak
  --deselect tests/test_errors.py::test_huge_sizes_raise_cleanly
  --deselect tests/test_errors.py::test_huge_parameters_with_tiny_result
)
[[ "${SANITIZE_KEEP_ALL:-0}" == 1 ]] && ASAN_DESELECT=()

step() { printf '\n==== %s\n' "$*"; }
die() { printf '\nsanitize.sh: FAILED: %s\n' "$*" >&2; exit 1; }

case "$which_san" in
  address) sans=(address) ;;
  undefined) sans=(undefined) ;;
  all) sans=(address undefined) ;;
  *) die "unknown sanitizer '$which_san' (address, undefined or all)" ;;
esac

short() { [[ "$1" == address ]] && echo asan || echo ubsan; }
summary=()
failed=()

for san in "${sans[@]}"; do
  s="$(short "$san")"
  venv="$REPO/build/$s-venv"
  bdir="build/$s"
  log="$REPO/build/$s-pytest.log"
  t0=$SECONDS

  step "[$s] venv $venv"
  if ! "$venv/bin/python" -c "import scikit_build_core, pybind11, cmake, ninja, numpy, pytest, hypothesis" 2>/dev/null; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet scikit-build-core pybind11 cmake ninja numpy pytest hypothesis
  fi
  if ! "$venv/bin/python" -c "import torch, matplotlib" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0" matplotlib
  fi
  "$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(scikit.build.core|pybind11|cmake|ninja|numpy|pytest|hypothesis|torch|matplotlib) '

  step "[$s] build with CONVFAST_SANITIZE=$san into $bdir"
  tb=$SECONDS
  "$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps --force-reinstall \
      -Ccmake.define.CONVFAST_SANITIZE="$san" -Ccmake.build-type=RelWithDebInfo -Cbuild-dir="$bdir" .
  build_s=$((SECONDS - tb))
  core="$(ls "$venv"/lib/python*/site-packages/convfast/_core*.so)"
  # (grep without -q: with pipefail, grep -q quitting early can SIGPIPE ldd and fail the check)
  if [[ "$san" == address ]]; then
    ldd "$core" | grep libasan >/dev/null || die "$core is not linked against libasan"
    runtime="$(gcc -print-file-name=libasan.so)"
    [[ -f "$runtime" ]] || die "gcc has no libasan.so"
    # allocator_may_return_null: a failed malloc is NumPy's MemoryError, as without ASan.
    # libstdc++ is preloaded too: the interpreter does not link it, so without it ASan resolves its
    # __cxa_throw interceptor to nothing at start-up and the first C++ exception (any std::bad_alloc or
    # invalid_argument from the engine) aborts with "CHECK failed: ... real___cxa_throw".
    stdcxx="$(gcc -print-file-name=libstdc++.so)"
    run_env=(env LD_PRELOAD="$runtime $stdcxx" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1")
    deselect=("${ASAN_DESELECT[@]}")
  else
    ldd "$core" | grep libubsan >/dev/null || die "$core is not linked against libubsan"
    run_env=(env UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    deselect=()
  fi
  echo "extension: $core"
  ldd "$core" | grep -E 'lib(a|ub)san' | sed 's/^\s*/  /'

  step "[$s] pytest under $san (log: $log)"
  tt=$SECONDS
  set +e
  "${run_env[@]}" "$venv/bin/python" - <<'EOF' 2>&1 | tee "$log"
import convfast, convfast._core as c
print("testing", c.__file__, "isa", c.active_isa(), "threads", c.get_num_threads())
EOF
  "${run_env[@]}" "$venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys tests "${deselect[@]}" "${PYTEST_EXTRA[@]}" \
      2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  huge_rc=0
  if [[ "$san" == address && ${#deselect[@]} -gt 0 ]]; then
    step "[$s] huge-size cases of tests/test_errors.py under ASan (scripts/sanitize_huge_cases.py)"
    "${run_env[@]}" "$venv/bin/python" scripts/sanitize_huge_cases.py 2>&1 | tee -a "$log"
    huge_rc=${PIPESTATUS[0]}
  fi
  set -e
  test_s=$((SECONDS - tt))
  reports=$(grep -cE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$log" || true)
  result="pytest rc=$rc, huge cases rc=$huge_rc, sanitizer reports: $reports, build ${build_s}s, tests ${test_s}s, total $((SECONDS - t0))s"
  summary+=("$s: $result")
  step "[$s] $result"
  (( rc == 0 && huge_rc == 0 && reports == 0 )) || failed+=("$s")
done

step "summary"
printf '%s\n' "${summary[@]}"
(( ${#failed[@]} == 0 )) || die "not clean: ${failed[*]} (see build/<san>-pytest.log)"
echo "clean"
