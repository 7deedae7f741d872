"""What the CUDA-simulator test modules (test_cuda_sim.py, test_cuda_backward.py) share: the
environment of their subprocesses and the re-run of a module under the simulator. (The kernels'
compilation for real GPUs is checked by tests/test_cuda_sass_check.py.)"""
import os
import subprocess
import sys

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
