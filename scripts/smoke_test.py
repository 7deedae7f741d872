"""Smoke test for an *installed* convfast (a wheel in a fresh virtual environment).

Run it from a directory outside the source tree, with the interpreter of the environment the wheel
was installed into:

    cd /tmp && /path/to/venv/bin/python /path/to/repo/scripts/smoke_test.py

It checks that convfast is imported from site-packages (not from a source checkout), prints the
version and build configuration, runs every operator family once on small inputs against the
pure-NumPy oracle in ``convfast.reference`` (with every micro-kernel variant this CPU supports and
with one and two OpenMP threads), and exits non-zero on any failure. NumPy is the only dependency.

On Linux it also reports which OpenMP runtime the process loaded; with ``--require-bundled-openmp``
it fails unless that runtime is the copy auditwheel bundled into the wheel (``convfast.libs/``).
"""
import os
import sys
import sysconfig
import traceback

FAILURES = []


def check(name, ok, detail=""):
    print(f"  [{'ok' if ok else 'FAIL'}] {name}{(': ' + detail) if detail else ''}")
    if not ok:
        FAILURES.append(name)


def compare(name, got, expected, rtol, atol):
    import numpy as np

    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        check(name, False, f"shape {got.shape} != reference {expected.shape}")
        return
    err = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    check(name, bool(np.allclose(got, expected, rtol=rtol, atol=atol)), f"shape {got.shape}, max abs err {err:.2e}")


def location_checks(convfast):
    import convfast._core as core

    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    pkg_file = os.path.realpath(convfast.__file__)
    purelib = os.path.realpath(sysconfig.get_paths()["purelib"])
    platlib = os.path.realpath(sysconfig.get_paths()["platlib"])
    print(f"convfast.__file__ : {pkg_file}")
    print(f"convfast._core    : {os.path.realpath(core.__file__)}")
    print(f"sys.prefix        : {sys.prefix}")
    in_site = any(pkg_file.startswith(p + os.sep) for p in {purelib, platlib})
    check("convfast imported from this environment's site-packages", in_site,
          f"expected under {purelib}")
    check("convfast not imported from the source tree", not pkg_file.startswith(os.path.realpath(repo) + os.sep),
          f"source tree is {repo}")
    check("compiled extension next to the package",
          os.path.dirname(os.path.realpath(core.__file__)) == os.path.dirname(pkg_file))


def operator_checks(convfast, ref, label):
    import numpy as np

    rng = np.random.default_rng(0)
    tol32 = dict(rtol=2e-4, atol=2e-5)
    tol64 = dict(rtol=1e-10, atol=1e-12)

    # conv1d: dilated, "same", bias, float64
    x = rng.standard_normal((2, 3, 17))
    w = rng.standard_normal((4, 3, 3))
    b = rng.standard_normal(4)
    kw = dict(padding="same", dilation=2)
    compare(f"{label} conv1d float64 same dilation=2", convfast.conv1d(x, w, b, **kw), ref.conv1d(x, w, b, **kw), **tol64)

    # conv2d: strided "same", reflect padding, groups, channels_last, float32
    x = rng.standard_normal((2, 4, 13, 11)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    kw = dict(stride=2, padding="same", groups=2)
    compare(f"{label} conv2d float32 stride=2 same groups=2", convfast.conv2d(x, w, b, **kw),
            ref.conv2d(x, w, b, **kw), **tol32)
    kw = dict(padding=((2, 1), (1, 2)), padding_mode="reflect")
    compare(f"{label} conv2d float32 asymmetric reflect", convfast.conv2d(x, w[:, :2].repeat(2, 1), **kw),
            ref.conv2d(x, w[:, :2].repeat(2, 1), **kw), **tol32)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w_full = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    kw = dict(padding=1, data_format="channels_last")
    compare(f"{label} conv2d float32 channels_last", convfast.conv2d(xl, w_full, **kw),
            ref.conv2d(xl, w_full, **kw), **tol32)

    # conv3d: stride 2, padding 1, float32
    x = rng.standard_normal((1, 2, 7, 8, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3, 3)).astype(np.float32)
    kw = dict(stride=2, padding=1)
    compare(f"{label} conv3d float32 stride=2", convfast.conv3d(x, w, **kw), ref.conv3d(x, w, **kw), **tol32)

    # conv_transpose2d: stride 2, padding 1, output_padding 1, bias, float32
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    kw = dict(stride=2, padding=1, output_padding=1)
    compare(f"{label} conv_transpose2d float32 k3s2p1op1", convfast.conv_transpose2d(x, w, b, **kw),
            ref.conv_transpose2d(x, w, b, **kw), **tol32)

    # pad: every compiled mode
    a = rng.standard_normal((3, 5, 4))
    for mode in ("constant", "reflect", "edge", "wrap", "symmetric"):
        width = ((1, 2), (2, 1), (0, 3))
        compare(f"{label} pad {mode}", convfast.pad(a, width, mode=mode), ref.pad(a, width, mode=mode), **tol64)

    # a layer object (weights packed once), called twice
    layer = convfast.Conv2d(3, 8, 3, stride=2, padding="same", padding_mode="replicate", seed=1)
    x = rng.standard_normal((2, 3, 16, 15)).astype(np.float32)
    expected = ref.conv2d(x, layer.weight, layer.bias, stride=2, padding="same", padding_mode="replicate")
    compare(f"{label} Conv2d layer (1st call)", layer(x), expected, **tol32)
    compare(f"{label} Conv2d layer (2nd call, cached plan)", layer(x), expected, **tol32)


def openmp_runtime_checks(require_bundled):
    """Which OpenMP runtime did the dynamic loader map? (Linux: /proc/self/maps; elsewhere: skipped.)"""
    maps = "/proc/self/maps"
    if not os.path.exists(maps):
        print("OpenMP runtime    : (not inspected: no /proc/self/maps on this platform)")
        check("bundled OpenMP runtime loaded", not require_bundled, "cannot inspect on this platform")
        return
    with open(maps) as f:
        paths = sorted({line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6})
    omp = [p for p in paths if any(k in os.path.basename(p) for k in ("gomp", "libomp", "iomp"))]
    print(f"OpenMP runtime    : {', '.join(omp) if omp else '(none mapped)'}")
    check("an OpenMP runtime is loaded", bool(omp))
    if require_bundled:
        import convfast
        libs = os.path.realpath(os.path.join(os.path.dirname(convfast.__file__), os.pardir, "convfast.libs"))
        check("OpenMP runtime is the copy bundled in the wheel", bool(omp) and all(
            os.path.realpath(p).startswith(libs + os.sep) for p in omp), f"expected under {libs}")


def main() -> int:
    require_bundled = "--require-bundled-openmp" in sys.argv[1:]
    print(f"python            : {sys.version.split()[0]} ({sys.executable})")
    print(f"cwd               : {os.getcwd()}")
    try:
        import numpy as np
        import convfast
        from convfast import reference as ref
    except Exception:
        traceback.print_exc()
        print("SMOKE TEST FAILED: cannot import convfast")
        return 1
    print(f"numpy             : {np.__version__}")
    print(f"convfast.__version__: {convfast.__version__}")
    print("convfast.show_config():")
    convfast.show_config()

    print("checks:")
    try:
        location_checks(convfast)
        check("__version__ comes from the installed metadata", convfast.__version__ not in ("", "0+unknown"),
              convfast.__version__)
        isas = convfast.supported_isas()
        for isa in isas:
            convfast.set_isa(isa)
            for threads in (1, 2):
                convfast.set_num_threads(threads)
                operator_checks(convfast, ref, f"[{isa}, {threads}t]")
        convfast.set_isa("auto")
        openmp_runtime_checks(require_bundled)
    except Exception:
        traceback.print_exc()
        FAILURES.append("exception")

    if FAILURES:
        print(f"SMOKE TEST FAILED: {len(FAILURES)} check(s): {', '.join(FAILURES)}")
        return 1
    print(f"SMOKE TEST PASSED (convfast {convfast.__version__}, ISAs tested: {', '.join(isas)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
