"""Where a call runs: the ``device=`` argument and GPU-array detection. No Numba here: this module
is imported with convfast, and must neither import numba nor cost anything for host arrays.

Rules (functional ops and layers alike):

* ``device=None`` (default): the GPU iff ``x`` is a GPU array (``__cuda_array_interface__``: CuPy,
  PyTorch CUDA tensors, Numba device arrays; or a DLPack producer on a CUDA device). The result is
  the same kind of array, on the GPU.
* ``device="cuda"``: the GPU; host inputs (NumPy, CPU tensors, lists) are copied there and the
  result comes back as a host array of ``x``'s kind (NumPy for NumPy).
* ``device="cpu"``: the CPU engine; a GPU operand is a ValueError (no hidden device-to-host copy).
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np

_DLPACK_CUDA = (2, 13)  # DLDeviceType kDLCUDA, kDLCUDAManaged
_DEVICES = ("cpu", "cuda")


def _module(value) -> str:
    return type(value).__module__.split(".", 1)[0]


def is_gpu_array(value) -> bool:
    """True for arrays that live in CUDA device memory. Never raises, never imports anything."""
    if value is None or isinstance(value, (np.ndarray, np.generic, list, tuple, int, float, complex, str)):
        return False
    cls = type(value)
    if getattr(cls, "__cuda_ndarray__", False):  # Numba device arrays (the simulator's too)
        return True
    if _module(value) == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if isinstance(value, torch.Tensor):
            # torch.Tensor defines __cuda_array_interface__ for every tensor (CPU ones raise).
            return value.device.type == "cuda"
    if hasattr(cls, "__cuda_array_interface__") or "__cuda_array_interface__" in getattr(value, "__dict__", ()):
        return True
    dlpack_device = getattr(value, "__dlpack_device__", None)
    if callable(dlpack_device):
        try:
            return int(dlpack_device()[0]) in _DLPACK_CUDA
        except Exception:
            return False
    return False


def normalize_device(func: str, device) -> Optional[str]:
    """None, "cpu" or "cuda" (case-insensitive)."""
    if device is None:
        return None
    if not isinstance(device, str):
        raise TypeError(f"{func}: device must be None, 'cpu' or 'cuda', got {device!r} ({type(device).__name__})")
    key = device.strip().lower()
    if key not in _DEVICES:
        raise ValueError(f"{func}: device must be None, 'cpu' or 'cuda', got {device!r}")
    return key


def select_device(func: str, device, x, **operands) -> str:
    """"cpu" or "cuda" for a call (see the module docstring); checks that a CPU call has no GPU
    operand. ``operands``: weight, bias, out (None entries are skipped)."""
    key = normalize_device(func, device)
    target = key or ("cuda" if is_gpu_array(x) else "cpu")
    if target == "cpu":
        for name, value in (("x", x),) + tuple(operands.items()):
            if is_gpu_array(value):
                why = "device='cpu' was requested" if key else "x is a host array (device=None runs where x lives)"
                raise ValueError(f"{func}: {name} is a GPU array ({type(value).__name__}) but the call runs on the "
                                 f"CPU: {why}; pass device='cuda' (layers: .to('cuda')), or copy {name} to the "
                                 f"host")
    return target


def cuda_backend(func: str):
    """The GPU engine module (imports numba.cuda on first use); RuntimeError naming ``func`` when
    Numba, numba-cuda, a driver or a GPU is missing."""
    try:
        from . import _engine
    except Exception as exc:  # ImportError, or numba-cuda failing to initialise
        raise RuntimeError(f"{func}: running on the GPU needs Numba's CUDA target, which could not be imported "
                           f"({type(exc).__name__}: {exc}); install it with pip install 'convfast[cuda]'") from exc
    _engine.require_gpu(func)
    return _engine
