"""Array interop for the drop-in use: PyTorch CPU tensors, JAX arrays and anything exposing
``__dlpack__`` or ``__array__`` go in; the result comes back as the type of ``x``.

Inputs are taken without a copy where the producer allows it (DLPack, or the buffer behind
``__array__``); the NumPy result is handed back as a torch tensor sharing its memory
(``torch.from_numpy``, no copy) or as a JAX array (one copy, JAX owns its buffers).
Neither torch nor jax is imported unless the caller passes one of their arrays.

A torch tensor that requires grad (with grad mode on) is not read as a plain array: the call goes
through ``convfast.torch``'s differentiable functional op instead (``needs_grad`` /
``call_with_grad``), so the result carries a ``grad_fn`` and ``.backward()`` reaches convfast's
backward functions.
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
            if value.layout != torch.strided:
                raise TypeError(f"{func}: {name} is a torch tensor with layout {value.layout}; convfast reads "
                                f"dense (strided) tensors (convert it with .to_dense())")
            tensor = value.detach()
            if tensor.is_conj() or tensor.is_neg():
                tensor = tensor.resolve_conj().resolve_neg()
            try:
                return tensor.numpy()  # shares memory; complex dtypes are rejected later by name
            except (TypeError, RuntimeError):  # dtypes NumPy has no type for: bfloat16, float8, ...
                raise TypeError(f"{func}: {name} has dtype {value.dtype}, which convfast does not compute; "
                                f"convert it with .float() (float32) or .double() (float64)") from None
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


# ----------------------------------------------------------------------------------------------
# Torch tensors that require grad: through convfast.torch's autograd function
# ----------------------------------------------------------------------------------------------

def needs_grad(x, weight, bias) -> bool:
    """True when one of the operands is a torch tensor that requires grad and grad mode is on
    (inside ``ConvFunction.forward`` grad mode is off, so the forward there reads plain arrays)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "Tensor"):
        return False
    return (any(isinstance(v, torch.Tensor) and v.requires_grad for v in (x, weight, bias))
            and torch.is_grad_enabled())


def call_with_grad(func: str, x, weight, bias, *, out=None, device=None, data_format="channels_first",
                   **params):
    """``convfast.<func>(x, weight, bias, **params)`` as a differentiable torch op: the result is a
    tensor whose ``grad_fn`` runs convfast's backward (``convfast.torch``'s ``ConvFunction``).
    Operands that are not tensors are converted (as constants); all of them must be float32 or
    float64 and share one dtype, as autograd needs each gradient in its operand's dtype.
    ``data_format="channels_last"`` moves the channel axis in torch (a view, differentiable)."""
    import torch
    from . import torch as cft
    from ._spec import normalize_data_format

    if out is not None:
        raise TypeError(f"{func}: out= cannot be used with a tensor that requires grad (autograd cannot "
                        f"track a write into out); leave out= unset, or call under torch.no_grad()")
    operands = {}
    for label, value in (("x", x), ("weight", weight), ("bias", bias)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(to_numpy(func, label, value))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"{func}: {label} ({type(value).__name__}) could not be read as a tensor "
                                f"next to a tensor that requires grad: {exc}") from None
        operands[label] = value
    x_t = operands["x"]
    for label, value in operands.items():
        if value.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{func}: {label} has dtype {value.dtype}; gradients are computed for float32 and "
                            f"float64 tensors (convert with .float() or .double(), or call under torch.no_grad())")
        if value.dtype != x_t.dtype:
            raise TypeError(f"{func}: x ({x_t.dtype}) and {label} ({value.dtype}) must have the same dtype "
                            f"when a tensor requires grad")
        if value.device != x_t.device:
            raise ValueError(f"{func}: x is on {x_t.device} but {label} is on {value.device}")
    if device is not None and str(device).split(":", 1)[0].lower() != x_t.device.type:
        raise ValueError(f"{func}: device={device!r} with a tensor that requires grad on {x_t.device}; "
                         f"the gradient path computes where the tensors are (move them with .to(...))")
    rank = int(func[-2])
    # a wrong number of axes is left for convfast's own shape check, which names the function
    channels_last = (normalize_data_format(func, data_format) == "channels_last"
                     and x_t.dim() in (rank + 1, rank + 2))
    if channels_last:  # (N, *spatial, C) -> (N, C, *spatial), a view; the result goes back the same way
        x_t = x_t.movedim(-1, x_t.dim() - rank - 1)
    y = getattr(cft, func)(x_t, operands["weight"], operands.get("bias"), **params)
    if channels_last:
        y = y.movedim(y.dim() - rank - 1, -1).contiguous()
    return y
