"""Threads, ISA selection and build/runtime information."""
from __future__ import annotations

import os
import warnings

import numpy as np

from ._spec import as_int

# OpenMP's wait policy for the runtime convfast loads. A thread that reaches the end of a parallel
# region spins GOMP_SPINCOUNT times before it sleeps; libgomp's default (300000, about a
# millisecond) keeps it spinning on a core that its descheduled partner needs, whenever another
# process competes for the cores. 1000 is what libgomp itself uses when it knows the cores are
# oversubscribed. Measured (1x64x56x56 3x3, 2 threads, 2 shared cores, p50/p90 ms): default
# 24.0/32.0 with the machine's background load and 48.0/60.0 with one more busy process; 1000:
# 4.0/6.4 and 5.7/14.1 (PyTorch 2.13 in the same run: 1.7/20.9 and 21.5/87.6). libgomp reads its
# environment once, when it loads, so this is set only while _core (and with it libgomp) loads,
# only if the user set neither variable, and has no effect when libgomp was loaded before.
_OPENMP_WAIT_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}


def _load_core():
    added = []
    if not any(k in os.environ for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
        for key, value in _OPENMP_WAIT_DEFAULTS.items():
            os.environ[key] = value
            added.append(key)
    try:
        from . import _core as core
    finally:
        for key in added:  # other runtimes loaded later (PyTorch's own libgomp) keep their defaults
            os.environ.pop(key, None)
    return core


_core = _load_core()


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("convfast")
    except Exception:  # running from a source tree without metadata
        return "0+unknown"


def set_num_threads(n: int) -> None:
    """Number of threads the kernels use (default: OMP_NUM_THREADS, else all cores)."""
    _core.set_num_threads(as_int("set_num_threads", "n", n, minimum=1))


def get_num_threads() -> int:
    return _core.get_num_threads()


_BENCHMARK = False


def set_benchmark(enabled: bool) -> None:
    """Measured algorithm choice for the layer objects (``convfast.Conv2d`` & co.), as cuDNN's
    benchmark mode: when on, a layer's first call with a new input signature (shape, strides,
    dtype) times every algorithm that can run it and keeps the fastest for that signature, so later
    calls get the same algorithm and the same bits. Off by default: the engine's rule-based choice.
    Which algorithm wins can differ between machines and runs, and algorithms differ in the last
    bits (Winograd), so results with it on are reproducible per layer object, not across processes.
    """
    if type(enabled) is not bool:
        raise TypeError(f"set_benchmark: enabled must be True or False, got {enabled!r}")
    global _BENCHMARK
    _BENCHMARK = enabled


def get_benchmark() -> bool:
    return _BENCHMARK


def supported_isas() -> tuple:
    """Micro-kernel variants this CPU can run, best first."""
    return tuple(_core.supported_isas().split(","))


def set_isa(name: str = "auto") -> str:
    """Select the micro-kernel variant ("auto", "baseline", "avx2", "avx512"); returns the active one."""
    if not isinstance(name, str):
        raise TypeError(f"set_isa: name must be a string, got {name!r}")
    if not _core.select_isa(name.lower()):
        raise ValueError(f"set_isa: ISA {name!r} is not available on this CPU (supported: {supported_isas()})")
    return _core.active_isa()


def get_isa() -> str:
    return _core.active_isa()


def _select_isa_from_environment() -> None:
    requested = os.environ.get("CONVFAST_ISA", "").strip().lower()
    if requested and requested != "auto" and not _core.select_isa(requested):
        warnings.warn(f"CONVFAST_ISA={requested!r} cannot run on this CPU (supported: {supported_isas()}); "
                      f"using {_core.active_isa()!r}", RuntimeWarning, stacklevel=3)


def config() -> dict:
    (f32_mr, f32_nr), (f64_mr, f64_nr) = _core.ukernel_tiles()
    try:
        import numba.cuda  # noqa: F401
        cuda = "numba importable"
    except Exception:
        cuda = "not installed (pip install 'convfast[cuda]')"
    return {
        "version": _version(),
        "isa": _core.active_isa(),
        "supported_isas": supported_isas(),
        "ukernel_tiles": {"float32": f"{f32_mr}x{f32_nr}", "float64": f"{f64_mr}x{f64_nr}"},
        "threads": get_num_threads(),
        "openmp": _core.openmp_version,
        "numpy": np.__version__,
        "cuda": cuda,
        "algorithm": ("per layer: Winograd F(2,3) or F(4,3) (float64) for stride-1 3x3 / 3x3x3 layers with >= 16 "
                      "channels per group (>= 48 in and out together), depthwise layers with the channels in the "
                      "vector lanes, else gather (implicit) GEMM or direct rows over strided views; transposed "
                      "convolution by stride-phase split, or for small inputs one GEMM scattered into the output "
                      "(CONVFAST_ALGO=winograd|gemm|gemv|direct|planes|lanes|scatter forces one)"),
    }


def show_config() -> dict:
    """Print (and return) the version, ISA, tiles, threads and OpenMP version in use."""
    cfg = config()
    for key, value in cfg.items():
        print(f"{key:>15}: {value}")
    return cfg
