"""Backward passes: the gradients of every convolution with respect to its input, weight and bias.

``conv{1,2,3}d_backward(grad_output, x, weight, bias=None, <the forward's other arguments>)`` and
``conv_transpose{1,2,3}d_backward(...)`` take the arguments of the forward call, with the gradient
of the loss with respect to its output in front, and return ``ConvGrads(grad_input, grad_weight,
grad_bias)``. ``needs=(input, weight, bias)`` (PyTorch's ``output_mask``) skips the gradients that
are not wanted; those come back as None.

``device=None | "cpu" | "cuda"`` follows the forward operators' rules (convfast.cuda._dispatch): a
GPU ``x`` (Numba device array, CuPy, torch CUDA tensor) runs on the GPU and gives GPU gradients of
its kind; device="cuda" with host arrays computes there and returns host arrays of x's kind;
device="cpu" with a GPU operand is a ValueError. The GPU passes (convfast.cuda._backward, imported
only then) compute the same formulas, with the geometry helpers below shared by both.

On the CPU, the heavy lifting is done by convfast's public forward operators (``conv*``,
``conv_transpose*``, ``pad``) and, for NumPy arrays, the compiled weight-gradient kernel
``_core.weight_grad``; the rest is array slicing, reshapes, copies and sums (and ``np.einsum`` for
depthwise weight gradients), so a backend that runs those operators runs the backward passes too.

The formulas (per spatial axis: ``p`` pads before/after, ``s`` stride, ``d`` dilation, ``k`` kernel,
``S`` input size, ``O`` output size):

* convolution, grad_input: the transposed convolution of grad_output with the same weight, stride,
  dilation and groups. With zero padding the pads are cropped by it directly (padding=p and the
  output_padding ``r = S + p_before + p_after - ((O - 1) s + d (k - 1) + 1)`` that the forward's
  floor division lost). With another padding mode it yields the gradient with respect to the
  *padded* input, which is then folded back by the adjoint of the padding (per axis: the interior
  slice plus the border slices added onto the pixels they were copied from).
* transposed convolution, grad_input: the convolution of grad_output with the same weight and
  parameters, the cropped pixels restored as zero padding (``padding=(p_before, p_after -
  output_padding)``).
* grad_weight, both: a correlation of the (padded) input with the output gradient,
  ``gW[co, ci, t] = sum_{n, o} x_padded[n, ci, o s + t d] gy[n, co, o]`` (for the transposed
  convolution x and gy trade places). Per kernel tap this is a GEMM with K = N * prod(O), computed
  for NumPy arrays by the compiled kernel (cpp/conv/weight_grad/, reading x unpadded through the
  padding mode), for depthwise-like groups by ``np.einsum`` per tap, and for other array types from
  slabs of the input's strided windows multiplied by the engine as a 1x1 convolution (see
  ``_weight_grad``).
* grad_bias: grad_output summed over the batch and the spatial axes.
"""
from __future__ import annotations

import itertools
import math
from collections import namedtuple
from typing import Sequence, Tuple

import numpy as np

from . import _core
from . import functional as _ops
from ._interop import output_wrapper
from ._spec import (PADDING_MODES, ConvSpec, as_array, compute_dtype, conv_spec, conv_transpose_spec,
                    effective_kernel)
from .cuda._dispatch import cuda_backend, select_device

ConvGrads = namedtuple("ConvGrads", ["grad_input", "grad_weight", "grad_bias"])
ConvGrads.__doc__ = ("Gradients of a convolution: grad_input (x's shape and layout), grad_weight (weight's "
                     "shape), grad_bias ((C_out,)); None where not asked for.")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def _needs(func: str, needs, has_bias: bool) -> Tuple[bool, bool, bool]:
    """The (input, weight, bias) mask; by default all three, grad_bias only when there is a bias."""
    if needs is None:
        return True, True, has_bias
    if isinstance(needs, (str, bytes)) or not hasattr(needs, "__len__"):
        raise TypeError(f"{func}: needs must be a sequence of three bools (input, weight, bias), got {needs!r}")
    if len(needs) != 3:
        raise ValueError(f"{func}: needs must have three entries (input, weight, bias), got {needs!r}")
    for item in needs:
        if not isinstance(item, (bool, np.bool_)):
            raise TypeError(f"{func}: needs must hold bools (input, weight, bias), got {needs!r}")
    return tuple(bool(v) for v in needs)


def _grad_output(func: str, spec: ConvSpec, grad_output) -> np.ndarray:
    gy = as_array(func, "grad_output", grad_output)
    if gy.shape != spec.output_shape():
        raise ValueError(f"{func}: grad_output has shape {gy.shape}, but the forward output has shape "
                         f"{spec.output_shape()}")
    return gy


def _spatial_axes(spec: ConvSpec) -> Tuple[int, ...]:
    """The spatial axes of x / y in the caller's layout."""
    first = (1 if spec.batched else 0) + (0 if spec.channels_last else 1)
    return tuple(range(first, first + spec.rank))


def _crop_spatial(spec: ConvSpec, a: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """A view of a (caller's layout) keeping the first lengths[i] pixels of each spatial axis."""
    index = [slice(None)] * a.ndim
    for axis, n in zip(_spatial_axes(spec), lengths):
        index[axis] = slice(0, n)
    return a[tuple(index)]


# ----------------------------------------------------------------------------------------------
# The adjoint of padding
# ----------------------------------------------------------------------------------------------

def _axis_slice(ndim: int, axis: int, start: int, stop: int):
    index = [slice(None)] * ndim
    index[axis] = slice(start, stop)
    return tuple(index)


def _fold_axis(g: np.ndarray, axis: int, before: int, size: int, mode: str) -> np.ndarray:
    """The adjoint of padding one axis with ``mode``: g has ``before + size + after`` entries along
    ``axis`` (the gradient with respect to the padded array); each padded entry's gradient is added
    to the input entry it was copied from. Returns ``size`` entries along ``axis``.

    Each border is one slice (reversed for reflect / symmetric) added onto a slice of the interior,
    or summed onto the edge pixel (replicate); borders wider than the input (circular / symmetric
    only: reflect needs pads < size) are folded over the mode's period instead."""
    nd = g.ndim
    total = g.shape[axis]
    after = total - before - size
    if before == 0 and after == 0:
        return g
    interior = g[_axis_slice(nd, axis, before, before + size)]
    if mode == "zeros":
        return interior
    if mode in ("circular", "symmetric") and max(before, after) > size:
        return _fold_periodic(g, axis, before, size, mode)
    out = interior.copy()
    head = g[_axis_slice(nd, axis, 0, before)]
    tail = g[_axis_slice(nd, axis, before + size, total)]
    if mode == "replicate":      # every border pixel is a copy of the edge pixel
        out[_axis_slice(nd, axis, 0, 1)] += head.sum(axis=axis, keepdims=True)
        out[_axis_slice(nd, axis, size - 1, size)] += tail.sum(axis=axis, keepdims=True)
    elif mode == "circular":     # head j -> size - before + j, tail i -> i
        out[_axis_slice(nd, axis, size - before, size)] += head
        out[_axis_slice(nd, axis, 0, after)] += tail
    elif mode == "symmetric":    # head j -> before - 1 - j, tail i -> size - 1 - i (edge repeated)
        out[_axis_slice(nd, axis, 0, before)] += np.flip(head, axis)
        out[_axis_slice(nd, axis, size - after, size)] += np.flip(tail, axis)
    elif mode == "reflect":      # head j -> before - j, tail i -> size - 2 - i (edge not repeated)
        out[_axis_slice(nd, axis, 1, before + 1)] += np.flip(head, axis)
        out[_axis_slice(nd, axis, size - 1 - after, size - 1)] += np.flip(tail, axis)
    else:  # pragma: no cover - the spec admits no other mode
        raise ValueError(f"unknown padding mode {mode!r}")
    return out


def _fold_periodic(g: np.ndarray, axis: int, before: int, size: int, mode: str) -> np.ndarray:
    """Circular / symmetric padding of any width is periodic (period size, resp. 2 * size, the
    second half mirrored): place g into a zero buffer aligned to the period, sum the periods."""
    period = size if mode == "circular" else 2 * size
    total = g.shape[axis]
    offset = (-before) % period          # buffer index j + offset is congruent to j - before
    reps = -(-(offset + total) // period)
    shape = list(g.shape)
    shape[axis] = reps * period
    buf = np.zeros_like(g, shape=tuple(shape))
    buf[_axis_slice(g.ndim, axis, offset, offset + total)] = g
    folded = buf.reshape(tuple(shape[:axis]) + (reps, period) + tuple(shape[axis + 1:])).sum(axis=axis)
    if mode == "circular":
        return folded
    nd = g.ndim
    return folded[_axis_slice(nd, axis, 0, size)] + np.flip(folded[_axis_slice(nd, axis, size, period)], axis)


def pad_adjoint(grad, pad_width, mode="constant"):
    """The adjoint (the backward) of ``convfast.pad(x, pad_width, mode)``: the gradient with respect to
    x, given the gradient ``grad`` with respect to the padded array. Modes "constant"/"zeros",
    "reflect", "edge"/"replicate", "wrap"/"circular" and "symmetric"; pad_width in np.pad's forms.

    >>> import numpy as np, convfast
    >>> convfast.pad_adjoint(np.ones(6), (2, 1), mode="reflect")
    array([1., 3., 2.])
    """
    func = "convfast.pad_adjoint"
    g = as_array(func, "grad", grad)
    if not isinstance(mode, str):
        raise TypeError(f"{func}: mode must be a string, got {mode!r}")
    key = mode.lower()
    key = {"constant": "zeros", "edge": "replicate", "wrap": "circular"}.get(key, key)
    if key not in ("zeros", "reflect", "replicate", "circular", "symmetric"):
        raise ValueError(f"{func}: mode must be one of constant, reflect, edge, wrap, symmetric (or zeros, "
                         f"replicate, circular), got {mode!r}")
    widths = _ops.normalize_pad_width(func, pad_width, g.ndim)
    for axis, (n, (b, a)) in enumerate(zip(g.shape, widths)):
        size = n - b - a
        if size < 1 or (key == "reflect" and max(a, b) >= size and (a or b)):
            raise ValueError(f"{func}: grad axis {axis} has {n} entries, too few for pad widths {(b, a)} with mode "
                             f"{mode!r}")
    out = g
    for axis, (n, (b, a)) in enumerate(zip(g.shape, widths)):
        out = _fold_axis(out, axis, b, n - b - a, key)
    return out.copy() if np.may_share_memory(out, g) else np.ascontiguousarray(out)


# ----------------------------------------------------------------------------------------------
# The weight gradient: a correlation of the (padded) input with the output gradient
# ----------------------------------------------------------------------------------------------

# Bound on the tap slab (the im2col columns of one chunk of kernel taps), in bytes.
_SLAB_BYTES = 64 << 20
# Groups with at most this many (C_in/G x C_out/G) weights per tap (2 x 2, 1 x 5..7; depthwise
# and channel multipliers up to 4 take the compiled depthwise path instead) are contracted per tap
# by NumPy's einsum: as a GEMM each group fills a micro-kernel tile (6 x 16 with AVX2) to a few
# percent. From 8 weights on, the compiled GEMM wins even so, being multi-threaded. Measured
# (grad_weight alone, 2 threads, einsum / compiled): ResNeXt 4 x 4, 32 groups at 56x56, 77 / 48 ms
# float32, 150 / 56 ms float64; 2 x 8 and 1 x 16 at 28x28 1.7-3.1x; 1 x 8 and 8 x 1 at 56x56
# 0.92-0.98x float32, 1.33-1.85x float64; but 2 x 2 (64 groups at 56x56) 0.40x / 0.77x.
_SMALL_GROUP = 7
# Ca/G = 1 and at most this many output channels per group: the compiled kernel's depthwise path
# (kMaxMultiplier in cpp/conv/weight_grad/common.hpp).
_DEPTHWISE_MULTIPLIER = 4


def _pad_in_memory_order(a: np.ndarray, widths, mode: str) -> np.ndarray:
    """convfast.pad(a, widths, mode), its result laid out in a's axis order in memory (a channels-last
    input stays channels-last underneath its canonical view), so that the windows read from it
    walk memory in the same order as the output gradient they are multiplied with."""
    order = sorted(range(a.ndim), key=lambda axis: -abs(a.strides[axis]))   # outermost first
    padded = _ops.pad(a.transpose(order), [widths[axis] for axis in order], mode=mode)
    return padded.transpose(np.argsort(order))


def _weight_grad(a: np.ndarray, b: np.ndarray, groups: int, pads, mode: str, stride, dilation, kernel,
                 dtype) -> np.ndarray:
    """``out[cb, ca, t] = sum_{n, o} A[n, G(cb) * Ca_g + ca, t * dilation + o * stride] * b[n, cb, o]``
    for every kernel tap t, with A = ``a`` (N, Ca, *La) padded by ``pads`` in ``mode``, b (N, Cb, *O)
    and G(cb) the group of output channel cb. Returns (Cb, Ca_g, *kernel) in ``dtype``.

    Per group this is a GEMM with K = N * prod(O). Three ways to compute it:

    * NumPy arrays, groups with more than ``_SMALL_GROUP`` weights per tap: the compiled kernel
      ``_core.weight_grad`` (cpp/conv/weight_grad/). It reads ``a`` unpadded, through the
      padding mode, in any layout, packs ``b`` once and runs the micro-kernel with rows = Cb/G,
      vector lanes = Ca/G, multi-threaded and bitwise independent of the thread count. The same
      entry point handles depthwise and channel-multiplier groups (Ca/G = 1, Cb/G <= 4) with a
      streaming kernel, one output channel per thread, and layers with at most 8 input channels per
      group (RGB stems, 3-D 1 -> 32) by rows of pixels in the vector lanes, without packing.
    * other groups with at most ``_SMALL_GROUP`` weights per tap (2 x 2, 1 x 5..7), or depthwise
      groups of other array types: ``np.einsum`` per tap over strided windows of the padded ``a``.
    * other array types (arrays that implement NumPy's ``__array_function__``, which the compiled
      kernel cannot read): the strided windows of the padded ``a``, one per tap
      (``A[..., t*d : t*d + (O-1)*s + 1 : s]``), are copied into a slab in chunks of taps and the
      product runs through ``conv1d`` as a 1x1 convolution (K as the input channels, groups as
      groups); the larger of Ca/G and Cb/G becomes its pixel dimension, the other the output
      channels.

    (The identity of the issue, "a convolution with batch and channels swapped and stride and
    dilation exchanged", computes the same thing in one engine call, but the engine then sees
    prod(O) kernel taps and prod(kernel) output pixels per image, a shape its per-tap packing
    handles 3-10x slower than the slab GEMM, as measured on the layer suite.)"""
    rank = len(kernel)
    n, G = a.shape[0], groups
    ca_g, cb = a.shape[1] // G, b.shape[1]
    cb_g = cb // G
    out_spatial = tuple(b.shape[2:])
    taps = list(itertools.product(*(range(k) for k in kernel)))
    # Allocations follow the operands' array type (np.*_like), so the glue is backend-neutral.
    out = np.empty_like(b, shape=(cb, ca_g) + tuple(kernel), dtype=dtype, order="C")
    if out.size == 0:
        return out
    if a.size == 0 or b.size == 0:
        out[...] = 0
        return out
    native = ca_g * cb_g > _SMALL_GROUP or (ca_g == 1 and cb_g <= _DEPTHWISE_MULTIPLIER)
    if native and type(a) is np.ndarray and type(b) is np.ndarray and type(out) is np.ndarray:
        a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
        lead = (1,) * (3 - rank)
        unit = (slice(None), slice(None)) + (None,) * (3 - rank)  # 5-D views with unit leading axes
        _core.weight_grad(a[unit], b[unit], out[unit], G, lead + tuple(kernel), lead + tuple(stride),
                          lead + tuple(dilation), (0,) * (3 - rank) + tuple(p for p, _ in pads), PADDING_MODES[mode])
        return out
    if any(p for pair in pads for p in pair):
        a = _pad_in_memory_order(a, ((0, 0), (0, 0)) + tuple(pads), mode)
    if a.dtype != dtype or b.dtype != dtype:
        # e.g. a float64 weight with float32 data, or float16 data computed as float32 (einsum
        # would otherwise accumulate in float16)
        a, b = a.astype(dtype), b.astype(dtype)
    a = a.reshape((n, G, ca_g) + a.shape[2:])  # a view of the canonical (possibly strided) array

    def window(tap):  # (N, G, Ca_g, *O): the input pixels that tap t multiplies, a strided view
        return a[(slice(None),) * 3 + tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                                            for t, d, o, s in zip(tap, dilation, out_spatial, stride))]

    flat = out.reshape(G, cb_g, ca_g, len(taps))  # a view: writes land in out
    if ca_g * cb_g <= _SMALL_GROUP:
        # einsum's unoptimised path: one fused multiply-accumulate pass over b and the strided
        # window, no temporary (2-3x faster than multiply-then-sum on the depthwise layers).
        bg = b.reshape((n, G, cb_g) + out_spatial)
        letters = "ijk"[:rank]
        subscripts = f"ngb{letters},nga{letters}->gba"
        for i, tap in enumerate(taps):
            flat[..., i] = np.einsum(subscripts, bg, window(tap))
        return out

    k_len = n * math.prod(out_spatial)
    per_tap = G * k_len * ca_g * np.dtype(dtype).itemsize
    chunk = max(1, min(len(taps), _SLAB_BYTES // max(per_tap, 1)))
    conv1d = _ops.conv1d
    if ca_g >= cb_g:
        # pixels = Ca/G, batch = taps: slab (taps, G * K, Ca_g), weight = b as (Cb, K, 1)
        weight = np.ascontiguousarray(b.swapaxes(0, 1)).reshape(cb, k_len, 1)
        for start in range(0, len(taps), chunk):
            part = taps[start:start + chunk]
            slab = np.empty_like(a, shape=(len(part), G, n) + out_spatial + (ca_g,), dtype=dtype, order="C")
            for j, tap in enumerate(part):
                slab[j] = np.moveaxis(window(tap), 2, -1).swapaxes(0, 1)
            res = conv1d(slab.reshape(len(part), G * k_len, ca_g), weight, groups=G)   # (taps, Cb, Ca_g)
            flat[..., start:start + len(part)] = np.moveaxis(res, 0, -1).reshape(G, cb_g, ca_g, len(part))
    else:
        # pixels = Cb/G: input = b as (1, G * K, Cb_g), weight = slab (G * taps * Ca_g, K, 1)
        inp = np.ascontiguousarray(np.moveaxis(b.reshape((n, G, cb_g) + out_spatial), 2, -1).swapaxes(0, 1))
        inp = inp.reshape(1, G * k_len, cb_g)
        for start in range(0, len(taps), chunk):
            part = taps[start:start + chunk]
            slab = np.empty_like(a, shape=(G, len(part), ca_g, n) + out_spatial, dtype=dtype, order="C")
            for j, tap in enumerate(part):
                slab[:, j] = np.moveaxis(window(tap), 0, 2)
            res = conv1d(inp, slab.reshape(G * len(part) * ca_g, k_len, 1), groups=G)  # (1, G*taps*Ca_g, Cb_g)
            flat[..., start:start + len(part)] = res.reshape(G, len(part), ca_g, cb_g).transpose(0, 3, 2, 1)
    return out


# ----------------------------------------------------------------------------------------------
# The N-D backward passes
# ----------------------------------------------------------------------------------------------

def _finish(spec: ConvSpec, gx, gw, gb, wrap) -> ConvGrads:
    return ConvGrads(None if gx is None else wrap(gx), None if gw is None else wrap(gw),
                     None if gb is None else wrap(gb))


def _bias_grad(spec: ConvSpec, gy: np.ndarray, dtype) -> np.ndarray:
    canonical = spec.canonical_output(gy)
    return canonical.sum(axis=(0,) + tuple(range(2, 2 + spec.rank)), dtype=dtype)


# The geometry of the adjoints, shared by the CPU passes below and the GPU ones
# (convfast.cuda._backward), so that both compute the same operators.

def grad_dtype(spec: ConvSpec, x, weight, gy) -> np.dtype:
    """The gradients' dtype: float32 when x, weight and grad_output are all float32, else float64
    (the operands may be NumPy arrays or stand-ins with their dtype)."""
    return compute_dtype(spec.func, x=x, weight=weight, grad_output=gy)


def data_format(spec: ConvSpec) -> str:
    return "channels_last" if spec.channels_last else "channels_first"


def conv_unread(spec: ConvSpec) -> Tuple[int, ...]:
    """Per axis of a convolution: r = P - L, the trailing pixels of the padded input (length P)
    that the forward never read (it read L = (O - 1) s + effective kernel) because the floor
    division of the output size dropped them. Its grad_input is the transposed convolution with
    output_padding r."""
    padded = [n + pb + pa for n, (pb, pa) in zip(spec.in_spatial, spec.pads)]
    used = [(o - 1) * s + effective_kernel(k, d)
            for o, s, k, d in zip(spec.out_spatial, spec.stride, spec.kernel, spec.dilation)]
    return tuple(p - u for p, u in zip(padded, used))


def transpose_adjoint_geometry(spec: ConvSpec):
    """(keep, pads, reached) for the adjoint of a transposed convolution.

    The transposed convolution computes the full output F = (S - 1) s + d (k - 1) + 1 per axis,
    crops p_before / p_after and appends output_padding pixels (beyond F they are zeros that no
    input reaches). Its adjoint re-pads grad_output with zeros to F: ``pads`` (p_before, p_after -
    output_padding), or, where output_padding exceeds p_after, drops grad_output's last pixels
    (``keep`` pixels per axis are kept). ``reached`` is False when every output pixel lies in the
    output_padding: y does not depend on x, and both gradients are zero."""
    full = [(n - 1) * s + effective_kernel(k, d)
            for n, s, k, d in zip(spec.in_spatial, spec.stride, spec.kernel, spec.dilation)]
    keep = [min(o, f - pb) for o, f, (pb, _) in zip(spec.out_spatial, full, spec.pads)]
    pads = tuple((pb, max(pa - op, 0)) for (pb, pa), op in zip(spec.pads, spec.output_padding))
    return keep, pads, min(keep) >= 1


def crop_grad_output(spec: ConvSpec, gy, keep, reached):
    """grad_output restricted to the pixels the full transposed output covers (a view of gy, or gy
    itself); works on any array that slices like NumPy (the GPU path applies it to a stand-in)."""
    return _crop_spatial(spec, gy, keep) if reached and keep != list(spec.out_spatial) else gy


def conv_backward_spec(spec: ConvSpec, gy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                       needs: Tuple[bool, bool, bool]):
    """Gradients of the convolution ``spec`` (validated arrays, caller's layouts); NumPy results."""
    r = spec.rank
    dtype = grad_dtype(spec, x, weight, gy)
    fmt = data_format(spec)
    unread = conv_unread(spec)
    gx = gw = gb = None

    if needs[0]:
        conv_t = getattr(_ops, f"conv_transpose{r}d")
        if spec.padding_mode == "zeros":
            gx = conv_t(gy, weight, None, spec.stride, spec.pads, unread, spec.groups, spec.dilation,
                        data_format=fmt)
        else:  # the gradient with respect to the padded input, then the padding's adjoint
            gx = conv_t(gy, weight, None, spec.stride, 0, unread, spec.groups, spec.dilation, data_format=fmt)
            for axis, n, (pb, _) in zip(_spatial_axes(spec), spec.in_spatial, spec.pads):
                gx = _fold_axis(gx, axis, pb, n, spec.padding_mode)
            gx = np.ascontiguousarray(gx)
        if gx.dtype != dtype:
            gx = gx.astype(dtype)

    if needs[1]:
        gw = _weight_grad(spec.canonical_input(x), spec.canonical_output(gy), spec.groups, spec.pads,
                          spec.padding_mode, spec.stride, spec.dilation, spec.kernel, dtype)

    if needs[2]:
        gb = _bias_grad(spec, gy, dtype)
    return gx, gw, gb


def conv_transpose_backward_spec(spec: ConvSpec, gy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                                 needs: Tuple[bool, bool, bool]):
    """Gradients of the transposed convolution ``spec``; NumPy results."""
    r = spec.rank
    dtype = grad_dtype(spec, x, weight, gy)
    fmt = data_format(spec)
    keep, pads, reached = transpose_adjoint_geometry(spec)
    gy_in = crop_grad_output(spec, gy, keep, reached)
    gx = gw = gb = None

    if needs[0]:
        if reached:
            conv = getattr(_ops, f"conv{r}d")
            gx = conv(gy_in, weight, None, spec.stride, pads, spec.dilation, spec.groups, data_format=fmt)
            if gx.dtype != dtype:
                gx = gx.astype(dtype)
        else:
            gx = np.zeros(x.shape, dtype)

    if needs[1]:
        shape = (spec.in_channels, spec.out_channels // spec.groups) + spec.kernel
        if reached:
            gw = _weight_grad(spec.canonical_output(gy_in), spec.canonical_input(x), spec.groups, pads, "zeros",
                              spec.stride, spec.dilation, spec.kernel, dtype)
        else:
            gw = np.zeros(shape, dtype)

    if needs[2]:
        gb = _bias_grad(spec, gy, dtype)
    return gx, gw, gb


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

_arrays = _ops._arrays  # the forward operators' operand conversion


# Specs of backward calls on NumPy arrays, by the forward's call signature (functional.call_key):
# a seen signature skips the normalisation, as the forward's fast path does.
_SPECS: dict = {}


def _run(name: str, device, grad_output, x, weight, bias, needs, make_spec, backward_spec, params) -> ConvGrads:
    """One backward call: where it runs follows the forward's rules (convfast.cuda._dispatch:
    the GPU iff x is a GPU array or device="cuda"); the arguments are validated by the same spec
    either way, ``make_spec(x, weight, bias)`` being the forward's conv_spec / conv_transpose_spec.
    ``params``: the call's parameters as given, for the signature of the kept specs."""
    key = _ops.call_key(name, x, weight, bias, params) if device is None and type(grad_output) is np.ndarray else None
    if key is not None:
        spec = _SPECS.get(key)
        if spec is not None:
            gy = _grad_output(name, spec, grad_output)
            return ConvGrads(*backward_spec(spec, gy, x, weight, _needs(name, needs, bias is not None)))
    if select_device(name, device, x, weight=weight, bias=bias, grad_output=grad_output) == "cuda":
        engine = cuda_backend(name)  # imports numba; RuntimeError naming the function without a GPU
        from .cuda import _backward as gpu
        xa, wa = engine.operand(name, "x", x), engine.operand(name, "weight", weight)
        ba = None if bias is None else engine.operand(name, "bias", bias)
        gya = engine.operand(name, "grad_output", grad_output)
        # The spec only reads shapes and dtypes: device arrays are seen through NumPy stand-ins.
        spec = make_spec(engine.meta(xa), engine.meta(wa), engine.meta(ba))
        mask = _needs(name, needs, bias is not None)
        _grad_output(name, spec, engine.meta(gya))
        return ConvGrads(*gpu.backward(spec, x, xa, wa, gya, mask))
    wrap = output_wrapper(x)
    x, weight, bias = _arrays(name, x, weight, bias)
    spec = make_spec(x, weight, bias)
    mask = _needs(name, needs, bias is not None)
    gy = _grad_output(name, spec, grad_output)
    if key is not None:
        if len(_SPECS) >= _ops._MAX_CALLS:
            _SPECS.clear()
        _SPECS[key] = spec
    return _finish(spec, *backward_spec(spec, gy, x, weight, mask), wrap)


def _make_conv_backward(rank: int):
    name = f"conv{rank}d_backward"

    def conv_backward(grad_output, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                      padding_mode="zeros", data_format="channels_first", needs=None, device=None):
        def make_spec(xa, wa, ba):
            return conv_spec(name, rank, xa, wa, ba, stride, padding, dilation, groups, padding_mode, data_format)
        return _run(name, device, grad_output, x, weight, bias, needs, make_spec, conv_backward_spec,
                    (stride, padding, dilation, groups, padding_mode, data_format))

    conv_backward.__name__ = conv_backward.__qualname__ = name
    conv_backward.__doc__ = f"""Gradients of convfast.conv{rank}d: the forward call's arguments, grad_output in front.

    Parameters
    ----------
    grad_output : array of the forward output's shape and layout: dLoss/dy.
    x, weight, bias, stride, padding, dilation, groups, padding_mode, data_format : exactly as given
        to ``conv{rank}d`` (every padding form and mode, channels_last, unbatched). ``bias`` is only
        looked at for its shape, and to decide whether grad_bias is computed by default.
    needs : (input, weight, bias) bools, PyTorch's ``output_mask``: gradients not needed are not
        computed and returned as None. Default: (True, True, bias is not None).
    device : None (default: the GPU iff x is a GPU array -- CuPy, PyTorch CUDA, Numba device array
        -- and the CPU otherwise), "cuda" (host inputs are copied to the GPU, the gradients come
        back to the host as x's kind) or "cpu" (a GPU operand is a ValueError): the forward's rules,
        see docs/gpu.md.

    Returns
    -------
    ConvGrads(grad_input, grad_weight, grad_bias): grad_input in x's shape and layout, grad_weight in
    weight's, grad_bias (C_out,); float32 when every operand is float32, else float64. A GPU x gives
    GPU arrays of x's kind.

    grad_input is conv_transpose{rank}d(grad_output, weight) (followed, for a padding mode other than
    zeros, by the adjoint of the padding), grad_weight a correlation of x with grad_output (a GEMM
    per kernel tap over batch and output pixels), grad_bias the sum of grad_output over batch and
    space.

    Example
    -------
    >>> import numpy as np, convfast
    >>> x = np.ones((1, 1, {", ".join(["5"] * rank)}))
    >>> w = np.ones((1, 1, {", ".join(["3"] * rank)}))
    >>> y = convfast.conv{rank}d(x, w, stride=2, padding="same")
    >>> gx, gw, gb = convfast.conv{rank}d_backward(np.ones_like(y), x, w, stride=2, padding="same")
    >>> gx.shape, gw.shape, gb
    (({", ".join(["1", "1"] + ["5"] * rank)}), ({", ".join(["1", "1"] + ["3"] * rank)}), None)
    """
    return conv_backward


def _make_conv_transpose_backward(rank: int):
    name = f"conv_transpose{rank}d_backward"

    def conv_transpose_backward(grad_output, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                                dilation=1, *, output_size=None, data_format="channels_first", needs=None,
                                device=None):
        def make_spec(xa, wa, ba):
            return conv_transpose_spec(name, rank, xa, wa, ba, stride, padding, output_padding, groups, dilation,
                                       output_size, data_format)
        return _run(name, device, grad_output, x, weight, bias, needs, make_spec, conv_transpose_backward_spec,
                    (stride, padding, output_padding, groups, dilation, output_size, data_format))

    conv_transpose_backward.__name__ = conv_transpose_backward.__qualname__ = name
    conv_transpose_backward.__doc__ = f"""Gradients of convfast.conv_transpose{rank}d: the forward call's arguments,
    grad_output in front.

    Parameters
    ----------
    grad_output : array of the forward output's shape and layout: dLoss/dy.
    x, weight, bias, stride, padding, output_padding, groups, dilation, output_size, data_format :
        exactly as given to ``conv_transpose{rank}d``. ``bias`` is only looked at for its shape.
    needs : (input, weight, bias) bools; default (True, True, bias is not None).
    device : None (the GPU iff x is a GPU array), "cuda" or "cpu", as for conv{rank}d_backward.

    Returns
    -------
    ConvGrads(grad_input, grad_weight, grad_bias). grad_input is conv{rank}d(grad_output, weight)
    with the cropped pixels restored as zero padding; grad_weight (C_in, C_out/groups, *kernel) a
    correlation of grad_output with x; grad_bias the sum of grad_output over batch and space.
    """
    return conv_transpose_backward


conv1d_backward, conv2d_backward, conv3d_backward = (_make_conv_backward(r) for r in (1, 2, 3))
conv_transpose1d_backward, conv_transpose2d_backward, conv_transpose3d_backward = (
    _make_conv_transpose_backward(r) for r in (1, 2, 3))

__all__ = ["ConvGrads", "conv1d_backward", "conv2d_backward", "conv3d_backward", "conv_transpose1d_backward",
           "conv_transpose2d_backward", "conv_transpose3d_backward", "pad_adjoint",
           "conv_backward_spec", "conv_transpose_backward_spec"]
