"""Array interop for the drop-in use: PyTorch CPU tensors, JAX arrays and anything exposing
``__dlpack__`` or ``__array__`` go in; the result comes back as the type of ``x``.

Inputs are taken without a copy where the producer allows it (DLPack, or the buffer behind
``__array__``); the NumPy result is handed back as a torch tensor sharing its memory
(``torch.from_numpy``, no copy) or as a JAX array (one copy, JAX owns its buffers).
Neither torch nor jax is imported unless the caller passes one of their arrays.
"""
from __future__ import annotations

import sys
from typing import Callable, Tuple

import numpy as np


def _identity(y: np.ndarray) -> np.ndarray:
    return y


def _module_of(value) -> str:
    return type(value).__module__.split(".", 1)[0]


def to_numpy(func: str, name: str, value):
    """A NumPy view of ``value`` (no copy where possible); non-array inputs are returned unchanged
    for the normal validation to judge."""
    if isinstance(value, np.ndarray) or value is None:
        return value
    module = _module_of(value)
    if module == "torch" and "torch" in sys.modules:
        import torch
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise ValueError(f"{func}: {name} is a torch tensor on {value.device}; convfast computes on the CPU "
                                 f"(move it with .cpu())")
            tensor = value.detach()
            if tensor.is_conj() or tensor.is_neg():
                tensor = tensor.resolve_conj().resolve_neg()
            return tensor.numpy()  # shares memory; complex dtypes are rejected later by name
    if hasattr(value, "__dlpack__") and module not in ("builtins",):
        try:
            return np.from_dlpack(value)
        except (TypeError, BufferError, RuntimeError, ValueError) as exc:
            if not hasattr(value, "__array__"):
                raise TypeError(f"{func}: {name} ({type(value).__name__}) could not be read through DLPack: {exc}") from None
    return value


def output_wrapper(x) -> Callable[[np.ndarray], object]:
    """How to hand the NumPy result back in the type of ``x``."""
    module = _module_of(x)
    if module == "torch" and "torch" in sys.modules:
        import torch
        if isinstance(x, torch.Tensor):
            return torch.from_numpy
    if module in ("jax", "jaxlib") and "jax" in sys.modules:
        import jax.numpy as jnp
        return jnp.asarray
    return _identity


def unwrap(func: str, x, weight, bias) -> Tuple[object, object, object, Callable[[np.ndarray], object]]:
    """NumPy views of the operands, and the wrapper that returns the result as ``x``'s type."""
    wrap = output_wrapper(x)
    return (to_numpy(func, "x", x), to_numpy(func, "weight", weight), to_numpy(func, "bias", bias), wrap)
