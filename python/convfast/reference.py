"""Pure-NumPy reference implementations of every convfast operator: the oracle for tests.

Independent of the C++ code: the forward convolution pads with ``np.pad`` and contracts sliding
windows with ``einsum``; the transposed convolution is written in the *scatter* form (each input
pixel adds its kernel-weighted copy into the output), which is a different derivation from the
compiled gather-by-phase engine. Everything accumulates in float64. Only the parameter
normalisation (:mod:`convfast._spec`) is shared with the compiled path.
"""
from __future__ import annotations

import itertools
import string

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._spec import NUMPY_PAD_MODE, ConvSpec, as_array, conv_spec, conv_transpose_spec, effective_kernel
from .arithmetic import (conv_output_shape, conv_transpose_output_shape, receptive_field,  # noqa: F401
                         same_padding)


def _letters(n, offset):
    return string.ascii_letters[offset:offset + n]


def _to_caller_layout(spec: ConvSpec, y: np.ndarray) -> np.ndarray:
    if spec.channels_last:
        y = np.moveaxis(y, 1, -1)
    if not spec.batched:
        y = y[0]
    return np.ascontiguousarray(y, dtype=spec.dtype)


def conv_reference(spec: ConvSpec, x, weight, bias=None) -> np.ndarray:
    r = spec.rank
    x = spec.canonical_input(np.asarray(x)).astype(np.float64)
    w = np.asarray(weight, dtype=np.float64)
    pad_width = ((0, 0), (0, 0)) + tuple(spec.pads)
    mode = NUMPY_PAD_MODE[spec.padding_mode]
    xp = np.pad(x, pad_width, mode=mode) if any(sum(spec.pads, ())) else x
    spatial_axes = tuple(range(2, 2 + r))
    eff = tuple(effective_kernel(k, d) for k, d in zip(spec.kernel, spec.dilation))
    win = sliding_window_view(xp, eff, axis=spatial_axes)          # (N, C, *full_out, *eff)
    sel = (slice(None), slice(None))
    sel += tuple(slice(0, o * s, s) for o, s in zip(spec.out_spatial, spec.stride))
    sel += tuple(slice(None, None, d) for d in spec.dilation)
    win = win[sel]                                                  # (N, C, *out, *k)
    g = spec.groups
    n = x.shape[0]
    win = win.reshape((n, g, spec.in_channels // g) + win.shape[2:])
    wg = w.reshape((g, spec.out_channels // g) + w.shape[1:])        # (g, Cout/g, Cin/g, *k)
    o, k = _letters(r, 0), _letters(r, 10)
    y = np.einsum(f"NGC{o}{k},GDC{k}->NGD{o}", win, wg, optimize=True)
    y = y.reshape((n, spec.out_channels) + spec.out_spatial)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * r)
    return _to_caller_layout(spec, y)


def conv_transpose_reference(spec: ConvSpec, x, weight, bias=None) -> np.ndarray:
    """Scatter form: full[i*s + t*d] += x[i] * w[t]; then crop pad_before and take out_spatial."""
    r = spec.rank
    x = spec.canonical_input(np.asarray(x)).astype(np.float64)
    w = np.asarray(weight, dtype=np.float64)
    n, g = x.shape[0], spec.groups
    cin_g, cout_g = spec.in_channels // g, spec.out_channels // g
    xg = x.reshape((n, g, cin_g) + spec.in_spatial)
    wg = w.reshape((g, cin_g, cout_g) + spec.kernel)
    full = tuple(max((i - 1) * s + effective_kernel(k, d), p[0] + o)
                 for i, k, s, d, p, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.dilation, spec.pads,
                                             spec.out_spatial))
    buf = np.zeros((n, g, cout_g) + full)
    i_letters = _letters(r, 0)
    for taps in itertools.product(*(range(k) for k in spec.kernel)):
        contrib = np.einsum(f"NGC{i_letters},GCD->NGD{i_letters}", xg, wg[(slice(None),) * 3 + taps])
        dst = tuple(slice(t * d, t * d + (i - 1) * s + 1, s)
                    for t, d, i, s in zip(taps, spec.dilation, spec.in_spatial, spec.stride))
        buf[(slice(None),) * 3 + dst] += contrib
    crop = tuple(slice(p[0], p[0] + o) for p, o in zip(spec.pads, spec.out_spatial))
    y = buf[(slice(None),) * 3 + crop].reshape((n, spec.out_channels) + spec.out_spatial)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * r)
    return _to_caller_layout(spec, y)


def _make_conv(rank):
    name = f"conv{rank}d"

    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             data_format="channels_first"):
        x, weight = as_array(name, "x", x), as_array(name, "weight", weight)
        bias = None if bias is None else as_array(name, "bias", bias)
        spec = conv_spec(name, rank, x, weight, bias, stride, padding, dilation, groups, padding_mode, data_format)
        return conv_reference(spec, x, weight, bias)

    conv.__name__ = conv.__qualname__ = name
    conv.__doc__ = f"Reference (NumPy, float64 accumulation) for convfast.{name}."
    return conv


def _make_conv_transpose(rank):
    name = f"conv_transpose{rank}d"

    def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       output_size=None, data_format="channels_first"):
        x, weight = as_array(name, "x", x), as_array(name, "weight", weight)
        bias = None if bias is None else as_array(name, "bias", bias)
        spec = conv_transpose_spec(name, rank, x, weight, bias, stride, padding, output_padding, groups, dilation,
                                   output_size, data_format)
        return conv_transpose_reference(spec, x, weight, bias)

    conv_transpose.__name__ = conv_transpose.__qualname__ = name
    conv_transpose.__doc__ = f"Reference (NumPy, float64 accumulation) for convfast.{name}."
    return conv_transpose


conv1d, conv2d, conv3d = (_make_conv(r) for r in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(r) for r in (1, 2, 3))


def pad(array, pad_width, mode="constant", constant_values=0, **kwargs):
    """Reference for convfast.pad: np.pad itself (convolution mode names mapped to np.pad's)."""
    if isinstance(mode, str):
        mode = {"zeros": "constant", "replicate": "edge", "circular": "wrap"}.get(mode.lower(), mode.lower())
    if mode == "constant":
        kwargs["constant_values"] = constant_values
    return np.pad(array, pad_width, mode=mode, **kwargs)
