"""The GPU backend: Numba CUDA kernels for every convfast operator (see docs/gpu.md).

Importing this package (which ``import convfast`` does) does not import Numba: the kernels
(``_kernels``) and the launcher (``_engine``) are imported on the first call that runs on the GPU.
``pip install "convfast[cuda]"`` provides numba and numba-cuda.

The operators themselves are convfast's: ``convfast.conv2d(x, w, ...)`` runs here when ``x`` is a
GPU array (CuPy, PyTorch CUDA tensor, Numba device array) or when ``device="cuda"`` is passed; the
layer objects keep device copies of their weights after ``layer.to("cuda")``.
"""
from __future__ import annotations

from ._dispatch import cuda_backend, is_gpu_array, normalize_device, select_device  # noqa: F401


def is_available() -> bool:
    """True when Numba's CUDA target imports and finds a GPU (or runs as the CUDA simulator,
    NUMBA_ENABLE_CUDASIM=1). Imports numba."""
    try:
        cuda_backend("convfast.cuda.is_available")
    except RuntimeError:
        return False
    return True


__all__ = ["is_available", "is_gpu_array", "select_device"]
