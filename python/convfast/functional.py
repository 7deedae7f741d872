"""The compiled operators: conv1d/2d/3d, conv_transpose1d/2d/3d and pad.

Each call normalises its arguments once (:mod:`convfast._spec`), presents the arrays to the kernels
as rank-3 strided views (1-D and 2-D get unit leading axes; channels_last is a transposed view, not a
copy) and runs the C++ engine with the GIL released.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import sys
from typing import Optional

import numpy as np

from . import _core
from ._interop import call_with_grad, needs_grad, output_wrapper, to_numpy
from .cuda._dispatch import cuda_backend, select_device
from ._spec import (ConvSpec, PADDING_MODES, as_array, conv_spec, conv_transpose_spec, normalize_padding_mode,
                    NUMPY_PAD_MODE)

_VERBOSE = os.environ.get("CONVFAST_VERBOSE", "") not in ("", "0")
_SPATIAL = 3  # the kernels' fixed rank


def _native(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """a in the compute dtype, native byte order and aligned; a view whenever that is possible."""
    a = np.asarray(a, dtype=dtype)
    if not a.flags.aligned:
        # np.ascontiguousarray returns a contiguous but misaligned array unchanged; a copy is aligned.
        a = a.copy()
    return a


def _with_unit_axes(a: np.ndarray, rank: int, first_spatial_axis: int) -> np.ndarray:
    for _ in range(_SPATIAL - rank):
        a = np.expand_dims(a, first_spatial_axis)
    return a


def _padded3(values, rank: int, fill: int):
    return (fill,) * (_SPATIAL - rank) + tuple(values)


def _check_out(spec: ConvSpec, out) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{spec.func}: out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != spec.dtype:
        raise TypeError(f"{spec.func}: out has dtype {out.dtype}, the result is {spec.dtype}")
    if out.shape != spec.output_shape():
        raise ValueError(f"{spec.func}: out has shape {out.shape}, the result has shape {spec.output_shape()}")
    if not out.flags.writeable:
        raise ValueError(f"{spec.func}: out is read-only")


def _kernel_views(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, y: np.ndarray):
    """x, weight and y as the kernels' rank-3 views: x (N, C, D, H, W), w (G, C_out/G, C_in/G, kD, kH, kW),
    y (N, C_out, oD, oH, oW). No copies except a dtype/byte-order/alignment conversion."""
    dt = spec.dtype
    x5 = _with_unit_axes(spec.canonical_input(_native(x, dt)), spec.rank, 2)
    y5 = _with_unit_axes(spec.canonical_output(y), spec.rank, 2)
    w = _native(weight, dt)
    g = spec.groups
    if spec.transposed:  # (C_in, C_out/g, *k) -> (g, C_out/g, C_in/g, *k) view
        w6 = w.reshape((g, w.shape[0] // g) + w.shape[1:]).swapaxes(1, 2)
    else:
        w6 = w.reshape((g, w.shape[0] // g) + w.shape[1:])
    return x5, _with_unit_axes(w6, spec.rank, 3), y5


_INT64_SAFE = 2 ** 61  # the kernels' bound (validate() in cpp/conv/common/geometry.hpp): headroom for index arithmetic


def _kernel_params(spec: ConvSpec):
    """stride / dilation / padding for the kernels. A stride that can never step (one output, or one
    input of a transposed convolution) and a dilation that never spreads (kernel size 1) are
    replaced by 1, so that astronomically large but irrelevant values stay valid calls."""
    steps = spec.in_spatial if spec.transposed else spec.out_spatial
    stride = tuple(1 if n == 1 else s for n, s in zip(steps, spec.stride))
    dilation = tuple(1 if k == 1 else d for k, d in zip(spec.kernel, spec.dilation))
    spans = tuple((o - 1) * s for o, s in zip(spec.out_spatial, stride)) + \
        tuple((k - 1) * d for k, d in zip(spec.kernel, dilation)) + tuple(abs(p) for p in spec.pad_before)
    if max(spans) > _INT64_SAFE:
        raise ValueError(f"{spec.func}: stride {spec.stride}, dilation {spec.dilation} and padding {spec.pads} "
                         f"reach input coordinates too large for 64-bit index arithmetic (limit 2**61)")
    return (1 if spec.transposed else 0, _padded3(stride, spec.rank, 1), _padded3(dilation, spec.rank, 1),
            _padded3(spec.pad_before, spec.rank, 0), PADDING_MODES[spec.padding_mode])


def _output_array(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An uninitialised output: ``_core.output_array`` (the compiled engine's kept large blocks for
    large outputs: no fresh pages to zero per call; NumPy's own array for small ones), or, for sizes
    past the address space, ``np.empty``, which raises NumPy's own error."""
    if math.prod(shape) * dtype.itemsize > sys.maxsize:
        return np.empty(shape, dtype=dtype)
    return _core.output_array(shape, dtype)


# ----------------------------------------------------------------------------------------------
# Calls seen before: the per-call fast path
# ----------------------------------------------------------------------------------------------
#
# A call on NumPy arrays whose signature (function, shapes, strides and dtypes of the operands, and
# the parameters as given) was seen before skips the normalisation: _core.Call keeps what the first
# such call resolved and re-checks the operands' geometry in C++ (fixed cost ~4 us against ~40 us).
# Only signatures whose parameters are plain ints, strings and tuples of them are kept, so that a
# value the full path rejects (a bool, a float) can never match a kept signature by equality.

_CALLS: dict = {}
_MAX_CALLS = 1024


def _plain(value) -> bool:
    """None, an int, a string, or a tuple of ints or of (int, int) pairs: the parameter forms whose
    equality means the same call (True == 1 and 1.0 == 1, which the full path rejects, are not)."""
    kind = type(value)
    if kind is int or kind is str or value is None:
        return True
    if kind is not tuple:
        return False
    for item in value:
        if type(item) is not int and not (type(item) is tuple and all(type(v) is int for v in item)):
            return False
    return True


def call_key(name, x, weight, bias, params):
    """The fast-path signature of a call on NumPy arrays, or None where the call must take the full path."""
    if type(x) is not np.ndarray or type(weight) is not np.ndarray or _VERBOSE:
        return None
    if bias is None:
        bias_key = None
    elif type(bias) is np.ndarray:
        bias_key = (bias.shape, bias.strides, bias.dtype)
    else:
        return None
    for value in params:
        if not _plain(value):
            return None
    return (name, x.shape, x.strides, x.dtype, weight.shape, weight.strides, weight.dtype, bias_key) + params


def _kept_call(name, x, weight, bias, out, device, params):
    """(key, y): the call's fast-path signature (None: it takes the full path) and, when a kept
    _core.Call matches it and its operands, the result (else None)."""
    if out is not None or device is not None:
        return None, None
    key = call_key(name, x, weight, bias, params)
    call = _CALLS.get(key)
    return key, (None if call is None else call.run(x, weight, bias))


def _remember(calls: dict, key, spec: ConvSpec, x, weight, bias, y, planned: bool):
    """Keep a _core.Call for a signature that has just been computed by the full path: only when the
    operands went to the kernels as they were (no dtype conversion, aligned)."""
    dt = spec.dtype
    if x.dtype != dt or weight.dtype != dt or (bias is not None and bias.dtype != dt) or \
            not (x.flags.aligned and weight.flags.aligned and (bias is None or bias.flags.aligned)):
        return None
    x5, w6, y5 = _kernel_views(spec, x, weight, y)
    if len(calls) >= _MAX_CALLS:
        calls.clear()
    call = calls[key] = _core.Call(x5, w6, y5, *_kernel_params(spec), x, weight, bias, y, planned)
    return call


def run_spec(spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
             out: Optional[np.ndarray] = None, calls: Optional[dict] = None, key=None,
             planned: bool = False) -> np.ndarray:
    """Compute a validated spec with the compiled engine.

    ``calls`` and ``key``: keep a ``_core.Call`` for the signature ``key`` in ``calls`` (the fast
    path of later calls). ``planned`` (the layer objects) makes it hold a plan with the weights
    packed once, so repeated calls skip weight packing and the Winograd weight transform.
    """
    if out is not None:
        _check_out(spec, out)
        inputs = [a for a in (x, weight, bias) if a is not None]
        # out that overlaps an operand, or is misaligned (the kernels need aligned elements), is
        # written through a temporary.
        if not out.flags.aligned or any(np.may_share_memory(out, a) for a in inputs):
            out[...] = run_spec(spec, x, weight, bias)
            return out
        y = out
    else:
        y = _output_array(spec.output_shape(), np.dtype(spec.dtype))
    if y.size == 0:
        return y
    if key is not None and out is None:
        call = _remember(calls, key, spec, x, weight, bias, y, planned)
        if call is not None:
            result = call.run(x, weight, bias)
            if result is not None:
                if _VERBOSE:
                    print(f"convfast: {spec.func} {call.describe()}", file=sys.stderr)
                return result
    x5, w6, y5 = _kernel_views(spec, x, weight, y)
    b = None if bias is None else _native(bias, spec.dtype)
    _core.conv(x5, w6, b, y5, *_kernel_params(spec))
    if _VERBOSE:
        print(f"convfast: {spec.func} {_core.last_algorithm()}", file=sys.stderr)
    return y


def _arrays(func, x, weight, bias):
    x = as_array(func, "x", x)
    weight = as_array(func, "weight", weight)
    bias = None if bias is None else as_array(func, "bias", bias)
    return x, weight, bias


def _make_conv(rank: int):
    name = f"conv{rank}d"

    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             data_format="channels_first", out=None, device=None):
        key, y = _kept_call(name, x, weight, bias, out, device,
                            (stride, padding, dilation, groups, padding_mode, data_format))
        if y is not None:
            return y
        if needs_grad(x, weight, bias):  # a torch tensor requiring grad: through convfast.torch's autograd op
            return call_with_grad(name, x, weight, bias, out=out, device=device, data_format=data_format,
                                  stride=stride, padding=padding, dilation=dilation, groups=groups,
                                  padding_mode=padding_mode)
        if select_device(name, device, x, weight=weight, bias=bias, out=out) == "cuda":
            return cuda_backend(name).conv(name, rank, x, weight, bias, out, stride, padding, dilation, groups,
                                           padding_mode, data_format)
        wrap = output_wrapper(x)
        x, weight, bias = _arrays(name, x, weight, bias)
        spec = conv_spec(name, rank, x, weight, bias, stride, padding, dilation, groups, padding_mode, data_format)
        return wrap(run_spec(spec, x, weight, bias, to_numpy(name, "out", out), _CALLS, key))

    conv.__name__ = conv.__qualname__ = name
    conv.__doc__ = f"""{rank}-D convolution (cross-correlation, as torch.nn.functional.{name}).

    Parameters
    ----------
    x : array, (N, C_in, *spatial) or unbatched (C_in, *spatial); (N, *spatial, C_in) with
        data_format="channels_last". {rank} spatial axes.
    weight : array, (C_out, C_in/groups, *kernel).
    bias : array (C_out,) or None.
    stride, dilation : int or {rank} ints, >= 1.
    padding : int; {rank} ints; {rank} (before, after) pairs; "valid"; "same" (TF/ONNX SAME_UPPER for
        any stride and dilation: out = ceil(in / stride), the odd pixel after); "same_lower" (odd
        pixel before).
    groups : int dividing C_in and C_out (groups == C_in is a depthwise convolution).
    padding_mode : "zeros", "reflect", "replicate", "circular" or "symmetric" (np.pad names
        "constant", "edge", "wrap" are accepted), applied inside the kernel to whatever padding was
        resolved. reflect needs padding smaller than the input size.
    data_format : "channels_first" or "channels_last" (weights keep their layout).
    out : optional C-contiguous or strided array of the result's shape and dtype to write into.
    device : None (default: the GPU iff x is a GPU array -- CuPy, PyTorch CUDA, Numba device array
        -- and the CPU otherwise), "cuda" (host inputs are copied to the GPU, the result comes back
        to the host) or "cpu". See docs/gpu.md.

    Returns
    -------
    A new C-contiguous array (or ``out``): float32 when every operand is float32 (or float16),
    float64 otherwise; integer and bool inputs are computed as float64. GPU inputs give a GPU
    array of x's kind.

    Example
    -------
    >>> import numpy as np, convfast
    >>> x = np.ones((1, 1, {", ".join(["5"] * rank)}), np.float32)
    >>> w = np.ones((1, 1, {", ".join(["3"] * rank)}), np.float32)
    >>> convfast.{name}(x, w, stride=2, padding="same").shape
    (1, 1, {", ".join(["3"] * rank)})
    """
    return conv


def _make_conv_transpose(rank: int):
    name = f"conv_transpose{rank}d"

    def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       output_size=None, data_format="channels_first", out=None, device=None):
        key, y = _kept_call(name, x, weight, bias, out, device,
                            (stride, padding, output_padding, groups, dilation, output_size, data_format))
        if y is not None:
            return y
        if needs_grad(x, weight, bias):  # a torch tensor requiring grad: through convfast.torch's autograd op
            return call_with_grad(name, x, weight, bias, out=out, device=device, data_format=data_format,
                                  stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                                  dilation=dilation, output_size=output_size)
        if select_device(name, device, x, weight=weight, bias=bias, out=out) == "cuda":
            return cuda_backend(name).conv_transpose(name, rank, x, weight, bias, out, stride, padding,
                                                     output_padding, groups, dilation, output_size, data_format)
        wrap = output_wrapper(x)
        x, weight, bias = _arrays(name, x, weight, bias)
        spec = conv_transpose_spec(name, rank, x, weight, bias, stride, padding, output_padding, groups,
                                   dilation, output_size, data_format)
        return wrap(run_spec(spec, x, weight, bias, to_numpy(name, "out", out), _CALLS, key))

    conv_transpose.__name__ = conv_transpose.__qualname__ = name
    conv_transpose.__doc__ = f"""{rank}-D transposed convolution (torch.nn.functional.{name}).

    Exactly the adjoint (the gradient with respect to the input) of conv{rank}d with the same stride,
    padding, dilation and groups, computed by splitting the output by stride phase (no zeros are
    inserted and multiplied).

    Parameters
    ----------
    x : array, (N, C_in, *spatial) or unbatched; channels last with data_format="channels_last".
    weight : array, (C_in, C_out/groups, *kernel).
    bias : array (C_out,) or None.
    stride, dilation : int or {rank} ints, >= 1.
    padding : int, {rank} ints or (before, after) pairs: pixels cropped from the full output.
        "same" gives output = input * stride (Keras Conv2DTranspose, ONNX SAME_UPPER split);
        "same_lower" the ONNX SAME_LOWER split; "valid" crops nothing.
    output_padding : int or {rank} ints added at the end of each axis; each smaller than the stride
        or the dilation.
    output_size : the wanted spatial size ({rank} ints, or the full output shape); chooses
        output_padding, ValueError if unreachable.
    data_format : "channels_first" or "channels_last".
    out : optional output array.
    device : None (the GPU iff x is a GPU array), "cuda" or "cpu", as for conv{rank}d.

    Output size per axis: (in - 1) * stride - pad_before - pad_after + dilation * (k - 1) + 1
    + output_padding.

    Example
    -------
    >>> import numpy as np, convfast
    >>> x = np.ones((1, 1, {", ".join(["4"] * rank)}))
    >>> w = np.ones((1, 1, {", ".join(["3"] * rank)}))
    >>> convfast.{name}(x, w, stride=2, padding=1, output_padding=1).shape
    (1, 1, {", ".join(["8"] * rank)})
    """
    return conv_transpose


conv1d, conv2d, conv3d = (_make_conv(r) for r in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(r) for r in (1, 2, 3))


# ----------------------------------------------------------------------------------------------
# pad: the np.pad drop-in
# ----------------------------------------------------------------------------------------------

_PAD_MODES = {"constant": None, "reflect": "reflect", "edge": "replicate", "wrap": "circular",
              "symmetric": "symmetric"}


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def normalize_pad_width(func: str, pad_width, ndim: int):
    """np.pad's argument forms: an int, (before, after), ((b, a),) * ndim, a per-axis sequence, or a
    dict {axis: int or (before, after)}; returns ndim (before, after) pairs of non-negative ints."""
    if isinstance(pad_width, dict):
        seq = [(0, 0)] * ndim
        for axis, width in pad_width.items():
            if not _is_integer(axis) or not -ndim <= axis < ndim:
                raise ValueError(f"{func}: pad_width axis {axis!r} is out of range for {ndim} dimensions")
            seq[operator.index(axis)] = (width, width) if np.ndim(width) == 0 else width
        pad_width = seq
    widths = np.asarray(pad_width)
    if widths.dtype.kind != "i":  # as np.pad: unsigned, bool, float and object widths are TypeErrors
        raise TypeError(f"{func}: pad_width must be of integral type, got {pad_width!r}")
    if widths.size and widths.min() < 0:
        raise ValueError(f"{func}: pad_width must be non-negative, got {pad_width!r}")
    if widths.size == 1:
        widths = widths.reshape(1, 1)
    elif widths.size == 2 and widths.shape != (2, 1):
        widths = widths.reshape(1, 2)
    try:
        pairs = np.broadcast_to(widths, (ndim, 2))
    except ValueError:
        raise ValueError(f"{func}: pad_width {pad_width!r} cannot be broadcast to ({ndim}, 2)") from None
    return [(int(a), int(b)) for a, b in pairs]


def pad(array, pad_width, mode="constant", constant_values=0, **kwargs):
    """Pad an N-D array: a drop-in for ``np.pad`` with the same argument forms.

    The modes "constant", "reflect", "edge", "wrap" and "symmetric" (also their convolution names
    "zeros", "replicate", "circular") run in the compiled kernel; np.pad's other modes and options
    (``reflect_type="odd"``, ``stat_length``, callables, ...) are passed through to ``np.pad``.

    >>> import convfast
    >>> convfast.pad([1, 2, 3], (2, 1), mode="reflect")
    array([3, 2, 1, 2, 3, 2])
    """
    func = "convfast.pad"
    if isinstance(mode, str):
        key = mode.lower()
        key = {"zeros": "constant", "replicate": "edge", "circular": "wrap"}.get(key, key)
    else:
        key = None
    arr = np.asarray(array)
    if key not in _PAD_MODES or kwargs or arr.ndim == 0 or arr.dtype.kind == "O" \
            or arr.dtype.itemsize not in (1, 2, 4, 8, 16):
        if key == "constant":
            kwargs.setdefault("constant_values", constant_values)
        return np.pad(array, pad_width, mode if key is None else key, **kwargs)
    widths = normalize_pad_width(func, pad_width, arr.ndim)
    before = [b for b, _ in widths]
    after = [a for _, a in widths]
    for axis, (n, (b, a)) in enumerate(zip(arr.shape, widths)):
        if n == 0 and (b or a) and key != "constant":
            raise ValueError(f"{func}: can't extend empty axis {axis} using mode {mode!r}")
    out = np.empty(tuple(n + b + a for n, (b, a) in zip(arr.shape, widths)), dtype=arr.dtype)
    if key == "constant":
        fill = np.empty((arr.ndim, 2), dtype=arr.dtype)
        # The same (axis, side) broadcasting and the same scalar assignment as np.pad, so that
        # out-of-range or NaN constants raise exactly where np.pad raises.
        values = np.array(constant_values)
        try:
            if values.size == 1:
                pairs = [(values.ravel()[0],) * 2] * arr.ndim
            elif values.size == 2 and values.shape != (2, 1):
                pairs = [tuple(values.ravel())] * arr.ndim
            else:
                pairs = np.broadcast_to(values, (arr.ndim, 2)).tolist()
        except ValueError:
            raise ValueError(f"{func}: constant_values {constant_values!r} cannot be broadcast to ({arr.ndim}, 2)") from None
        for axis, (before_value, after_value) in enumerate(pairs):
            fill[axis, 0] = before_value
            fill[axis, 1] = after_value
        if out.size:  # constant_values are validated above even when the result is empty, as np.pad does
            _core.pad(arr, out, before, after, True, 0, fill.tobytes())
    elif out.size:
        _core.pad(arr, out, before, after, False, PADDING_MODES[_PAD_MODES[key]], b"")
    return out


__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "pad",
           "run_spec", "normalize_pad_width", "normalize_padding_mode", "NUMPY_PAD_MODE"]
