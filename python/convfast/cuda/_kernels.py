"""The Numba CUDA kernels. Importing this module imports numba.cuda; convfast only does so when a
call runs on the GPU (see convfast.cuda._dispatch).

All kernels see the same N-D problem (see _plan.py): x as a strided (N, C_in, D, H, W) array,
y as a strided (N, C_out, oD, oH, oW) array (any layout: channels_last and unbatched inputs are
views), packed weights (G, K_total, C_out/G), the reduction table ``ktab`` and the phase table.

Each kernel factory is specialised at compile time on the compute dtype, the tile shape and the
memory-order flags, and memoised, so a repeated call reuses the same dispatcher; Numba's dispatcher
in turn caches one compiled kernel per argument type signature: a repeated call never recompiles.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
from numba import cuda

from ._plan import DIRECT_CHUNK, DIRECT_PER_THREAD, DIRECT_THREADS, TILES

ZEROS, REFLECT, REPLICATE, CIRCULAR, SYMMETRIC = 0, 1, 2, 3, 4  # _spec.PADDING_MODES
I32 = np.int32
U32 = np.uint32
I64 = np.int64
U64 = np.uint64
# The simulator runs kernels as Python: it knows neither launch bounds nor shared-array alignment.
SIMULATED = "simulator" in getattr(cuda.device_array, "__module__", "")


def _jit(fn, launch_bounds=None):
    """cuda.jit(fn), with ``launch_bounds`` (max threads per block, min blocks per SM: ptxas then
    keeps the registers within the budget that many resident blocks need) on a real target. The
    bounds are kept on the dispatcher (``convfast_launch_bounds``) for scripts/cuda_sass_check.py."""
    kernel = cuda.jit(fn) if SIMULATED or launch_bounds is None else cuda.jit(launch_bounds=launch_bounds)(fn)
    kernel.convfast_launch_bounds = launch_bounds
    return kernel


@cuda.jit(device=True, inline="always")
def source_index(c, n, mode):
    """The input index that padded coordinate ``c`` reads on an axis of size ``n`` (-1: a zero).

    The padding modes are periodic extensions, as in cpp/include/convfast/spec.hpp, so pads larger
    than the input work for every mode (reflect is limited to pad < n by the spec). The interior is
    one compare; the modular arithmetic only runs at the borders.
    """
    if c >= 0 and c < n:
        return c
    if mode == ZEROS:
        return -1
    if mode == REPLICATE:
        return 0 if c < 0 else n - 1
    if mode == CIRCULAR:
        return c % n  # Python semantics in Numba: the result has the sign of n
    if mode == REFLECT:
        if n == 1:
            return 0
        period = 2 * (n - 1)
        r = c % period
        return r if r < n else period - r
    period = 2 * n  # SYMMETRIC
    r = c % period
    return r if r < n else period - 1 - r


@cuda.jit(device=True)
def unravel5(idx, shape):
    """The 5-D index (row-major) of flat element idx of an array of ``shape``."""
    i4 = idx % shape[4]
    rest = idx // shape[4]
    i3 = rest % shape[3]
    rest //= shape[3]
    i2 = rest % shape[2]
    rest //= shape[2]
    return rest // shape[1], rest % shape[1], i2, i3, i4


def _numba_dtype(dtype_name: str):
    # NumPy scalar types: valid as Numba dtypes (shared/local arrays, casts) and, unlike numba.types
    # objects, callable as casts in plain Python too (the CUDA simulator runs the kernels as Python).
    return np.float32 if dtype_name == "float32" else np.float64


# ----------------------------------------------------------------------------------------------
# The forward implicit GEMM: generated source, fully unrolled
# ----------------------------------------------------------------------------------------------
#
# The kernel is generated as Python source text (then compiled by Numba like any kernel, or run by
# the CUDA simulator as Python), so that every loop over a compile-time extent (the BK steps of a K
# tile, the TM x TN register block, the loads per thread) is written out: the accumulators and the
# prefetch registers are scalars (registers, never local memory), and the TM (TN) consecutive
# shared-memory words a thread reads per step are adjacent, which ptxas turns into LDS.64/.128.
#
# Index arithmetic. Coordinates (pixel positions, tap offsets, K rows) always fit in 32 bits
# (_plan.GpuPlan.fits_int32; the engine refuses other geometries), so they are int32 in every
# variant. Element offsets into x and into the packed weights are int32 in the ``idx32`` variant
# (the engine takes it when both arrays span fewer than 2**31 elements) and int64 otherwise.
# Numba types int32 arithmetic as int64; every int32 quantity is therefore cast back with I32 / U32,
# which lets LLVM narrow the operations to 32 bits. In the idx32 variant, offsets are computed
# modulo 2**32: a loaded element's offset is below 2**31, so its wrapped sum is exact.

_GEMM_SRC = '''
def kernel(x, wp, bias, y, ktab, phases, flag, x_base, x_sn, x_sc, x_sd, x_sh, x_sw, n_d, n_h, n_w,
           a_d, a_h, a_w, s_d, s_h, s_w, has_bias, cin_g, cout_g, k_total, num_groups, num_phases, batch,
           skip_on{SPLIT_ARGS}):
    if flag[0] == skip_on:  # see _engine.compute: the other kernel of a pair computes y
        return
    As = cuda.shared.array((2, BK, APAD), DT{ALIGN})
    Bs = cuda.shared.array((2, BK, BN), DT{ALIGN})
    # per K row of the two staged tiles: [offset, tap offset along D, H, W]; offset = the element
    # offset of (channel, taps) in zeros mode, of the channel otherwise (it may be negative: a
    # negative channel stride); a row beyond the phase's K has the tap offset _FAR along D
    KT = cuda.shared.array((2, BK, 4), I32{ALIGN})
{KO_DECL}
    tid = cuda.threadIdx.x
    ts = U64(tid)  # the row this thread stages (tid < BK)
    # (shared-memory indices are unsigned, so that Numba emits no negative-index wraparound)
    tm = {TM_EXPR}
    tn = {TN_EXPR}
    zero = DT(0)
    nd = U32(n_d)
    nh = U32(n_h)
    nw = U32(n_w)
    xs_c = IX(x_sc)
    xs_d = IX(x_sd)
    xs_h = IX(x_sh)
    xs_w = IX(x_sw)
{Z_LOOP}
        q_d = I64(phases[p, 0])
        q_h = I64(phases[p, 1])
        q_w = I64(phases[p, 2])
{K_RANGE}
        kofs32 = I32(kofs)
        klen32 = I32(klen)
        q_hw = q_h * q_w
        q_all = q_d * q_hw
        m_total = batch * q_all
        x_group = x_base + g * cin_g * x_sc
        for m0 in range(cuda.blockIdx.x * BM, m_total, cuda.gridDim.x * BM):
{ROWS}
            for n0 in range(cuda.blockIdx.y * BN, cout_g, cuda.gridDim.y * BN):
                # the packed weights this thread loads: row tid // BN of each tile, column n0 + tid % BN;
                # blim: a row k of the tile starting at k0 is loaded while k0 + (k - k0) < blim
                w_row = IX((g * k_total + kofs + b_row) * cout_g + n0 + b_n)
                w_tile = IX(BK * cout_g)
                w_step = IX(B_STEP * cout_g)
                blim = I32(klen - b_row) if b_ok and n0 + b_n < cout_g else I32(0)
{ACC_INIT}
{STAGE0}
                cuda.syncthreads()
                if klen32 > 0:
{GATHER0}
{STORE0}
{STAGE1}
                cuda.syncthreads()
                k0 = I32(0)  # first row of the current tile
                w_next = IX(w_row + w_tile)  # this thread's first weight of the next tile
{KLOOP}
{EPILOGUE}
'''

_FAR = -(1 << 31)  # the D tap offset of rows beyond K: no pixel reaches it (zeros mode), tested otherwise


def tile_shape(tile: str, dtype_name: str, k_fast: bool, mode: int, idx32: bool = True):
    """(BM, BN, BK, TM, TN) of a GEMM variant: _plan.TILES, with

    * K tiles of 16 rows instead of 8 where ptxas keeps the doubled prefetch within the register
      budget without local memory in the K loop: the 32-bit-offset variants in float32 and in
      float64 channels-first "wide"; the 64-bit ones in float32 channels-first only (the others
      spilled inside the K loop). The narrow tile only with channels-first inputs and zeros
      padding (channels-last spilled inside the K loop; the per-axis index mapping of the other
      padding modes, on twice the elements, lost the unrolling);
    * float32 "narrow" with channels-first inputs and zeros padding: 8 x 2 register blocks, so
      256 x 16 tiles (twice the FMAs per gathered element and per shared-memory read). float64,
      channels-last inputs and the other padding modes keep 8 x 1 (128 x 16): 8 x 2 spilled there,
      or lost the unrolling.

    The split-K partition does not depend on these (split_granule)."""
    bm, bn, bk, tm, tn = TILES[tile]
    plain = not k_fast and mode == ZEROS
    if tile == "narrow" and dtype_name == "float32" and plain:
        bm, tn = 256, 2
    if tile != "narrow" or plain:
        if dtype_name == "float32" and (idx32 or not k_fast) or idx32 and tile == "wide" and not k_fast:
            bk = 16
    return bm, bn, bk, tm, tn


def split_granule(tile: str, dtype_name: str, k_fast: bool, mode: int):
    """(BM, BN, K granule) from which _engine.compute plans split-K: the block count of a grid of
    BM x BN tiles, and chunks of whole multiples of the granule. Fixed per kernel kind, dtype,
    layout and mode (the tiles the split-K plan was first defined with), not taken from
    tile_shape: the partition, and so the rounding, stays the same when a tile is retuned, and is
    the same for the 32- and 64-bit-offset variants."""
    bm, bn, bk, _, _ = TILES[tile]
    if dtype_name == "float32" and not k_fast and (tile != "narrow" or mode == ZEROS):
        bk = 16
    return bm, bn, bk


def _gemm_source(tile: str, k_fast: bool, y_n_fast: bool, mode: int, split: bool = False,
                 shape=None, idx32: bool = True) -> str:
    BM, BN, BK, TM, TN = shape or TILES[tile]
    NT = 256
    TXM, TXN = BM // TM, BN // TN
    assert TXM * TXN == NT and NT % BM == 0 and NT % BK == 0
    a_loads = BM * BK // NT
    b_loads = max(1, BN * BK // NT)
    UX = "U32" if idx32 else "U64"
    ind = lambda n, lines: "\n".join(" " * n + line for line in lines)  # noqa: E731
    # A: the pixel(s) this thread gathers for, and the K row within a tile of each load
    if k_fast:
        a_rows = [(f"U64(tid // BK + {i * (NT // BK)})", "U64(tid % BK)") for i in range(a_loads)]
    else:
        a_rows = [("U64(tid % BM)", f"U64(tid // BM + {i * (NT // BM)})") for i in range(a_loads)]
    pixels = sorted(set(r for r, _ in a_rows), key=[r for r, _ in a_rows].index)
    rows = []
    for pi, expr in enumerate(pixels):
        rows += [f"mm = m0 + {expr}",
                 f"ok{pi} = mm < m_total",
                 f"mm = min(mm, m_total - 1)",
                 f"nb = mm // q_all", "rem = mm - nb * q_all", "qd = rem // q_hw", "rem -= qd * q_hw",
                 "qh = rem // q_w", "qw = rem - qh * q_w",
                 f"rd{pi} = I32(qd * a_d)", f"rh{pi} = I32(qh * a_h)", f"rw{pi} = I32(qw * a_w)"]
        if mode == ZEROS:
            rows.append(f"base{pi} = IX(x_group + nb * x_sn + qd * a_d * x_sd + qh * a_h * x_sh + qw * a_w * x_sw)")
        else:
            rows.append(f"base{pi} = IX(x_group + nb * x_sn)")
    rows += ["b_n = tid % BN", "b_row = tid // BN", f"b_ok = tid < {BN * BK}"]

    def offset(slot, s):  # the staged offset of a row
        return f"KT[{slot}, {s}, 0]" if idx32 else f"KO[{slot}, {s}]"

    def stage(slot, k_expr):  # BK threads stage the offsets of row k_expr (of the phase's K) in slot
        o = offset(slot, "ts")
        inside = ["r = U32(kofs32 + k)", "c = I32(ktab[r, 0])", "kd = I32(ktab[r, 1])", "kh = I32(ktab[r, 2])",
                  "kw = I32(ktab[r, 3])"]
        if mode == ZEROS:
            inside.append(f"{o} = IX(c * xs_c + kd * xs_d + kh * xs_h + kw * xs_w)")
        else:
            inside.append(f"{o} = IX(c * xs_c)")
        inside += [f"KT[{slot}, ts, 1] = kd", f"KT[{slot}, ts, 2] = kh", f"KT[{slot}, ts, 3] = kw"]
        beyond = [f"{o} = IX(0)", f"KT[{slot}, ts, 1] = I32({_FAR})",
                  f"KT[{slot}, ts, 2] = I32(0)", f"KT[{slot}, ts, 3] = I32(0)"]
        return (["if tid < BK:", f"    k = I32({k_expr})", "    if k < klen32:"] + ["        " + s for s in inside] +
                ["    else:"] + ["        " + s for s in beyond])

    def gather(k_expr, slot, w_expr):
        out = []
        for i, (pexpr, kk) in enumerate(a_rows):
            pi = pixels.index(pexpr)
            out += [f"s = {kk}", f"o = {offset(slot, 's')}", f"kd = KT[{slot}, s, 1]", f"kh = KT[{slot}, s, 2]",
                    f"kw = KT[{slot}, s, 3]", f"a{i} = zero"]
            if mode == ZEROS:
                out += [f"if ok{pi} & (U32(rd{pi} + kd) < nd) & (U32(rh{pi} + kh) < nh) & (U32(rw{pi} + kw) < nw):",
                        f"    a{i} = DT(x[{UX}(base{pi} + o)])"]
            else:
                out += [f"sd = I32(source_index(I32(rd{pi} + kd), n_d, MODE))",
                        f"sh = I32(source_index(I32(rh{pi} + kh), n_h, MODE))",
                        f"sw = I32(source_index(I32(rw{pi} + kw), n_w, MODE))",
                        f"if ok{pi} & (kd != I32({_FAR})) & (sd >= 0) & (sh >= 0) & (sw >= 0):",
                        f"    a{i} = DT(x[{UX}(base{pi} + o + sd * xs_d + sh * xs_h + sw * xs_w)])"]
        for i in range(b_loads):
            out += [f"b{i} = zero", f"if I32({k_expr} + {i * (NT // BN)}) < blim:",
                    f"    b{i} = DT(wp[{UX}({w_expr}{f' + {i} * w_step' if i else ''})])"]
        return out

    def store(buf):
        out = []
        for i, (pexpr, kk) in enumerate(a_rows):
            out.append(f"As[{buf}, {kk}, {pexpr}] = a{i}")
        for i in range(b_loads):
            out += ["if b_ok:", f"    Bs[{buf}, U64(b_row + {i * (NT // BN)}), U64(b_n)] = b{i}"]
        return out

    def compute(buf):
        out = []
        for kk in range(BK):
            out += [f"ra{i} = As[{buf}, {kk}, tm * TM + {i}]" for i in range(TM)]
            out += [f"rb{j} = Bs[{buf}, {kk}, tn * TN + {j}]" for j in range(TN)]
            out += [f"c{i}_{j} += ra{i} * rb{j}" for i in range(TM) for j in range(TN)]
        return out

    def tile_step(buf, nxt):  # the FMAs of the tile in buffer buf, rows k0...; tile k0 + BK goes to nxt
        return (["k1 = I32(k0 + BK)", "more = k1 < klen32", "if more:"] +
                ind(4, gather("k1", nxt, "w_next")).split("\n") + compute(buf) + ["if more:"] +
                ind(4, store(nxt)).split("\n") + stage(buf, "k0 + 2 * BK + tid") +
                ["cuda.syncthreads()", "k0 = k1", "w_next = IX(w_next + w_tile)"])

    # Two tiles per iteration, so that the buffers' shared-memory addresses are constants
    kloop = (["while k0 < klen32:"] + ["    " + line for line in tile_step("0", "1")] +
             ["    if k0 < klen32:"] + ["        " + line for line in tile_step("1", "0")])
    epi = []
    for i in range(TM):
        epi += [f"mm = m0 + tm * TM + {i}",
                "if mm < m_total:",
                "    nb = mm // q_all", "    rem = mm - nb * q_all", "    qd = rem // q_hw", "    rem -= qd * q_hw",
                "    qh = rem // q_w", "    qw = rem - qh * q_w",
                "    od = qd * s_d + phases[p, 3]", "    oh = qh * s_h + phases[p, 4]", "    ow = qw * s_w + phases[p, 5]"]
        for j in range(TN):
            if split:  # this K chunk's partial sum; split_finish_kernel adds the chunks and the bias
                epi += [f"    nn = n0 + tn * TN + {j}",
                        "    if nn < cout_g:",
                        f"        part[z % splits, nb, g * cout_g + nn, od, oh, ow] = c{i}_{j}"]
                continue
            epi += [f"    nn = n0 + tn * TN + {j}",
                    "    if nn < cout_g:",
                    "        co = g * cout_g + nn",
                    f"        v = c{i}_{j}",
                    "        if has_bias:",
                    "            v += DT(bias[co])",
                    "        y[nb, co, od, oh, ow] = v"]
    tm_expr, tn_expr = ("tid // TXN", "tid % TXN") if y_n_fast else ("tid % TXM", "tid // TXM")
    if split:  # z covers (group, phase, K chunk); the chunk's rows are a window of the phase's
        z_loop = ["for z in range(cuda.blockIdx.z, num_groups * num_phases * splits, cuda.gridDim.z):",
                  "    zg = z // splits", "    g = zg // num_phases", "    p = zg - g * num_phases"]
        k_range = ["k_begin = (z - zg * splits) * chunk", "kofs = I64(phases[p, 6]) + k_begin",
                   "klen = min(I64(phases[p, 7]) - k_begin, chunk)"]  # < 0 past the phase's K: no tile
    else:
        z_loop = ["for z in range(cuda.blockIdx.z, num_groups * num_phases, cuda.gridDim.z):",
                  "    g = z // num_phases", "    p = z - g * num_phases"]
        k_range = ["kofs = I64(phases[p, 6])", "klen = I64(phases[p, 7])"]
    return _GEMM_SRC.format(
        SPLIT_ARGS=", part, splits, chunk" if split else "", Z_LOOP=ind(4, z_loop), K_RANGE=ind(8, k_range),
        ALIGN="" if SIMULATED else ", alignment=16", TM_EXPR=tm_expr, TN_EXPR=tn_expr, ROWS=ind(12, rows),
        KO_DECL="" if idx32 else "    KO = cuda.shared.array((2, BK), I64)  # the offsets, 64-bit",
        ACC_INIT=ind(16, [f"c{i}_{j} = zero" for i in range(TM) for j in range(TN)]),
        STAGE0=ind(16, stage("0", "tid")), STAGE1=ind(16, stage("1", "BK + tid")),
        GATHER0=ind(20, gather("0", "0", "w_row")), STORE0=ind(20, store("0")), KLOOP=ind(16, kloop),
        EPILOGUE=ind(16, epi))


@lru_cache(maxsize=None)
def gemm_kernel(dtype_name: str, tile: str, k_fast: bool, y_n_fast: bool, mode: int = ZEROS, split: bool = False,
                idx32: bool = True):
    """Implicit-GEMM convolution: M = output pixels of a phase (batch folded in), N = output
    channels of a group, K = ktab rows of the phase.

    A block computes a BM x BN tile of y; each of its 256 threads a TM x TN register block of
    adjacent rows and columns (its shared-memory reads per K step are TM and TN adjacent words:
    vector loads). Per K tile (BK rows) the block gathers a BK x BM tile of input patches straight
    from the unpadded strided input (x as a flat array: in zeros mode one offset add and one
    bounds check per element, the padding mode applied per axis otherwise, ``mode`` being a
    compile-time constant) and a BK x BN tile of packed weights into shared memory. The tiles are
    double-buffered: the global loads of tile kt+1 go to registers before the FMAs of tile kt, then
    to the other buffer; one barrier per tile; the K loop is unrolled by two tiles (one per buffer),
    so that the buffers' shared-memory addresses are constants. The gather offsets of a tile's K rows (from ``ktab``)
    are staged once per tile in shared memory by BK threads, as one 16-byte row per K row, so the
    gathering threads do no table lookups or divisions.

    k_fast: the input has its channels innermost (channels_last); ktab is then channel-fastest and
    consecutive threads load consecutive k (contiguous channels) instead of consecutive pixels.
    y_n_fast: y has its channels innermost; threads are then fast along N for the stores.
    split: split-K (for grids too small to fill the GPU): grid z also covers ``splits`` chunks of
    ``chunk`` K rows, each block writes its chunk's sums to ``part[chunk, n, c, d, h, w]`` (no
    bias), and ``split_finish_kernel`` adds the chunks in order.
    idx32: element offsets into x and the packed weights in 32 bits (both must span fewer than
    2**31 elements: _engine.compute checks); 64 bits otherwise. The results are the same.
    """
    shape = tile_shape(tile, dtype_name, k_fast, mode, idx32)
    BM, BN, BK, TM, TN = shape
    namespace = dict(cuda=cuda, DT=_numba_dtype(dtype_name), I32=I32, U32=U32, I64=I64, U64=U64,
                     IX=I32 if idx32 else I64, BM=BM, BN=BN, BK=BK, TM=TM, TN=TN,
                     TXM=BM // TM, TXN=BN // TN, APAD=BM + (4 if k_fast else 0), MODE=mode,
                     B_STEP=NT_GEMM // BN, source_index=source_index)
    source = _gemm_source(tile, k_fast, y_n_fast, mode, split, shape, idx32)
    exec(compile(source, f"<convfast gemm {tile}>", "exec"), namespace)
    # 2 blocks per SM (<= 128 registers) for 4 x 4 and 8 x 1 blocks; the 8 x 8 block of "large"
    # needs more (at 128 it spilled 1.7 KB, into the K loop): one block per SM.
    return _jit(namespace["kernel"], (256, 1 if TM * TN > 16 else 2))


NT_GEMM = 256  # threads per GEMM block


@lru_cache(maxsize=None)
def direct_kernel(dtype_name: str):
    """Direct convolution, the depthwise path: one output channel per block (grid y), a run of
    output pixels (batch folded in) per block (grid x), one phase per grid z.

    The block stages the channel's weights and ktab rows in shared memory, DIRECT_CHUNK rows at a
    time (any kernel size); each thread computes DIRECT_PER_THREAD outputs spaced by the block
    size, so that for a fixed output index consecutive threads read consecutive pixels (coalesced),
    and reuses each staged weight and offset for all of them.

    Both kernels return at once when ``flag[0] == skip_on``: a transposed convolution launches the
    GEMM and this kernel as a pair conditioned on the device-side "a weight is not finite" flag
    written by the packing kernel, so the choice costs no device-to-host read.

    Products with out-of-range inputs are skipped when ``zero_products`` is 0 (transposed: the true
    transposed convolution never forms them, which matters for non-finite weights) and formed with
    an explicit zero when it is 1 (forward convolution with zeros padding: the padded input is part
    of the definition, 0 * inf = NaN as in the reference).
    """
    NTD, TW, CH = DIRECT_THREADS, DIRECT_PER_THREAD, DIRECT_CHUNK
    SPAN = NTD * TW
    DT = _numba_dtype(dtype_name)
    I64 = np.int64

    @cuda.jit
    def kernel(x, wp, bias, y, ktab, phases, a_d, a_h, a_w, s_d, s_h, s_w, mode, has_bias,
               cin_g, cout_g, num_out, num_phases, batch, zero_products, flag, skip_on):
        if flag[0] == skip_on:
            return
        ws = cuda.shared.array(CH, DT)
        ks = cuda.shared.array((CH, 4), I64)
        acc = cuda.local.array(TW, DT)
        row_n = cuda.local.array(TW, I64)
        row_d = cuda.local.array(TW, I64)
        row_h = cuda.local.array(TW, I64)
        row_w = cuda.local.array(TW, I64)
        tid = cuda.threadIdx.x
        n_d = x.shape[2]
        n_h = x.shape[3]
        n_w = x.shape[4]
        zero = DT(0)
        for p in range(cuda.blockIdx.z, num_phases, cuda.gridDim.z):
            q_d = phases[p, 0]
            q_h = phases[p, 1]
            q_w = phases[p, 2]
            kofs = phases[p, 6]
            klen = phases[p, 7]
            q_hw = q_h * q_w
            q_all = q_d * q_hw
            m_total = batch * q_all
            for co in range(cuda.blockIdx.y, num_out, cuda.gridDim.y):
                g = co // cout_g
                j = co - g * cout_g
                c0 = g * cin_g
                for f0 in range(cuda.blockIdx.x * SPAN, m_total, cuda.gridDim.x * SPAN):
                    for t in range(TW):
                        acc[t] = zero
                        f = f0 + t * NTD + tid
                        row_n[t] = -1
                        if f < m_total:
                            nb = f // q_all
                            rem = f - nb * q_all
                            qd = rem // q_hw
                            rem -= qd * q_hw
                            qh = rem // q_w
                            row_n[t] = nb
                            row_d[t] = qd * a_d
                            row_h[t] = qh * a_h
                            row_w[t] = (rem - qh * q_w) * a_w
                    for e0 in range(0, klen, CH):
                        cuda.syncthreads()  # the previous chunk is no longer read
                        for e in range(tid, CH, NTD):
                            if e0 + e < klen:
                                r = kofs + e0 + e
                                ws[e] = wp[g, r, j]
                                for a in range(4):
                                    ks[e, a] = ktab[r, a]
                        cuda.syncthreads()
                        for e in range(min(CH, klen - e0)):
                            wv = ws[e]
                            c = c0 + ks[e, 0]
                            for t in range(TW):
                                if row_n[t] >= 0:
                                    sd = source_index(row_d[t] + ks[e, 1], n_d, mode)
                                    sh = source_index(row_h[t] + ks[e, 2], n_h, mode)
                                    sw = source_index(row_w[t] + ks[e, 3], n_w, mode)
                                    if sd >= 0 and sh >= 0 and sw >= 0:
                                        acc[t] += DT(x[row_n[t], c, sd, sh, sw]) * wv
                                    elif zero_products:
                                        acc[t] += zero * wv
                    for t in range(TW):
                        if row_n[t] >= 0:
                            f = f0 + t * NTD + tid
                            rem = f - row_n[t] * q_all
                            qd = rem // q_hw
                            rem -= qd * q_hw
                            qh = rem // q_w
                            qw = rem - qh * q_w
                            v = acc[t]
                            if has_bias:
                                v += DT(bias[co])
                            y[row_n[t], co, qd * s_d + phases[p, 3], qh * s_h + phases[p, 4],
                              qw * s_w + phases[p, 5]] = v

    return kernel


# Depthwise tile kernel: output tiles of DW_TH x DW_TW pixels per block, DW_THREADS threads.
DW_TH, DW_TW = 16, 16
DW_THREADS = DW_TH * DW_TW
DW_SMEM = 4096        # input-tile elements (per block, one depth plane at a time)
DW_MAX_TAPS = 512     # kernel taps staged in shared memory


def depthwise_fits(k_h: int, k_w: int, s_h: int, s_w: int, d_h: int, d_w: int, taps: int) -> bool:
    """Whether depthwise_kernel takes a layer: its input tile (the receptive field of a 16 x 16
    output tile) and its taps fit the shared arrays."""
    ih = (DW_TH - 1) * s_h + (k_h - 1) * d_h + 1
    iw = (DW_TW - 1) * s_w + (k_w - 1) * d_w + 1
    return ih * iw <= DW_SMEM and taps <= DW_MAX_TAPS


@lru_cache(maxsize=None)
def depthwise_kernel(dtype_name: str, mode: int = ZEROS):
    """Forward depthwise convolution (C_in/G = 1, C_out/G <= 4) through a shared-memory input tile.

    A block computes a 16 x 16 tile of output pixels (oh, ow) of one (image, output channel, output
    depth); grid x covers the tiles, y the channels, z the (image, depth) pairs (grid-stride
    loops). Per kernel depth tap, the block loads the tile's receptive field in the input plane
    (IH x IW with IH = 15 s_h + (k_h - 1) d_h + 1) into shared memory, the padding mode (a
    compile-time constant) applied once per element, and each thread then reads its taps from
    there: every input element is read from global memory once per depth tap, not once per tap
    of the output pixels that use it. The channel's weights are staged once in shared memory.
    Padded positions hold zeros that are multiplied (0 * inf = NaN, as the reference).
    """
    DT = _numba_dtype(dtype_name)
    TH, TW, NT = DW_TH, DW_TW, DW_THREADS

    def kernel(x, wp, bias, y, k_d, k_h, k_w, s_d, s_h, s_w, d_d, d_h, d_w, p_d, p_h, p_w, has_bias, cout_g):
        tile = cuda.shared.array(DW_SMEM, DT)
        wsm = cuda.shared.array(DW_MAX_TAPS, DT)
        tid = cuda.threadIdx.x
        ty = tid // TW
        tx = tid - ty * TW
        n_d, n_h, n_w = x.shape[2], x.shape[3], x.shape[4]
        o_d, o_h, o_w = y.shape[2], y.shape[3], y.shape[4]
        ih_n = (TH - 1) * s_h + (k_h - 1) * d_h + 1
        iw_n = (TW - 1) * s_w + (k_w - 1) * d_w + 1
        tiles_w = (o_w + TW - 1) // TW
        tiles = ((o_h + TH - 1) // TH) * tiles_w
        taps = k_d * k_h * k_w
        hw = k_h * k_w
        row_step = d_h * iw_n
        for co in range(cuda.blockIdx.y, y.shape[1], cuda.gridDim.y):
            g = co // cout_g
            j = co - g * cout_g
            cuda.syncthreads()  # wsm of the previous channel is no longer read
            for t in range(tid, taps, NT):
                wsm[t] = wp[g, t, j]
            b = DT(bias[co]) if has_bias else DT(0)
            for nd in range(cuda.blockIdx.z, y.shape[0] * o_d, cuda.gridDim.z):
                nb = nd // o_d
                od = nd - nb * o_d
                for tt in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
                    th0 = (tt // tiles_w) * TH
                    tw0 = (tt - (tt // tiles_w) * tiles_w) * TW
                    h0 = th0 * s_h - p_h  # input origin of the tile's receptive field
                    w0 = tw0 * s_w - p_w
                    acc = DT(0)
                    for kd in range(k_d):
                        sd = source_index(od * s_d + kd * d_d - p_d, n_d, mode)
                        cuda.syncthreads()  # the previous plane's tile is no longer read
                        for e in range(tid, ih_n * iw_n, NT):
                            r = e // iw_n
                            c = e - r * iw_n
                            sh = source_index(h0 + r, n_h, mode)
                            sw = source_index(w0 + c, n_w, mode)
                            v = DT(0)
                            if sd >= 0 and sh >= 0 and sw >= 0:
                                v = DT(x[nb, g, sd, sh, sw])
                            tile[e] = v
                        cuda.syncthreads()
                        wi = kd * hw
                        row = ty * s_h * iw_n + tx * s_w
                        for kh in range(k_h):
                            e = row
                            for kw in range(k_w):  # unsigned indices: no negative-index wraparound
                                acc += tile[U64(e)] * wsm[U64(wi)]
                                e += d_w
                                wi += 1
                            row += row_step
                    oh = th0 + ty
                    ow = tw0 + tx
                    if oh < o_h and ow < o_w:
                        y[nb, co, od, oh, ow] = acc + b

    return _jit(kernel, (NT, 2))  # 2 blocks per SM: <= 128 registers


@lru_cache(maxsize=None)
def split_finish_kernel(dtype_name: str):
    """y[n, c, d, h, w] = part[0, n, c, d, h, w] + part[1, ...] + ... (in that order) + bias[c]: the
    split-K GEMM's chunks added in a fixed order, so the result does not depend on the grid. Returns
    at once when ``flag[0] == skip_on``, like the GEMM it finishes."""
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(part, bias, y, has_bias, flag, skip_on):
        if flag[0] == skip_on:
            return
        start, step = cuda.grid(1), cuda.gridsize(1)
        for idx in range(start, y.size, step):
            i0, i1, i2, i3, i4 = unravel5(idx, y.shape)
            v = DT(0)
            for s in range(part.shape[0]):
                v += part[s, i0, i1, i2, i3, i4]
            if has_bias:
                v += DT(bias[i1])
            y[i0, i1, i2, i3, i4] = v

    return kernel


@lru_cache(maxsize=None)
def pack_kernel(dtype_name: str):
    """wp[g, r, j] = w6[g, j, ci(r), taps(r)] in the compute dtype, for every ktab row r; sets
    flag[0] = 1 if a weight is not finite (the transposed GEMM must then not be used)."""
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(w6, ktab, wp, flag):
        rows = wp.shape[1]
        cols = wp.shape[2]
        total = wp.shape[0] * rows * cols
        start, step = cuda.grid(1), cuda.gridsize(1)
        for idx in range(start, total, step):
            g = idx // (rows * cols)
            rem = idx - g * rows * cols
            r = rem // cols
            j = rem - r * cols
            v = DT(w6[g, j, ktab[r, 0], ktab[r, 4], ktab[r, 5], ktab[r, 6]])
            wp[g, r, j] = v
            if math.isinf(v) or math.isnan(v):
                flag[0] = 1

    return kernel


@lru_cache(maxsize=None)
def clear_flag_kernel():
    """flag[0] = 0 (on the device: no host-to-device copy per call)."""

    @cuda.jit
    def kernel(flag):
        if cuda.grid(1) == 0:
            flag[0] = 0

    return kernel


@lru_cache(maxsize=None)
def copy_kernel():
    """dst[...] = src[...] for two 5-D strided arrays of the same shape (out= that overlaps an
    operand is computed into a temporary and copied with this)."""

    @cuda.jit
    def kernel(src, dst):
        start, step = cuda.grid(1), cuda.gridsize(1)
        for idx in range(start, dst.size, step):
            i0, i1, i2, i3, i4 = unravel5(idx, dst.shape)
            dst[i0, i1, i2, i3, i4] = src[i0, i1, i2, i3, i4]

    return kernel


__all__ = ["gemm_kernel", "tile_shape", "split_granule", "split_finish_kernel", "depthwise_kernel", "depthwise_fits", "direct_kernel",
           "pack_kernel", "clear_flag_kernel", "copy_kernel", "source_index", "unravel5"]
