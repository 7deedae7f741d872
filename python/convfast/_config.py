"""Threads, ISA selection and build/runtime information."""
from __future__ import annotations

import os
import warnings

import numpy as np

from . import _core
from ._spec import as_int


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
        "algorithm": ("per layer: Winograd F(2,3) or F(4,3) (float64) for stride-1 3x3 / 3x3x3 layers with >= 64 (3-D: 32) channels per "
                      "group, depthwise layers with the channels in the vector lanes, else gather (implicit) GEMM "
                      "or direct rows over strided views; transposed convolution by stride-phase split "
                      "(CONVFAST_ALGO=winograd|gemm|direct|lanes forces one)"),
    }


def show_config() -> dict:
    """Print (and return) the version, ISA, tiles, threads and OpenMP version in use."""
    cfg = config()
    for key, value in cfg.items():
        print(f"{key:>15}: {value}")
    return cfg
