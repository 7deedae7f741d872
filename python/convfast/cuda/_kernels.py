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
from functools import lru_cache

import numpy as np
from numba import cuda

from ._plan import DIRECT_CHUNK, DIRECT_PER_THREAD, DIRECT_THREADS, TILES

ZEROS, REFLECT, REPLICATE, CIRCULAR, SYMMETRIC = 0, 1, 2, 3, 4  # _spec.PADDING_MODES


@cuda.jit(device=True)
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


@lru_cache(maxsize=None)
def gemm_kernel(dtype_name: str, tile: str, k_fast: bool, y_n_fast: bool):
    """Implicit-GEMM convolution: M = output pixels of a phase (batch folded in), N = output
    channels of a group, K = ktab rows of the phase.

    A block computes a BM x BN tile of y; each of its 256 threads a TM x TN register block whose
    rows are TXM apart (and columns TXN apart), so that for a fixed register index consecutive
    threads touch consecutive pixels (or channels): conflict-free shared-memory reads and
    coalesced stores. Per K step, the block stages a BK x BM tile of input patches (gathered
    straight from the unpadded strided input, padding modes applied on the fly) and a BK x BN tile
    of packed weights in shared memory; the global loads of step k+1 are issued into registers
    before the FMAs of step k (register prefetch), so their latency overlaps the arithmetic.

    k_fast: the input has its channels innermost (channels_last); ktab is then channel-fastest and
    consecutive threads load consecutive k (contiguous channels) instead of consecutive pixels.
    y_n_fast: y has its channels innermost; threads are then fast along N for the stores.
    """
    BM, BN, BK, TM, TN = TILES[tile]
    TXM, TXN = BM // TM, BN // TN
    NT = TXM * TXN
    A_ELEMS, B_ELEMS = BM * BK, BK * BN
    A_LOADS = (A_ELEMS + NT - 1) // NT
    B_LOADS = (B_ELEMS + NT - 1) // NT
    APAD = BM + 1  # a padded row: the k_fast stores (stride APAD) hit distinct banks
    DT = _numba_dtype(dtype_name)
    I64 = np.int64

    @cuda.jit
    def kernel(x, wp, bias, y, ktab, phases, a_d, a_h, a_w, s_d, s_h, s_w, mode, has_bias,
               cin_g, cout_g, num_groups, num_phases, batch, flag, skip_on):
        if flag[0] == skip_on:  # see _engine.compute: the other kernel of a pair computes y
            return
        As = cuda.shared.array((BK, APAD), DT)
        Bs = cuda.shared.array((BK, BN), DT)
        acc = cuda.local.array((TM, TN), DT)
        ra = cuda.local.array(TM, DT)
        rb = cuda.local.array(TN, DT)
        a_reg = cuda.local.array(A_LOADS, DT)
        b_reg = cuda.local.array(B_LOADS, DT)
        # The pixel each A-load slot of this thread gathers for: its image (-1: beyond M) and the
        # input coordinate of its q on each axis. Fixed for a whole K loop.
        row_n = cuda.local.array(A_LOADS, I64)
        row_d = cuda.local.array(A_LOADS, I64)
        row_h = cuda.local.array(A_LOADS, I64)
        row_w = cuda.local.array(A_LOADS, I64)

        tid = cuda.threadIdx.x
        if y_n_fast:
            tn = tid % TXN
            tm = tid // TXN
        else:
            tm = tid % TXM
            tn = tid // TXM
        n_d = x.shape[2]
        n_h = x.shape[3]
        n_w = x.shape[4]
        zero = DT(0)

        # Grid-stride loops on every grid axis: any problem size fits the grid limits. Every
        # condition below that guards a syncthreads is uniform across the block.
        for z in range(cuda.blockIdx.z, num_groups * num_phases, cuda.gridDim.z):
            g = z // num_phases
            p = z - g * num_phases
            q_d = phases[p, 0]
            q_h = phases[p, 1]
            q_w = phases[p, 2]
            r_d = phases[p, 3]
            r_h = phases[p, 4]
            r_w = phases[p, 5]
            kofs = phases[p, 6]
            klen = phases[p, 7]
            q_hw = q_h * q_w
            q_all = q_d * q_hw
            m_total = batch * q_all
            c0 = g * cin_g
            k_tiles = (klen + BK - 1) // BK
            for m0 in range(cuda.blockIdx.x * BM, m_total, cuda.gridDim.x * BM):
                for i in range(A_LOADS):
                    idx = tid + i * NT
                    if k_fast:
                        m = idx // BK
                    else:
                        m = idx % BM
                    mm = m0 + m
                    row_n[i] = -1
                    if idx < A_ELEMS and mm < m_total:
                        nb = mm // q_all
                        rem = mm - nb * q_all
                        qd = rem // q_hw
                        rem -= qd * q_hw
                        qh = rem // q_w
                        qw = rem - qh * q_w
                        row_n[i] = nb
                        row_d[i] = qd * a_d
                        row_h[i] = qh * a_h
                        row_w[i] = qw * a_w
                for n0 in range(cuda.blockIdx.y * BN, cout_g, cuda.gridDim.y * BN):
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] = zero
                    # Step kt loads tile kt into registers, multiplies tile kt-1 (in shared
                    # memory) meanwhile, then publishes tile kt.
                    for kt in range(k_tiles + 1):
                        k0 = kt * BK
                        if kt < k_tiles:
                            for i in range(A_LOADS):
                                idx = tid + i * NT
                                if k_fast:
                                    kk = idx % BK
                                else:
                                    kk = idx // BM
                                v = zero
                                k = k0 + kk
                                if row_n[i] >= 0 and k < klen:
                                    r = kofs + k
                                    sd = source_index(row_d[i] + ktab[r, 1], n_d, mode)
                                    sh = source_index(row_h[i] + ktab[r, 2], n_h, mode)
                                    sw = source_index(row_w[i] + ktab[r, 3], n_w, mode)
                                    if sd >= 0 and sh >= 0 and sw >= 0:
                                        v = DT(x[row_n[i], c0 + ktab[r, 0], sd, sh, sw])
                                a_reg[i] = v
                            for i in range(B_LOADS):
                                idx = tid + i * NT
                                nn = n0 + idx % BN
                                k = k0 + idx // BN
                                v = zero
                                if idx < B_ELEMS and nn < cout_g and k < klen:
                                    v = wp[g, kofs + k, nn]
                                b_reg[i] = v
                        if kt > 0:
                            for kk in range(BK):
                                for i in range(TM):
                                    ra[i] = As[kk, tm + i * TXM]
                                for j in range(TN):
                                    rb[j] = Bs[kk, tn + j * TXN]
                                for i in range(TM):
                                    for j in range(TN):
                                        acc[i, j] += ra[i] * rb[j]
                        cuda.syncthreads()
                        if kt < k_tiles:
                            for i in range(A_LOADS):
                                idx = tid + i * NT
                                if idx < A_ELEMS:
                                    if k_fast:
                                        As[idx % BK, idx // BK] = a_reg[i]
                                    else:
                                        As[idx // BM, idx % BM] = a_reg[i]
                            for i in range(B_LOADS):
                                idx = tid + i * NT
                                if idx < B_ELEMS:
                                    Bs[idx // BN, idx % BN] = b_reg[i]
                        cuda.syncthreads()
                    # Epilogue: y through its strides (any layout), plus the bias.
                    for i in range(TM):
                        mm = m0 + tm + i * TXM
                        if mm < m_total:
                            nb = mm // q_all
                            rem = mm - nb * q_all
                            qd = rem // q_hw
                            rem -= qd * q_hw
                            qh = rem // q_w
                            qw = rem - qh * q_w
                            od = qd * s_d + r_d
                            oh = qh * s_h + r_h
                            ow = qw * s_w + r_w
                            for j in range(TN):
                                nn = n0 + tn + j * TXN
                                if nn < cout_g:
                                    co = g * cout_g + nn
                                    v = acc[i, j]
                                    if has_bias:
                                        v += DT(bias[co])
                                    y[nb, co, od, oh, ow] = v

    return kernel


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


__all__ = ["gemm_kernel", "direct_kernel", "pack_kernel", "copy_kernel", "source_index", "unravel5"]
