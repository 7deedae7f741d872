"""The backward passes on the GPU: ``convfast.conv*_backward`` / ``conv_transpose*_backward`` for
calls that run on the GPU (a GPU x, or device="cuda"; see convfast.backward._run, which validates
the arguments with the forward's spec and calls ``backward`` here). Imported lazily: it imports
numba.cuda.

The operators are those of the CPU passes (convfast.backward: the same geometry helpers, so the two
cannot drift apart):

* grad_input: the GPU forward engine (``_engine.compute``) on device arrays. A convolution's is the
  transposed convolution of grad_output (zeros padding: cropped by it directly; another mode: the
  gradient with respect to the padded input, folded back by ``fold_kernel``, the gather form of the
  padding's adjoint); a transposed convolution's is the convolution of the cropped grad_output.
* grad_weight: ``wgrad_gemm_kernel`` (or ``wgrad_small_kernel`` for groups with at most
  SMALL_WEIGHTS = 16 weights per tap, the CPU's _SMALL_GROUP), reading the unpadded input through
  the padding mode, split over K = N * prod(O) into chunks whose partial sums ``split_sum_kernel``
  adds in a fixed order.
* grad_bias: ``bias_kernel`` (per channel and K chunk, a shared-memory tree), then the same sum.

No atomics: every result is bitwise independent of the launch grid. Results are allocated as the
forward's are (``_engine._allocator``: torch / CuPy pools for their arrays, Numba otherwise); with
host operands (device="cuda") they come back to the host as x's kind.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import numpy as np

from .. import backward as _bw
from .. import functional as _functional
from .._interop import output_wrapper
from .._spec import PADDING_MODES, ConvSpec, conv_spec, conv_transpose_spec
from . import _backward_kernels as _bk
from . import _engine
from ._engine import _grid, _launch, five, meta, view

# Split-K: a reduction is split into more chunks until about this many blocks are in flight (a
# fixed target, never the launch grid, so the partition, and with it the rounding, depends on the
# shape alone), but no chunk is shorter than _MIN_CHUNK[kernel] reduction indices (each chunk
# costs a partial row and its addition). First guesses, not measured on a GPU (docs/gpu.md).
_TARGET_BLOCKS = 512
_MIN_CHUNK = {"gemm": 1024, "small": 4096, "bias": 8192}
_THREADS_1D = 256
# Block size of the reduction kernels: the simulator runs a thread per CUDA thread (and a barrier
# across all of them per tree step), so it gets one warp's worth; the kernels are the same code.
_REDUCE_THREADS = 32 if _engine.SIMULATED else _bk.REDUCE_THREADS


def _split(k_total: int, blocks: int, kind: str, align: int) -> Tuple[int, int]:
    """(splits, chunk): K in ``splits`` chunks of ``chunk`` indices (a multiple of ``align``, the
    kernel's K step), enough to give about _TARGET_BLOCKS blocks with ``blocks`` per chunk."""
    want = -(-_TARGET_BLOCKS // max(blocks, 1))
    splits = max(1, min(want, k_total // _MIN_CHUNK[kind]))
    chunk = -(-max(k_total, 1) // splits)
    chunk = -(-chunk // align) * align
    return max(1, -(-k_total // chunk)), chunk


def _launch_flat(kernel, total: int, stream, *args):
    _launch(kernel, _grid(-(-total // _THREADS_1D))[0], _THREADS_1D, stream, *args)


def _flat(d):
    """A 1-D view of a C-contiguous device array (results and workspaces are allocated so)."""
    return view(d, lambda a: a.reshape(-1))


def _reduce_into(out_d, partial, stream, dtype):
    """out_d (C-contiguous) = the sum over the rows of ``partial`` (splits, out_d.size); with one
    split the kernels wrote out_d directly (``partial`` is then a view of it)."""
    if partial.shape[0] > 1:
        _launch_flat(_bk.split_sum_kernel(dtype.name), out_d.size, stream, partial, _flat(out_d))


def _partial_rows(out_d, splits: int, alloc, dtype):
    if splits == 1:
        return view(out_d, lambda a: a.reshape(1, -1))
    return alloc((splits, out_d.size), dtype)[1]


def _radix_digits(step: int, extents) -> Tuple[int, int, int, int]:
    """``step`` in the mixed radix (n, od, oh, ow) of a reduction index: the digits the weight-gradient
    GEMM adds to its carried counters per K tile (the kernels divide nowhere in their K loop)."""
    o_d, o_h, o_w = (int(e) for e in extents)
    q, dw = divmod(step, o_w)
    q, dh = divmod(q, o_h)
    dn, dd = divmod(q, o_d)
    return dn, dd, dh, dw


def _weight_grad(spec: ConvSpec, a5, b5, out_d, dtype, alloc, stream) -> None:
    """out_d[cb, ca, *t] = sum_{n, o} A_pad[n, G(cb) Ca_g + ca, t d + o s] B[n, cb, o] (see
    backward._weight_grad): a5 (N, Ca, *L), b5 (N, Cb, *O) 5-D views, out_d (Cb, Ca_g, *kernel).
    A is padded by the spec's pads before, in its mode (a transposed spec: zeros, and its pads
    are those of the adjoint, transpose_adjoint_geometry's, which share p_before)."""
    g = spec.groups
    cb_g, ca_g = b5.shape[1] // g, a5.shape[1] // g
    taps = math.prod(spec.kernel)
    k_total = b5.shape[0] * b5.shape[2] * b5.shape[3] * b5.shape[4]
    kernel3 = _functional._padded3(spec.kernel, spec.rank, 1)
    # The forward kernels' stride / dilation / pads: a stride that never steps and a dilation that
    # never spreads become 1, and coordinates beyond 64-bit index arithmetic are refused naming the
    # function (o runs over b5's pixels: the output's for a convolution, x's for a transposed one,
    # exactly the axis whose extent decides whether the stride steps).
    _, stride3, dilation3, pad3, mode = _functional._kernel_params(spec)
    if k_total == 0:  # an empty batch: nothing to sum
        _zero(out_d, dtype, stream)
        return
    # Both operands as flat views read through element offsets (base, then the 5 strides).
    a1, a_base, a_strides = _engine.flat(a5)
    b1, b_base, b_strides = _engine.flat(b5)
    geometry = (a_base,) + a_strides + (b_base,) + b_strides + tuple(a5.shape[2:]) + tuple(b5.shape[2:]) + \
        (b5.shape[0], kernel3[1], kernel3[2]) + stride3 + dilation3 + pad3
    if ca_g * cb_g <= _bk.SMALL_WEIGHTS:
        splits, chunk = _split(k_total, g * taps, "small", 1)
        kernel = _bk.wgrad_small_kernel(dtype.name, _REDUCE_THREADS, mode, _bk.small_lanes(ca_g * cb_g))
        grid, threads, extra = _grid(splits * g * taps), _REDUCE_THREADS, ()
    else:
        tile = "wide" if min(ca_g, cb_g) >= 32 else "narrow"
        bm, bn, bk = _bk.WGRAD_TILES[tile][:3]
        tiles = -(-cb_g // bm) * -(-ca_g // bn)
        splits, chunk = _split(k_total, tiles * g * taps, "gemm", bk)
        kernel = _bk.wgrad_gemm_kernel(dtype.name, tile, _engine._inner_channels(a5), _engine._inner_channels(b5),
                                       mode)
        grid, threads = _grid(-(-cb_g // bm), -(-ca_g // bn), g * taps * splits), 256
        extra = _radix_digits(bk, b5.shape[2:])  # the K tile in the (n, od, oh, ow) radix
    partial = _partial_rows(out_d, splits, alloc, dtype)
    _launch(kernel, grid, threads, stream, a1, b1, partial, *geometry, g, cb_g, ca_g, taps, splits, chunk, *extra)
    _reduce_into(out_d, partial, stream, dtype)


def _bias_grad(spec: ConvSpec, gy5, out_d, dtype, alloc, stream) -> None:
    channels = gy5.shape[1]
    k_total = gy5.shape[0] * gy5.shape[2] * gy5.shape[3] * gy5.shape[4]
    splits, chunk = _split(k_total, channels, "bias", 1)
    partial = _partial_rows(out_d, splits, alloc, dtype)
    _launch(_bk.bias_kernel(dtype.name, _REDUCE_THREADS), _grid(splits * channels), _REDUCE_THREADS, stream, gy5,
            partial, splits, chunk)
    _reduce_into(out_d, partial, stream, dtype)


def _zero(out_d, dtype, stream) -> None:
    _launch_flat(_bk.fill_zero_kernel(dtype.name), out_d.size, stream, _flat(out_d))


def _conv_grad_input(spec: ConvSpec, gyd, wd, out_d, dtype, alloc, stream) -> None:
    """A convolution's grad_input: conv_transpose(grad_output, weight) (backward.conv_backward_spec)."""
    zeros = spec.padding_mode == "zeros"
    # The forward engine's transposed convolution, in the gradients' dtype (its kernels cast on load).
    spec_t = conv_transpose_spec(spec.func, spec.rank, meta(gyd), meta(wd), None, spec.stride,
                                 spec.pads if zeros else 0, _bw.conv_unread(spec), spec.groups, spec.dilation,
                                 None, _bw.data_format(spec))
    spec_t = dataclasses.replace(spec_t, dtype=dtype)
    if zeros:
        _engine.compute(spec_t, gyd, wd, None, out_d, stream, None, alloc)
        return
    # The gradient with respect to the padded input (x's layout), folded back onto x.
    padded = alloc(spec_t.output_shape(), dtype)[1]
    _engine.compute(spec_t, gyd, wd, None, padded, stream, None, alloc)
    g5 = five(spec_t, padded, spec_t.canonical_output)
    gx5 = five(spec, out_d, spec.canonical_input)
    before = _functional._padded3(tuple(p for p, _ in spec.pads), spec.rank, 0)
    after = _functional._padded3(tuple(p for _, p in spec.pads), spec.rank, 0)
    _launch_flat(_bk.fold_kernel(dtype.name), gx5.size, stream, g5, gx5, *before, *after,
                 PADDING_MODES[spec.padding_mode])


def backward(spec: ConvSpec, x, xa, wa, gya, needs):
    """(grad_input, grad_weight, grad_bias) of the validated ``spec`` (conv or transposed) on the
    GPU; entries not in ``needs`` are None. ``x`` is the caller's object (it decides the results'
    kind), ``xa`` / ``wa`` / ``gya`` device arrays or NumPy arrays (``_engine.operand``)."""
    if not any(needs):
        return None, None, None
    stream = _engine._stream_for(x)
    on_device = not isinstance(xa, np.ndarray)
    dtype = _bw.grad_dtype(spec, meta(xa), meta(wa), meta(gya))
    alloc = _engine._allocator(x, stream)  # Numba device arrays for host x

    def device(a):  # host operands are copied to the device once, in the gradients' dtype
        return a if not isinstance(a, np.ndarray) else _engine._upload(a, dtype, stream)

    def result(shape):  # (the caller's object, its Numba view)
        return alloc(shape, dtype)

    # Only the operands a wanted gradient reads are uploaded: grad_input reads the weight,
    # grad_weight reads x, all three read grad_output.
    gyd = device(gya)
    wd = device(wa) if needs[0] else None
    xd = device(xa) if needs[1] else None
    x_shape, w_shape = tuple(meta(xa).shape), tuple(meta(wa).shape)
    gx = gw = gb = None

    if spec.transposed:
        keep, pads, reached = _bw.transpose_adjoint_geometry(spec)
        gy_in = view(gyd, lambda a: _bw.crop_grad_output(spec, a, keep, reached))
        if needs[0]:
            gx = result(x_shape)
            if not reached:
                _zero(gx[1], dtype, stream)
            elif gx[1].size:
                spec_c = conv_spec(spec.func, spec.rank, meta(gy_in), meta(wd), None, spec.stride, pads,
                                   spec.dilation, spec.groups, "zeros", _bw.data_format(spec))
                _engine.compute(dataclasses.replace(spec_c, dtype=dtype), gy_in, wd, None, gx[1], stream, None,
                                alloc)
        if needs[1]:
            gw = result(w_shape)
            if not reached:
                _zero(gw[1], dtype, stream)
            elif gw[1].size:
                # The roles of the convolution's swapped: A = the cropped grad_output, B = x.
                _weight_grad(spec, five(spec, gy_in, spec.canonical_output), five(spec, xd, spec.canonical_input),
                             gw[1], dtype, alloc, stream)
    else:
        if needs[0]:
            gx = result(x_shape)
            if gx[1].size:
                _conv_grad_input(spec, gyd, wd, gx[1], dtype, alloc, stream)
        if needs[1]:
            gw = result(w_shape)
            if gw[1].size:
                _weight_grad(spec, five(spec, xd, spec.canonical_input), five(spec, gyd, spec.canonical_output),
                             gw[1], dtype, alloc, stream)
    if needs[2]:
        gb = result((spec.out_channels,))
        if gb[1].size:
            _bias_grad(spec, five(spec, gyd, spec.canonical_output), gb[1], dtype, alloc, stream)

    if on_device:
        return tuple(None if r is None else r[0] for r in (gx, gw, gb))
    # Host x (device="cuda"): the gradients come back as host arrays of x's kind.
    wrap = output_wrapper(x)
    return tuple(None if r is None else wrap(_engine._host(r[1], stream) if r[1].size else np.zeros(r[1].shape, dtype))
                 for r in (gx, gw, gb))
