"""GPU execution: operand normalisation (zero-copy), strided device views, plan/weight caches and
kernel launches. Imported lazily (it imports numba.cuda) by convfast.cuda._dispatch.cuda_backend.

Arguments are normalised by the same ConvSpec as the CPU path (_spec.conv_spec /
conv_transpose_spec accept Numba device arrays: only shape, ndim and dtype are read), and the
arrays are viewed exactly as the CPU engine views them (ConvSpec.canonical_input and
functional._with_unit_axes, applied to a stand-in with the device array's shape and strides), so
that channels_last, unbatched, 1-D/2-D and strided inputs are all 5-D strided device views: no
copy, no per-rank code.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np
from numba import cuda

from .. import functional as _functional
from .._interop import output_wrapper, to_numpy
from .._spec import ConvSpec, as_array, conv_spec, conv_transpose_spec
from . import _kernels, _plan
from ._dispatch import _DLPACK_CUDA, _module

SIMULATED = "simulator" in getattr(cuda.device_array, "__module__", "")
if SIMULATED:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray

try:
    from numba.cuda.core.errors import NumbaPerformanceWarning as _PerformanceWarning
except ImportError:  # older numba-cuda
    from numba.core.errors import NumbaPerformanceWarning as _PerformanceWarning

_GRID_X, _GRID_YZ = 2 ** 31 - 1, 65535
_NEVER = -1  # skip_on value for a kernel that always runs (the flag is 0 or 1)


def _grid(*sizes):
    """Clamp a launch grid to CUDA's limits (the kernels loop over the rest). CONVFAST_CUDA_GRID_CAP
    (tests only) clamps it further, so that the simulator runs few blocks and the grid-stride
    loops are exercised."""
    cap = int(os.environ.get("CONVFAST_CUDA_GRID_CAP", "0") or 0)
    limits = (_GRID_X, _GRID_YZ, _GRID_YZ)
    return tuple(max(1, min(n, lim, cap) if cap > 0 else min(n, lim)) for n, lim in zip(sizes, limits))


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------

def require_gpu(func: str) -> None:
    if not cuda.is_available():
        reason = ""
        error = getattr(cuda, "cuda_error", None)
        if callable(error) and error() is not None:
            reason = f": {str(error()).strip().splitlines()[0]}"
        raise RuntimeError(f"{func}: running on the GPU needs a CUDA GPU and driver, and Numba finds none "
                           f"(numba.cuda.is_available() is False{reason}); use device='cpu' or host arrays")
    if not SIMULATED and not hasattr(np, "row_stack"):
        import numba_cuda
        version = tuple(int(v) for v in numba_cuda.__version__.split(".")[:2] if v.isdigit())
        if version <= (0, 30):
            raise RuntimeError(f"{func}: numba-cuda {numba_cuda.__version__} cannot compile kernels under NumPy "
                               f"{np.__version__} (np.row_stack was removed in NumPy 2.5); install numpy<2.5, "
                               f"as pip install 'convfast[cuda]' does")


# ----------------------------------------------------------------------------------------------
# Operands
# ----------------------------------------------------------------------------------------------

def _from_interface(func: str, name: str, value, sync: bool = True):
    """Zero-copy view through __cuda_array_interface__. ``sync``: wait for the stream the producer
    exports (CAI v3); not needed for torch and CuPy arrays, whose current stream we launch on."""
    if SIMULATED:
        raise TypeError(f"{func}: {name} ({type(value).__name__}): under the CUDA simulator only Numba (simulated) "
                        f"device arrays can be passed")
    try:
        return cuda.as_cuda_array(value, sync=sync)
    except Exception as exc:
        raise TypeError(f"{func}: {name} ({type(value).__name__}) could not be read through "
                        f"__cuda_array_interface__: {exc}") from None


def device_array(func: str, name: str, value):
    """A Numba device-array view of a GPU array (no copy); None for anything else."""
    if value is None:
        return None
    if getattr(type(value), "__cuda_ndarray__", False):
        return value
    if _module(value) == "torch" and "torch" in sys.modules:
        import torch
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return None
            tensor = value.detach()  # a tensor requiring grad refuses to export its interface
            if tensor.is_conj() or tensor.is_neg():
                tensor = tensor.resolve_conj().resolve_neg()
            return _from_interface(func, name, tensor, sync=False)
    if hasattr(type(value), "__cuda_array_interface__") or "__cuda_array_interface__" in getattr(value, "__dict__", ()):
        return _from_interface(func, name, value, sync=_module(value) != "cupy")
    dlpack_device = getattr(value, "__dlpack_device__", None)
    if callable(dlpack_device) and int(dlpack_device()[0]) in _DLPACK_CUDA:
        # A DLPack-only CUDA producer: read it through a library that speaks both protocols.
        for library in ("cupy", "torch"):
            try:
                module = __import__(library)
            except ImportError:
                continue
            return device_array(func, name, module.from_dlpack(value))
        raise TypeError(f"{func}: {name} ({type(value).__name__}) is a CUDA DLPack array without "
                        f"__cuda_array_interface__; reading it needs CuPy or PyTorch")
    return None


def meta(a):
    """What the spec reads (shape, ndim, dtype) as a NumPy array: the array itself for host arrays,
    a stand-in with the same metadata for device arrays (whose shape may not be a plain tuple)."""
    return a if a is None or isinstance(a, np.ndarray) else _stand_in(a)


def operand(func: str, name: str, value):
    """A device array for GPU operands, a NumPy array (validated as the CPU path does) otherwise."""
    dev = device_array(func, name, value)
    if dev is None:
        return as_array(func, name, value)
    if dev.dtype.kind not in "fiub":
        raise TypeError(f"{func}: {name} must be a real numeric array, got dtype {dev.dtype}")
    return dev


def _stream_for(x):
    """Launch on the stream the producer of x uses, so our kernels are ordered with its work."""
    if SIMULATED:
        return 0
    module = _module(x)
    ptr = 0
    if module == "torch" and "torch" in sys.modules:
        import torch
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            ptr = torch.cuda.current_stream(x.device).cuda_stream
    elif module == "cupy" and "cupy" in sys.modules:
        ptr = sys.modules["cupy"].cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def _allocator(x, stream):
    """alloc(shape, dtype) -> (array of x's kind, Numba view of it). Device results of torch and
    CuPy inputs come from their own caching allocators (no cudaMalloc/cudaFree per call, and the
    memory is accounted where the caller looks for it); anything else gets a Numba device array."""
    module = _module(x)
    if module == "torch" and "torch" in sys.modules:
        import torch
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            dtypes = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

            def alloc(shape, dtype):
                t = torch.empty(shape, dtype=dtypes[np.dtype(dtype)], device=x.device)
                return t, _from_interface("convfast", "output", t, sync=False)
            return alloc
    if module == "cupy" and "cupy" in sys.modules:
        cupy = sys.modules["cupy"]

        def alloc(shape, dtype):
            a = cupy.empty(shape, dtype=dtype)
            return a, _from_interface("convfast", "output", a, sync=False)
        return alloc

    def alloc(shape, dtype):
        d = cuda.device_array(shape, dtype=dtype, stream=stream)
        return d, d
    return alloc


# ----------------------------------------------------------------------------------------------
# Strided device views
# ----------------------------------------------------------------------------------------------

def _stand_in(dev) -> np.ndarray:
    """A NumPy array with dev's shape, strides and dtype over a one-element buffer: only its
    metadata is used (reshape / moveaxis / newaxis / swapaxes), its elements are never read."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dev.dtype), shape=tuple(dev.shape),
                                           strides=tuple(dev.strides))


def view(dev, transform):
    """dev viewed as ``transform`` views a NumPy array of the same layout (no copy)."""
    stand_in = _stand_in(dev)
    v = transform(stand_in)
    offset = v.__array_interface__["data"][0] - stand_in.__array_interface__["data"][0]
    if SIMULATED:
        # The simulator's device arrays wrap NumPy arrays: the same view of the wrapped array.
        assert offset == 0, "the view transforms never move the first element"
        return _FakeCUDAArray(np.lib.stride_tricks.as_strided(dev._ary, shape=v.shape, strides=v.strides))
    desc = {"shape": v.shape, "strides": v.strides, "typestr": dev.dtype.str, "version": 3,
            "data": (dev.__cuda_array_interface__["data"][0] + offset, False)}
    return cuda.from_cuda_array_interface(desc, owner=dev, sync=False)


def flat(dev):
    """(a 1-D view of the memory dev spans, from its lowest address; the element offset of dev's
    first element in it; dev's strides in elements). The GEMM gathers through it with one 64-bit
    offset per element (no per-axis index arithmetic)."""
    item = dev.dtype.itemsize
    strides = tuple(s // item for s in dev.strides)
    low = sum((n - 1) * s for n, s in zip(dev.shape, strides) if s < 0 and n > 0)
    high = sum((n - 1) * s for n, s in zip(dev.shape, strides) if s > 0 and n > 0)
    count = high - low + 1
    if SIMULATED:
        ary = dev._ary
        start = ary[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(ary.shape, ary.strides))]
        one = np.lib.stride_tricks.as_strided(start, shape=(count,), strides=(item,))
        return _FakeCUDAArray(one), -low, strides
    desc = {"shape": (count,), "strides": None, "typestr": dev.dtype.str, "version": 3,
            "data": (dev.__cuda_array_interface__["data"][0] + low * item, False)}
    return cuda.from_cuda_array_interface(desc, owner=dev, sync=False), -low, strides


def five(spec: ConvSpec, dev, canonical):
    """dev (the caller's layout) as the kernels' 5-D (N, C, D, H, W) strided view;
    ``canonical`` is spec.canonical_input or spec.canonical_output."""
    return view(dev, lambda a: _functional._with_unit_axes(canonical(a), spec.rank, 2))


def _extent(dev):
    """[first, last] byte addresses an array can touch (for overlap checks)."""
    if SIMULATED:
        start = dev._ary.__array_interface__["data"][0]
    else:
        start = dev.__cuda_array_interface__["data"][0]
    lo = hi = start
    for n, s in zip(dev.shape, dev.strides):
        if n == 0:
            return None
        if s > 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return lo, hi + dev.dtype.itemsize - 1


def _overlap(a, b) -> bool:
    ea, eb = _extent(a), _extent(b)
    return ea is not None and eb is not None and ea[0] <= eb[1] and eb[0] <= ea[1]


def _inner_channels(a5) -> bool:
    """Channels are innermost in memory (channels_last): the channel stride is smaller than the
    stride of the innermost spatial axis that has more than one element."""
    if a5.shape[1] < 2:
        return False
    for axis in (4, 3, 2):
        if a5.shape[axis] > 1:
            return abs(a5.strides[1]) < abs(a5.strides[axis])
    return False


# ----------------------------------------------------------------------------------------------
# Caches: device copies of the plan tables (per geometry), packed weights (per layer)
# ----------------------------------------------------------------------------------------------

_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 64
_ZERO_BIAS = {}


def _device_tables(key, plan: _plan.GpuPlan, stream):
    tables = _TABLES.get(key)
    if tables is None:
        tables = (cuda.to_device(plan.phases, stream=stream), cuda.to_device(plan.ktab, stream=stream))
        _TABLES[key] = tables
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


def _zero_bias(dtype: np.dtype):
    if dtype not in _ZERO_BIAS:
        _ZERO_BIAS[dtype] = cuda.to_device(np.zeros(1, dtype=dtype))
    return _ZERO_BIAS[dtype]


def _host(dev, stream) -> np.ndarray:
    result = dev.copy_to_host(stream=stream)
    if stream != 0:
        stream.synchronize()
    return result


def _upload(a: np.ndarray, dtype, stream):
    return cuda.to_device(np.ascontiguousarray(a, dtype=dtype), stream=stream)


def _launch(kernel, grid, threads, stream, *args):
    # Numba warns about any grid under 128 blocks ("low occupancy"); convfast sizes its grids from
    # the problem, so a small layer legitimately gets a small grid. Silenced for this launch only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size", category=_PerformanceWarning)
        launcher = kernel[grid, threads, stream]
    launcher(*args)


def _launch_1d(kernel, total: int, stream, *args):
    threads = 256
    _launch(kernel, max(1, min(-(-total // threads), 4096)), threads, stream, *args)


def _pack(spec: ConvSpec, wd, plan: _plan.GpuPlan, ktab_d, stream, alloc=None):
    """Packed weights (G, K_total, C_out/G) in the compute dtype, and a one-element device flag set
    to 1 by the packing kernel if a weight is not finite."""
    g = spec.groups

    def weight6(w):
        w = w.reshape((g, w.shape[0] // g) + w.shape[1:])  # splitting an axis: always a view
        if spec.transposed:  # (C_in, C_out/g, *k) -> (g, C_out/g, C_in/g, *k)
            w = w.swapaxes(1, 2)
        return _functional._with_unit_axes(w, spec.rank, 3)

    w6 = view(wd, weight6)
    cout_g = spec.out_channels // g
    shape = (g, max(plan.k_total, 1), cout_g)
    wp = alloc(shape, spec.dtype)[1] if alloc is not None else cuda.device_array(shape, spec.dtype, stream=stream)
    flag = cuda.device_array(1, dtype=np.int32, stream=stream)
    _launch(_kernels.clear_flag_kernel(), 1, 32, stream, flag)  # no host-to-device copy
    total = g * plan.k_total * cout_g
    if total:
        _launch_1d(_kernels.pack_kernel(spec.dtype.name), total, stream, w6, ktab_d, wp, flag)
    return wp, flag


# ----------------------------------------------------------------------------------------------
# The launch
# ----------------------------------------------------------------------------------------------

def compute(spec: ConvSpec, xd, wd, bd, yd, stream, packed_cache: Optional[dict] = None, alloc=None) -> str:
    """y = conv(x, w) + b on the device: every operand a Numba device array (yd of the output's
    shape and compute dtype, in any layout). ``alloc``: where temporaries (packed weights) come
    from (see _allocator). Returns the kernel used."""
    rank = spec.rank
    _, stride3, dilation3, pad3, mode = _functional._kernel_params(spec)  # also the 64-bit bound check
    x5, y5 = five(spec, xd, spec.canonical_input), five(spec, yd, spec.canonical_output)
    g = spec.groups
    cin_g, cout_g = spec.in_channels // g, spec.out_channels // g
    ci_inner = cin_g > 1 and _inner_channels(x5)
    key = (spec.transposed, _functional._padded3(spec.in_spatial, rank, 1),
           _functional._padded3(spec.out_spatial, rank, 1), _functional._padded3(spec.kernel, rank, 1),
           stride3, dilation3, pad3, cin_g, ci_inner)
    plan = _plan.build_plan(*key)
    if not plan.fits_int32:
        raise ValueError(f"{spec.func}: on the GPU, input coordinates (stride {spec.stride}, dilation "
                         f"{spec.dilation}, padding {spec.pads}, sizes) must stay below 2**31; use device='cpu'")
    phases_d, ktab_d = _device_tables(key, plan, stream)

    pack_key = key + (spec.dtype.name, g, cout_g)
    packed = None if packed_cache is None else packed_cache.get(pack_key)
    if packed is None:
        # A layer's packed weights live as long as the layer: Numba memory, not a caller's pool.
        packed = _pack(spec, wd, plan, ktab_d, stream, alloc if packed_cache is None else None)
        if packed_cache is not None:
            packed_cache[pack_key] = packed
    wp, flag = packed

    has_bias = bd is not None
    bias = bd if has_bias else _zero_bias(spec.dtype)
    pixels = spec.batch * plan.max_q
    kind = _plan.choose_kernel(cin_g, cout_g, spec.dtype, pixels)
    if kind == "large" and spec.dtype == np.float64:
        kind = "wide"  # 8 x 8 float64 accumulators would not fit the register budget
    common = (x5, wp, bias, y5, ktab_d, phases_d) + tuple(plan.in_step) + tuple(plan.out_step) + \
        (mode, int(has_bias), cin_g, cout_g)
    span = _plan.DIRECT_THREADS * _plan.DIRECT_PER_THREAD
    direct_grid = _grid(-(-pixels // span), spec.out_channels, plan.num_phases)
    direct_args = common + (spec.out_channels, plan.num_phases, spec.batch, int(not spec.transposed), flag)
    direct = _kernels.direct_kernel(spec.dtype.name)
    kernel3 = _functional._padded3(spec.kernel, rank, 1)
    if kind == "depthwise" and (spec.transposed or cin_g != 1 or cout_g > 4 or not _kernels.depthwise_fits(
            kernel3[1], kernel3[2], stride3[1], stride3[2], dilation3[1], dilation3[2], math.prod(kernel3))):
        kind = "direct"  # transposed, not depthwise, or a receptive field beyond the shared tile
    if kind == "depthwise":
        o_d, o_h, o_w = y5.shape[2:]
        tiles = -(-o_h // _kernels.DW_TH) * -(-o_w // _kernels.DW_TW)
        grid = _grid(tiles, spec.out_channels, spec.batch * o_d)
        _launch(_kernels.depthwise_kernel(spec.dtype.name, mode), grid, _kernels.DW_THREADS, stream, x5, wp, bias,
                y5, *kernel3, *stride3, *dilation3, *pad3, int(has_bias), cout_g)
    elif kind == "direct":
        grid = direct_grid
        _launch(direct, grid, _plan.DIRECT_THREADS, stream, *direct_args, _NEVER)
    else:
        # the split-K plan depends on the shape only, not on the kernel's tile (_kernels.split_granule)
        sbm, sbn, granule = _kernels.split_granule(kind, spec.dtype.name, ci_inner, mode)
        blocks = -(-pixels // sbm) * -(-cout_g // sbn) * g * plan.num_phases
        # float64: no split (its split "wide" kernel spilled a register inside the K loop at 128)
        splits, chunk = split_k(blocks, plan.max_k, granule, 1 if kind == "large" else 2) \
            if spec.dtype == np.float32 else (1, plan.max_k)
        x1, x_base, x_strides = flat(x5)
        wp1 = view(wp, lambda a: a.reshape(-1))
        # 32-bit element offsets where x (the memory its view spans) and the packed weights are
        # shorter than _INT32_SPAN elements; the 64-bit variant otherwise (same results)
        idx32 = x1.shape[0] < _INT32_SPAN and wp1.shape[0] < _INT32_SPAN
        bm, bn = _kernels.tile_shape(kind, spec.dtype.name, ci_inner, mode, idx32)[:2]
        grid = _grid(-(-pixels // bm), -(-cout_g // bn), g * plan.num_phases * splits)
        kernel = _kernels.gemm_kernel(spec.dtype.name, kind, ci_inner, _inner_channels(y5), mode, splits > 1, idx32)
        gemm_args = (x1, wp1, bias, y5, ktab_d, phases_d, flag, x_base) + x_strides + tuple(x5.shape[2:]) + \
            tuple(plan.in_step) + tuple(plan.out_step) + (int(has_bias), cin_g, cout_g, wp.shape[1], g,
                                                          plan.num_phases, spec.batch)
        if splits > 1:
            # Split-K: each chunk's sums go to a workspace row; split_finish_kernel adds the rows in
            # order and the bias, under the same skip condition as the GEMM (a transposed pair).
            part = alloc((splits,) + tuple(y5.shape), spec.dtype)[1]
            skip = _NEVER if not spec.transposed else 1
            _launch(kernel, grid, 256, stream, *gemm_args, skip, part, splits, chunk)
            _launch_1d(_kernels.split_finish_kernel(spec.dtype.name), y5.size, stream, part, bias, y5,
                       int(has_bias), flag, skip)
            if spec.transposed:
                small = tuple(min(n, cap) for n, cap in zip(direct_grid, (16, 16, 1)))
                _launch(direct, small, _plan.DIRECT_THREADS, stream, *direct_args, 0)
        elif not spec.transposed:
            _launch(kernel, grid, 256, stream, *gemm_args, _NEVER)
        else:
            # A transposed GEMM multiplies the implicit zeros beyond the input's edges by the weights,
            # which a non-finite weight would turn into NaN where the true transposed convolution has
            # none. The pair reads the packing kernel's flag on the device: the GEMM runs if every
            # weight is finite, the direct kernel (which skips those products) otherwise; the other
            # returns at once. No device-to-host synchronisation.
            # The direct kernel's grid is kept small (its loops cover any size): when it returns at
            # once, as it does for finite weights, its blocks cost next to nothing.
            _launch(kernel, grid, 256, stream, *gemm_args, 1)
            # 256 blocks at most: enough for the rare non-finite case, next to nothing otherwise.
            small = tuple(min(n, cap) for n, cap in zip(direct_grid, (16, 16, 1)))
            _launch(direct, small, _plan.DIRECT_THREADS, stream, *direct_args, 0)
    if _functional._VERBOSE:
        split = f" split-K={splits}x{chunk}" if kind not in ("direct", "depthwise") and splits > 1 else ""
        if kind not in ("direct", "depthwise") and not idx32:
            split += " offsets=int64"
        print(f"convfast: {spec.func} cuda {kind} phases={plan.num_phases} K<={plan.max_k} grid={grid}{split}",
              file=sys.stderr)
    return kind


# The forward GEMM gathers with 32-bit element offsets when x and the packed weights span fewer
# elements than this (tests lower it to run the 64-bit variant).
_INT32_SPAN = 2 ** 31


# Split-K for the forward GEMM: a grid under _SPLIT_WAVES waves of resident blocks on an H100
# (_SM_COUNT SMs, 2 blocks per SM, 1 for "large") splits K into chunks of at least _SPLIT_MIN_K rows
# (whole tiles), at most _SPLIT_MAX of them. Fixed constants, never the device's SM count or the
# launch grid: the partition, and so the rounding, depends on the problem's shape alone. First
# guesses, not measured on a GPU (docs/gpu.md).
_SM_COUNT = 132
_SPLIT_WAVES = 2
_SPLIT_MIN_K = 256
_SPLIT_MAX = 32


def split_k(blocks: int, k_max: int, bk: int, per_sm: int):
    """(splits, chunk) for a GEMM grid of ``blocks`` blocks over K <= ``k_max`` rows in tiles of
    ``bk``: (1, k_max) when the grid fills the GPU or K is too short to split."""
    want = -(-_SPLIT_WAVES * _SM_COUNT * per_sm // max(blocks, 1))
    splits = min(want, k_max // _SPLIT_MIN_K, _SPLIT_MAX)
    if splits <= 1:
        return 1, k_max
    chunk = -(-k_max // splits)
    chunk = -(-chunk // bk) * bk
    return -(-k_max // chunk), chunk


def _check_device_out(spec: ConvSpec, out_d) -> None:
    if out_d.dtype != spec.dtype:
        raise TypeError(f"{spec.func}: out has dtype {out_d.dtype}, the result is {spec.dtype}")
    if tuple(out_d.shape) != spec.output_shape():
        raise ValueError(f"{spec.func}: out has shape {tuple(out_d.shape)}, the result has shape {spec.output_shape()}")


def execute(spec: ConvSpec, x, xa, wa, ba, out=None, packed_cache: Optional[dict] = None):
    """Run a validated spec on the GPU. ``x`` is the caller's object (decides the result's kind),
    ``xa``/``wa``/``ba`` its operands as device or NumPy arrays (see ``operand``)."""
    func = spec.func
    stream = _stream_for(x)
    on_device = not isinstance(xa, np.ndarray)
    dt = spec.dtype
    # Host operands are copied to the device once, in the compute dtype.
    xd = xa if on_device else _upload(xa, dt, stream)
    wd = wa if not isinstance(wa, np.ndarray) else _upload(wa, dt, stream)
    bd = None if ba is None else (ba if not isinstance(ba, np.ndarray) else _upload(ba, dt, stream))

    if on_device:
        target = None
        if out is not None:
            out_d = device_array(func, "out", out)
            if out_d is None:
                raise TypeError(f"{func}: out must be a GPU array when x is one, got {type(out).__name__}")
            _check_device_out(spec, out_d)
            target = out_d
            if any(a is not None and _overlap(out_d, a) for a in (xd, wd, bd)):
                target = None  # out overlaps an operand: compute into a temporary, then copy
        alloc = _allocator(x, stream)
        result, yd = (out, target) if target is not None else alloc(spec.output_shape(), dt)
        if math.prod(spec.output_shape()):
            compute(spec, xd, wd, bd, yd, stream, packed_cache, alloc)
        if out is None:
            return result
        if target is None:
            src, dst = five(spec, yd, spec.canonical_output), five(spec, out_d, spec.canonical_output)
            if src.size:
                _launch_1d(_kernels.copy_kernel(), src.size, stream, src, dst)
        return out

    # Host x: compute on the device, bring the result back as x's (host) kind.
    out_h = to_numpy(func, "out", out)
    if out_h is not None:
        _functional._check_out(spec, out_h)
    yd = cuda.device_array(spec.output_shape(), dtype=dt, stream=stream)
    if yd.size:
        compute(spec, xd, wd, bd, yd, stream, packed_cache, _allocator(x, stream))
        y = _host(yd, stream)
    else:
        y = np.empty(spec.output_shape(), dtype=dt)
    if out_h is not None:
        out_h[...] = y
        return out_h
    return output_wrapper(x)(y)


# ----------------------------------------------------------------------------------------------
# Entry points used by functional.py and layers.py
# ----------------------------------------------------------------------------------------------

def conv(func, rank, x, weight, bias, out, stride, padding, dilation, groups, padding_mode, data_format):
    xa, wa = operand(func, "x", x), operand(func, "weight", weight)
    ba = None if bias is None else operand(func, "bias", bias)
    spec = conv_spec(func, rank, meta(xa), meta(wa), meta(ba), stride, padding, dilation, groups, padding_mode,
                     data_format)
    return execute(spec, x, xa, wa, ba, out)


def conv_transpose(func, rank, x, weight, bias, out, stride, padding, output_padding, groups, dilation,
                   output_size, data_format):
    xa, wa = operand(func, "x", x), operand(func, "weight", weight)
    ba = None if bias is None else operand(func, "bias", bias)
    spec = conv_transpose_spec(func, rank, meta(xa), meta(wa), meta(ba), stride, padding, output_padding, groups,
                               dilation, output_size, data_format)
    return execute(spec, x, xa, wa, ba, out)


class LayerState:
    """A layer's weights on the device: uploaded once, packed once per geometry and dtype."""

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray]):
        self.weight = cuda.to_device(np.ascontiguousarray(weight))
        self.bias = None if bias is None else cuda.to_device(np.ascontiguousarray(bias))
        self.packed = {}


def run_layer(func: str, x, state: LayerState, make_spec, out=None):
    """A layer call on the GPU: ``make_spec(xa)`` builds the spec (from the layer's host weights)."""
    xa = operand(func, "x", x)
    spec = make_spec(meta(xa))
    return execute(spec, x, xa, state.weight, state.bias, out, packed_cache=state.packed)
