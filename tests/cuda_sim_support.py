"""What the CUDA-simulator test modules (test_cuda_sim.py, test_cuda_backward.py) share: the
environment of their subprocesses, the re-run of a module under the simulator, and the PTX
compilation check (Numba's real NVVM pipeline, without a GPU or driver)."""
import os
import subprocess
import sys
import textwrap

import pytest


def import_numba_cuda():
    """(numba.cuda, simulated, runs_here) for a test module, called before anything imports numba.

    NUMBA_ENABLE_CUDASIM is read when numba is first imported: unless the environment sets it
    (NUMBA_ENABLE_CUDASIM=0 runs the tests on a real GPU), the simulator is switched on here. The
    calling module is skipped without numba or numba-cuda. runs_here is False when numba was
    already imported without the simulator and there is no GPU: the module then re-runs itself in
    a subprocess (run_module_under_simulator)."""
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    pytest.importorskip("numba")
    try:
        from numba import cuda
    except ImportError as exc:  # numba without numba-cuda
        pytest.skip(f"numba.cuda unavailable: {exc}", allow_module_level=True)
    simulated = "simulator" in getattr(cuda.device_array, "__module__", "")
    return cuda, simulated, simulated or cuda.is_available()


@pytest.fixture(autouse=True)
def small_grids(monkeypatch):
    """Every grid axis capped to one block (the simulator runs one Python thread per CUDA thread;
    the cap also exercises the kernels' grid-stride loops); the automatic kernel choice."""
    monkeypatch.setenv("CONVFAST_CUDA_GRID_CAP", "1")
    monkeypatch.delenv("CONVFAST_CUDA_KERNEL", raising=False)


def subprocess_env(**extra):
    """os.environ without the simulator / kernel-choice / grid-cap settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "CONVFAST_CUDA_KERNEL",
                                                             "CONVFAST_CUDA_GRID_CAP")}
    env.update(extra)
    return env


def run_module_under_simulator(path: str) -> None:
    """Run the test module ``path`` in a subprocess with NUMBA_ENABLE_CUDASIM=1 (for when numba was
    imported in this process without it and there is no GPU)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                           os.path.abspath(path)], cwd=os.path.dirname(os.path.abspath(path)), capture_output=True,
                          text=True, env=subprocess_env(NUMBA_ENABLE_CUDASIM="1"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# The preamble of a PTX check: no driver, so the device functions' target, the NVRTC architecture
# list and libdevice are given here. The body defines ``jobs`` = [(kernel, signature), ...].
_PTX_PREAMBLE = textwrap.dedent("""
    import glob, sys
    from numba import cuda, types as T
    import numba.cuda.dispatcher as dispatcher
    import numba.cuda.cudadrv.nvrtc as nvrtc
    import numba.cuda.cudadrv.libs as libs
    import numba.cuda.cudadrv.nvvm as nvvm
    found = sorted(glob.glob("/usr/local/cuda*/nvvm/libdevice/libdevice.10.bc"))
    if not found:
        print("SKIP: no libdevice"); sys.exit(0)

    class Device:
        compute_capability = (8, 0)

    dispatcher.get_current_device = lambda: Device()
    nvrtc.get_supported_ccs = lambda: ((7, 5), (8, 0), (8, 6), (9, 0))
    libs.get_libdevice = nvvm.get_libdevice = lambda: found[-1]
    A = lambda dt, nd, layout="A": T.Array(dt, nd, layout)
    i64, f32, f64 = T.int64, T.float32, T.float64
""")

_PTX_COMPILE = textwrap.dedent("""
    for kernel, sig in jobs:
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0))
        except Exception as exc:
            # no toolkit, or a numba-cuda whose internals moved: nothing to check here
            if any(word in type(exc).__name__ for word in ("NVVM", "Library", "CudaSupport", "LibNotFound")):
                print("SKIP:", type(exc).__name__, exc); sys.exit(0)
            raise
        assert ".entry" in ptx
    print("compiled", len(jobs))
""")


def check_ptx(jobs_source: str, count: int) -> None:
    """Compile the kernels that ``jobs_source`` lists (as ``jobs``) to PTX in a subprocess; skip
    where no CUDA toolkit (libNVVM, libdevice) is installed."""
    script = _PTX_PREAMBLE + textwrap.dedent(jobs_source) + _PTX_COMPILE
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)
    if proc.stdout.startswith("SKIP") or proc.returncode != 0 and "DynamicLibNotFoundError" in proc.stderr:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and f"compiled {count}" in proc.stdout, proc.stdout + proc.stderr[-4000:]
