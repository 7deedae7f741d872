"""Chunked convolutions of Dask arrays: conv1d..conv3d and conv_transpose1d..conv_transpose3d on
``dask.array`` inputs, lazily, each output block computed by convfast's compiled kernels.

>>> import numpy as np, dask.array as da, convfast, convfast.dask
>>> x = da.random.default_rng(0).standard_normal((1, 1, 64, 64, 64), chunks=(1, 1, 32, 32, 32))
>>> w = np.ones((4, 1, 3, 3, 3)) / 27
>>> y = convfast.dask.conv3d(x, w, padding="same", padding_mode="reflect")
>>> y.shape, y.chunks[2]
((1, 4, 64, 64, 64), (32, 32))
>>> bool((y.compute() == convfast.conv3d(x.compute(), w, padding="same", padding_mode="reflect")).all())
True

Only imported when used (``import convfast`` never imports Dask); install with
``pip install "convfast[dask]"``. See docs/dask.md for the design.

Design: the block plan
----------------------
Nothing here uses ``map_overlap``. For every output block the plan computes, per spatial axis, the
coordinates of the (padded, for a forward convolution) input the block's windows read, maps them to
source indices with the padding-mode rule of the core (``map_padded_index`` in
cpp/include/convfast/spec.hpp), splits them into runs that lie in one input chunk, and builds the
gathered block from those runs: plain slices of the neighbouring chunks in the interior (so any
chunk size works, also chunks smaller than the halo: a block may read several chunks on each side),
reversed/repeated/wrapped index runs at the outer border for reflect, replicate, circular and
symmetric. convfast then runs with padding 0 on the gathered block, so interior chunk borders always
read real neighbour data and the outer border gets exactly the values the single big call would
read. For ``padding_mode="zeros"`` nothing is gathered for the padding: the block's share of the
border padding is passed to the convfast call as explicit (before, after) pads.

A transposed convolution needs no padding mode: an output block [u0, u1) (uncropped coordinates)
receives input i through tap t when u = i*stride + t*dilation, so it reads the input range
[ceil((u0 - (k-1)*dilation) / stride), floor((u1 - 1) / stride)]; the block is computed by a
conv_transpose call on that slice whose explicit padding crops exactly [u0, u1) out of the slice's
full output; outputs the slice cannot reach (stride gaps, output_padding) are bias only.

Why the result is the single big call, bit for bit: convfast computes every output element as the
same sequence of fused multiply-adds over (input channel, tap) whatever the output blocking, and
the block calls keep that sequence: the taps are the same (forward: all of them; transposed: the
stride phase of an output is its coordinate modulo the stride, unchanged because a slice starts at
a multiple of the stride), and the values read are identical (the padding values are gathered from
the same source indices). A transposed slice is never one input long when the whole axis is longer,
because the engine treats the stride of a one-input axis as 1, which would merge stride phases and
change the K blocking of the GEMM. The one thing a block call can change is the engine's choice
between its two algorithms (GEMM and direct rows), a heuristic that looks at the sizes, which
gives the same bits. Layers that run Winograd F(m, 3) (stride 1, 3x3 or 3x3x3 taps, enough
channels per group) agree within rounding only: its tiles start at each block's origin; so do
transposed layers of small inputs, which the scatter GEMM may take for some calls and not others
(CONVFAST_ALGO=gemm makes both bitwise again; see docs/dask.md).

The weight (and the bias) go into the graph once, as a single key each, that every block task
depends on, so a distributed scheduler ships them to each worker once, not once per chunk.
"""
from __future__ import annotations

import itertools
import warnings
from typing import List, Sequence, Tuple

import numpy as np

try:
    import dask.array as da
    from dask.array.core import PerformanceWarning
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError('convfast.dask needs Dask: pip install "convfast[dask]" (dask[array] and distributed)') from exc

from . import functional as _functional
from ._spec import ConvSpec, as_array, conv_spec, conv_transpose_spec, effective_kernel

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]


# ----------------------------------------------------------------------------------------------
# Operands
# ----------------------------------------------------------------------------------------------

def _placeholder(shape, dtype) -> np.ndarray:
    """A zero-memory array with the given shape and dtype: lets the in-memory validation
    (_spec.conv_spec / conv_transpose_spec, which read only .ndim, .shape and .dtype) judge a Dask
    operand, so errors are exactly those of the in-memory API."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _check_known_shape(func: str, name: str, a) -> None:
    if any(np.isnan(c) for axis in a.chunks for c in axis):
        raise ValueError(f"{func}: {name} has unknown chunk sizes {a.chunks}; call {name}.compute_chunk_sizes() "
                         f"first")


def _dask_input(func: str, x):
    if not isinstance(x, da.Array):
        in_memory = "convfast." + func.rsplit(".", 1)[-1]
        raise TypeError(f"{func}: x must be a dask.array.Array, got {type(x).__name__} (use {in_memory} for "
                        f"in-memory arrays, or wrap it with dask.array.from_array(x, chunks=...))")
    _check_known_shape(func, "x", x)
    return x


def _operand(func: str, name: str, value):
    """(placeholder for validation, concrete value or dask array) of weight / bias."""
    if value is None:
        return None, None
    if isinstance(value, da.Array):
        _check_known_shape(func, name, value)
        return _placeholder(value.shape, value.dtype), value
    value = as_array(func, name, value)
    return value, value


class _Operand:
    """A weight or bias in the graph: one key holding the whole array, cast once to the compute
    dtype. A NumPy (or array-like) operand becomes a literal graph value; a Dask operand is
    rechunked to one chunk and that chunk's key is used, so it is computed once as well."""

    def __init__(self, name: str, value, dtype: np.dtype):
        if isinstance(value, da.Array):
            arr = value.astype(dtype).rechunk(value.shape)
            self.key = (arr.name,) + (0,) * arr.ndim
            self.layer = {}
            self.dependencies = [arr]
            self.token = arr.name
        else:
            arr = np.ascontiguousarray(value, dtype=dtype)
            self.token = tokenize(arr)
            self.key = f"convfast-{name}-{self.token}"
            self.layer = {self.key: arr}
            self.dependencies = []


# ----------------------------------------------------------------------------------------------
# Index arithmetic (vectorised over an axis; per-block Python only)
# ----------------------------------------------------------------------------------------------

def _map_padded_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Source index of (possibly out-of-range) coordinates i on an axis of length n, or -1 for a
    zero: the core's map_padded_index (cpp/include/convfast/spec.hpp), whose periodic forms equal
    np.pad's iterated reflection for any pad width (reflect itself is limited to pad < n by the
    spec)."""
    i = np.asarray(i, dtype=np.int64)
    inside = (i >= 0) & (i < n)
    if mode == "zeros":
        r = np.where(inside, i, -1)
    elif mode == "replicate":
        r = np.clip(i, 0, n - 1)
    elif mode == "circular":
        r = np.mod(i, n)
    elif mode == "reflect":
        if n == 1:
            r = np.zeros_like(i)
        else:
            period = 2 * (n - 1)
            r = np.mod(i, period)
            r = np.where(r < n, r, period - r)
    elif mode == "symmetric":
        period = 2 * n
        r = np.mod(i, period)
        r = np.where(r < n, r, period - 1 - r)
    else:  # pragma: no cover - normalised by the spec
        raise AssertionError(mode)
    return np.where(inside, i, r)


def _selector(local: np.ndarray):
    """A run of local indices as a slice when it is an arithmetic progression (the interior: a
    view, no copy), else as an index array (border runs of reflect, replicate, ...)."""
    first = int(local[0])
    if local.size == 1:
        return slice(first, first + 1)
    steps = np.diff(local)
    step = int(steps[0])
    if step != 0 and (steps == step).all():
        stop = int(local[-1]) + step
        return slice(first, stop if stop >= 0 else None, step)
    return local.astype(np.intp)


class _Run:
    """A stretch of an axis of a gathered block read from one input chunk (chunk < 0: zeros);
    ``whole`` when it is that entire chunk, in order."""

    __slots__ = ("chunk", "sel", "length", "whole")

    def __init__(self, chunk: int, sel, length: int, whole: bool = False):
        self.chunk, self.sel, self.length, self.whole = chunk, sel, length, whole


def _runs(seq: np.ndarray, starts: np.ndarray, sizes: Sequence[int]) -> List[_Run]:
    """Split source indices (-1 = zero) into maximal runs that lie in one input chunk."""
    cid = np.searchsorted(starts, seq, side="right") - 1
    cid[seq < 0] = -1
    cuts = np.flatnonzero(np.diff(cid)) + 1
    bounds = [0, *cuts.tolist(), len(seq)]
    runs = []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        c = int(cid[r0])
        if c < 0:
            runs.append(_Run(-1, None, r1 - r0))
            continue
        sel = _selector(seq[r0:r1] - starts[c])
        whole = isinstance(sel, slice) and sel.start == 0 and sel.stop == sizes[c] and sel.step in (None, 1)
        runs.append(_Run(c, sel, r1 - r0, whole))
    return runs


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _bounds_from_chunks(chunks: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def _output_chunks(in_bounds: np.ndarray, out: int, to_out) -> Tuple[int, ...]:
    """Output chunks aligned to the input chunks through ``to_out`` (input boundary -> output
    boundary: the stride is applied there, so output boundaries sit on stride multiples of the
    input); empty blocks (chunks smaller than the stride) are merged into their neighbours."""
    edges = np.clip(np.array([to_out(int(b)) for b in in_bounds[1:-1]], dtype=np.int64), 0, out)
    edges = np.unique(np.concatenate([[0], edges, [out]]))
    return tuple(int(v) for v in np.diff(edges))


class _AxisPlan:
    """What one output block reads along one spatial axis.

    forward:    runs (gathered input, -1 runs = zeros), pads = zero padding passed to the call.
    transposed: runs over the contributing input slice (empty: the block is bias only), pads =
                pixels the call crops from the slice's full output, start = where that result
                goes in the block, length = the block's size."""

    __slots__ = ("runs", "pads", "start", "result", "length")

    def __init__(self, runs, pads, start=0, result=0, length=0):
        self.runs, self.pads, self.start, self.result, self.length = runs, pads, start, result, length


def _forward_axis_plans(spec: ConvSpec, axis: int, out_chunks, in_chunks) -> List[_AxisPlan]:
    n, k, s, d = spec.in_spatial[axis], spec.kernel[axis], spec.stride[axis], spec.dilation[axis]
    pb = spec.pads[axis][0]
    eff = effective_kernel(k, d)
    starts = _bounds_from_chunks(in_chunks)[:-1]
    plans, o0 = [], 0
    for size in out_chunks:
        o1 = o0 + size
        # Source coordinates read by outputs [o0, o1): padded coordinate o*s + t*d, minus pad_before.
        a, b = o0 * s - pb, (o1 - 1) * s + eff - pb
        if spec.padding_mode == "zeros":
            lo, hi = min(max(a, 0), n), min(max(b, 0), n)
            if hi > lo:  # the call zero-pads the part outside the input itself
                plans.append(_AxisPlan(_runs(np.arange(lo, hi, dtype=np.int64), starts, in_chunks), (lo - a, b - hi)))
            else:  # the block's windows lie wholly in the padding: an explicit zero run
                plans.append(_AxisPlan([_Run(-1, None, b - a)], (0, 0)))
        else:
            seq = _map_padded_index(np.arange(a, b, dtype=np.int64), n, spec.padding_mode)
            plans.append(_AxisPlan(_runs(seq, starts, in_chunks), (0, 0)))
        o0 = o1
    return plans


def _transposed_axis_plans(spec: ConvSpec, axis: int, out_chunks, in_chunks) -> List[_AxisPlan]:
    n, k, s, d = spec.in_spatial[axis], spec.kernel[axis], spec.stride[axis], spec.dilation[axis]
    pb = spec.pads[axis][0]
    span = (k - 1) * d
    starts = _bounds_from_chunks(in_chunks)[:-1]
    plans, o0 = [], 0
    for size in out_chunks:
        o1 = o0 + size
        u0, u1 = o0 + pb, o1 + pb  # uncropped output coordinates
        i_lo, i_hi = max(0, _ceil_div(u0 - span, s)), min(n, (u1 - 1) // s + 1)
        if i_hi <= i_lo:  # no input reaches the block (stride gaps, output_padding): bias only
            plans.append(_AxisPlan(None, (0, 0), length=size))
            o0 = o1
            continue
        if i_hi - i_lo == 1 and n > 1 and s > 1:
            # The engine treats the stride of a one-input axis as 1, which merges the stride
            # phases (and so changes the GEMM's K blocking and the rounding); a second input, which
            # reaches only outputs outside the block, keeps the phases of the big call.
            if i_hi < n:
                i_hi += 1
            else:
                i_lo -= 1
        full = (i_hi - i_lo - 1) * s + span + 1  # the slice's uncropped output, from u = i_lo * s
        origin = i_lo * s
        crop_before = max(0, u0 - origin)
        crop_after = max(0, origin + full - u1)
        result = full - crop_before - crop_after
        start = origin + crop_before - u0
        assert result >= 1 and 0 <= start and start + result <= size, (axis, o0, o1)
        plans.append(_AxisPlan(_runs(np.arange(i_lo, i_hi, dtype=np.int64), starts, in_chunks),
                               (crop_before, crop_after),
                               start, result, size))
        o0 = o1
    return plans


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------

class _Layout:
    """Where batch, channels and the spatial axes are in the caller's layout."""

    def __init__(self, spec: ConvSpec):
        self.ndim = spec.rank + (2 if spec.batched else 1)
        lead = 1 if spec.batched else 0
        self.batch_axis = 0 if spec.batched else None
        self.channel_axis = self.ndim - 1 if spec.channels_last else lead
        first = lead if spec.channels_last else lead + 1
        self.spatial_axes = tuple(range(first, first + spec.rank))

    def index(self, batch, channel, spatial) -> tuple:
        """A block or selection tuple in the caller's axis order."""
        out = [None] * self.ndim
        if self.batch_axis is not None:
            out[self.batch_axis] = batch
        out[self.channel_axis] = channel
        for ax, v in zip(self.spatial_axes, spatial):
            out[ax] = v
        return tuple(out)


# ----------------------------------------------------------------------------------------------
# Tasks (run on the workers)
# ----------------------------------------------------------------------------------------------

class _Selection:
    """Outer indexing of one input chunk: a view for slices, np.take (a copy of only the selected
    rows) per axis with an index array. Opaque to the graph (not a tuple that could be taken for
    a task or a key)."""

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        basic = tuple(it if isinstance(it, slice) else slice(None) for it in self.items)
        out = chunk[basic]
        for axis, it in enumerate(self.items):
            if not isinstance(it, slice):
                out = np.take(out, it, axis=axis)
        return out


def _select(selection: _Selection, chunk: np.ndarray) -> np.ndarray:
    return selection(chunk)


class _BlockPlan:
    """Everything one output block task needs except its data: the gathered block's geometry
    (runs per spatial axis), the convfast call and, for transposed blocks, where the result goes."""

    def __init__(self, spec: ConvSpec, layout: _Layout, batch: int, axes: Sequence[_AxisPlan], x_dtype,
                 out_shape):
        self.rank = spec.rank
        self.transposed = spec.transposed
        self.layout = layout
        self.batch = batch
        self.in_channels = spec.in_channels
        self.x_dtype = np.dtype(x_dtype)
        self.dtype = spec.dtype
        self.out_shape = tuple(out_shape)
        self.run_lengths = [None if a.runs is None else [r.length for r in a.runs] for a in axes]
        self.starts = tuple(a.start for a in axes)
        self.results = tuple(a.result for a in axes)
        self.kwargs = dict(stride=spec.stride, padding=tuple(a.pads for a in axes), dilation=spec.dilation,
                           groups=spec.groups, data_format="channels_last" if spec.channels_last else "channels_first")
        if spec.transposed:
            self.kwargs["output_padding"] = 0

    @property
    def empty(self) -> bool:
        return any(lengths is None for lengths in self.run_lengths)

    def gathered(self, grid) -> np.ndarray:
        """The input block from its pieces (a nested list, one level per spatial axis; None = a
        zero piece). A single piece is used as it is (a view: convfast reads strided input)."""
        if len(self.run_lengths) and all(len(lengths) == 1 for lengths in self.run_lengths):
            piece = grid
            for _ in self.run_lengths:
                piece = piece[0]
            if piece is not None:
                return piece
        lay = self.layout
        shape = lay.index(self.batch, self.in_channels, [sum(lengths) for lengths in self.run_lengths])
        buf = np.empty(shape, dtype=self.x_dtype)
        offsets = [np.concatenate([[0], np.cumsum(lengths)]) for lengths in self.run_lengths]
        for combo in itertools.product(*(range(len(lengths)) for lengths in self.run_lengths)):
            piece = grid
            for i in combo:
                piece = piece[i]
            region = lay.index(slice(None), slice(None),
                               [slice(int(off[i]), int(off[i + 1])) for off, i in zip(offsets, combo)])
            buf[region] = 0 if piece is None else piece
        return buf


def _bias_fill(plan: _BlockPlan, bias) -> np.ndarray:
    """0 + bias in the compute dtype, the value the engine writes where no product lands."""
    y = np.zeros(plan.out_shape, dtype=plan.dtype)
    if bias is not None:
        shape = [1] * len(plan.out_shape)
        shape[plan.layout.channel_axis] = -1
        y += np.asarray(bias, dtype=plan.dtype).reshape(shape)
    return y


def _forward_block(plan: _BlockPlan, grid, weight, bias) -> np.ndarray:
    fn = getattr(_functional, f"conv{plan.rank}d")
    return fn(plan.gathered(grid), weight, bias, **plan.kwargs)


def _transposed_block(plan: _BlockPlan, grid, weight, bias) -> np.ndarray:
    if plan.empty:
        return _bias_fill(plan, bias)
    fn = getattr(_functional, f"conv_transpose{plan.rank}d")
    y = fn(plan.gathered(grid), weight, bias, **plan.kwargs)
    if y.shape == plan.out_shape:
        return y
    out = _bias_fill(plan, bias)
    region = plan.layout.index(slice(None), slice(None),
                               [slice(s, s + r) for s, r in zip(plan.starts, plan.results)])
    out[region] = y
    return out


# ----------------------------------------------------------------------------------------------
# Graph construction
# ----------------------------------------------------------------------------------------------

def _whole_channels(func: str, x, layout: _Layout):
    """Channels must be whole per chunk (a convolution mixes all input channels of a group)."""
    axis = layout.channel_axis
    if len(x.chunks[axis]) > 1:
        warnings.warn(f"{func}: x is chunked along its channel axis (axis {axis}, chunks {x.chunks[axis]}); "
                      f"rechunking it to one chunk of {x.shape[axis]} channels", PerformanceWarning, stacklevel=4)
        x = x.rechunk({axis: -1})
    return x


def _build(func: str, spec: ConvSpec, x, weight, bias) -> "da.Array":
    layout = _Layout(spec)
    x = _whole_channels(func, x, layout)
    w_op = _Operand("weight", weight, spec.dtype)
    b_op = None if bias is None else _Operand("bias", bias, spec.dtype)

    in_chunks = [x.chunks[ax] for ax in layout.spatial_axes]
    if spec.transposed:
        def to_out(axis):
            s, pb = spec.stride[axis], spec.pads[axis][0]
            shift = max(effective_kernel(spec.kernel[axis], spec.dilation[axis]) - s, 0) // 2
            return lambda b: b * s - pb + shift  # "same": output chunks = input chunks * stride
        make_axis_plans = _transposed_axis_plans
    else:
        def to_out(axis):
            s, pb = spec.stride[axis], spec.pads[axis][0]
            centre = (effective_kernel(spec.kernel[axis], spec.dilation[axis]) - 1) // 2
            # The first output whose window centre is at or after input boundary b: "same" at
            # stride 1 keeps the input chunks, stride s divides them by s.
            return lambda b: _ceil_div(b + pb - centre, s)
        make_axis_plans = _forward_axis_plans
    out_spatial_chunks = [_output_chunks(_bounds_from_chunks(c), o, to_out(a))
                          for a, (c, o) in enumerate(zip(in_chunks, spec.out_spatial))]
    axis_plans = [make_axis_plans(spec, a, oc, ic)
                  for a, (oc, ic) in enumerate(zip(out_spatial_chunks, in_chunks))]

    batch_chunks = x.chunks[0] if spec.batched else (None,)  # unbatched: one pass, no batch axis
    out_chunks = layout.index(batch_chunks, (spec.out_channels,), out_spatial_chunks)

    token = tokenize(func, x.name, w_op.token, None if b_op is None else b_op.token, spec)
    name = f"{func.replace('.', '-')}-{token}"
    piece_name = f"{func.replace('.', '-')}-halo-{token}"
    block_fn = _transposed_block if spec.transposed else _forward_block
    dsk = {}
    dsk.update(w_op.layer)
    if b_op is not None:
        dsk.update(b_op.layer)
    pieces = {}

    def piece_key(bi, runs):
        # Pieces are deduplicated by run identity (the runs live as long as this build): a piece
        # shared by several blocks (reflect/circular borders of small arrays) is one task.
        sig = (bi,) + tuple(map(id, runs))
        key = pieces.get(sig)
        if key is None:
            src = (x.name,) + layout.index(bi, 0, [r.chunk for r in runs])  # unbatched: no batch entry
            if all(r.whole for r in runs):  # the whole chunk: depend on its key directly, no task
                key = src
            else:
                key = (piece_name, len(pieces))
                dsk[key] = (_select, _Selection(layout.index(slice(None), slice(None), [r.sel for r in runs])), src)
            pieces[sig] = key
        return key

    def grid(bi, plans, depth=0, runs=()):
        if depth == len(plans):
            return None if any(r.chunk < 0 for r in runs) else piece_key(bi, runs)
        return [grid(bi, plans, depth + 1, runs + (r,)) for r in plans[depth].runs]

    for b_idx, b_size in enumerate(batch_chunks):
        for s_idx in itertools.product(*(range(len(p)) for p in axis_plans)):
            plans = [axis_plans[a][i] for a, i in enumerate(s_idx)]
            out_shape = layout.index(b_size, spec.out_channels,
                                     [out_spatial_chunks[a][i] for a, i in enumerate(s_idx)])
            plan = _BlockPlan(spec, layout, b_size, plans, x.dtype, out_shape)
            pieces_grid = None if plan.empty else grid(b_idx, plans)
            key = (name,) + layout.index(b_idx, 0, s_idx)
            dsk[key] = (block_fn, plan, pieces_grid, w_op.key, None if b_op is None else b_op.key)

    deps = [x] + w_op.dependencies + ([] if b_op is None else b_op.dependencies)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    return da.Array(graph, name, out_chunks, meta=np.empty((0,) * len(out_chunks), dtype=spec.dtype))


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _make_conv(rank: int):
    name = f"conv{rank}d"
    func = f"convfast.dask.{name}"

    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             data_format="channels_first"):
        x = _dask_input(func, x)
        w_check, weight = _operand(func, "weight", weight)
        b_check, bias = _operand(func, "bias", bias)
        spec = conv_spec(func, rank, _placeholder(x.shape, x.dtype), w_check, b_check, stride, padding, dilation,
                         groups, padding_mode, data_format)
        return _build(func, spec, x, weight, bias)

    conv.__name__ = conv.__qualname__ = name
    conv.__module__ = __name__
    conv.__doc__ = f"""{rank}-D convolution of a Dask array, lazily: convfast.{name} per output block.

    Same parameters and result as :func:`convfast.{name}` (see its docstring), except that ``x`` is a
    ``dask.array.Array`` and the result is one, of dtype float32 or float64 as there, and there is
    no ``out=``. ``weight`` and ``bias`` are NumPy arrays (or anything convfast accepts), or Dask
    arrays; each becomes a single graph key, shipped to a worker once.

    Chunks: batch chunks are kept; the channel axis must be one chunk (it is rechunked, with a
    dask PerformanceWarning, when it is not); spatial output chunks follow the input chunks through
    the stride (``padding="same"`` at stride 1 keeps them, stride s divides them by s). Any spatial
    chunk size works, also chunks smaller than the kernel's halo. Every padding mode applies at the
    outer border of the whole array only; inside, blocks read their neighbours' data. Every block
    equals the matching part of one in-memory call (bit for bit, see docs/dask.md).
    """
    return conv


def _make_conv_transpose(rank: int):
    name = f"conv_transpose{rank}d"
    func = f"convfast.dask.{name}"

    def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       output_size=None, data_format="channels_first"):
        x = _dask_input(func, x)
        w_check, weight = _operand(func, "weight", weight)
        b_check, bias = _operand(func, "bias", bias)
        spec = conv_transpose_spec(func, rank, _placeholder(x.shape, x.dtype), w_check, b_check, stride, padding,
                                   output_padding, groups, dilation, output_size, data_format)
        return _build(func, spec, x, weight, bias)

    conv_transpose.__name__ = conv_transpose.__qualname__ = name
    conv_transpose.__module__ = __name__
    conv_transpose.__doc__ = f"""{rank}-D transposed convolution of a Dask array, lazily: convfast.{name} per
    output block.

    Same parameters and result as :func:`convfast.{name}` (see its docstring), except that ``x`` is a
    ``dask.array.Array`` and the result is one, and there is no ``out=``. Output chunks are the
    input chunks times the stride (exactly so for ``padding="same"``); each output block is
    computed from the input slice that reaches it (its halo), cropped with explicit padding.
    """
    return conv_transpose


conv1d, conv2d, conv3d = (_make_conv(r) for r in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(r) for r in (1, 2, 3))
