"""The Numba CUDA kernels of the backward passes (see convfast.cuda._backward, docs/gpu.md).
Importing this module imports numba.cuda; convfast only does so when a backward call runs on the GPU.

Every kernel writes each of its outputs from exactly one thread, and sums in an order fixed by the
problem's shape alone: no atomics, so the results are deterministic and bitwise independent of
the launch grid (all grid axes are grid-stride loops; CONVFAST_CUDA_GRID_CAP only changes which
block computes what). Arrays are read through their strides as the forward kernels read them:
5-D (N, C, D, H, W) views, 1-D / 2-D with unit leading axes, channels_last as transposed views.

Sums over the reduction K = N * prod(O) (batch and output pixels) are split into ``splits`` chunks
of ``chunk`` indices (chosen on the host from the shape); chunk ``s`` is written to row ``s`` of a
partial-sum workspace ``part`` (splits, outputs), and ``split_sum_kernel`` adds the rows in order
0, 1, ... With one chunk, ``part`` is a (1, outputs) view of the result itself.
"""
from __future__ import annotations

from functools import lru_cache

from numba import cuda

from ._kernels import _numba_dtype, source_index, unravel5

# Weight-gradient GEMM tiles: (BM output channels of B (rows), BN channels of A (columns), BK
# reduction step, TM, TN register block per thread). Both run (BM/TM) x (BN/TN) = 256 threads.
WGRAD_TILES = {
    "wide": (64, 64, 16, 4, 4),     # Cb/G and Ca/G both >= 32
    "narrow": (16, 16, 32, 1, 1),   # one of them small (e.g. a 3-channel stem): a 64 tile would idle
}
# Threads of the reduction kernels on a GPU (a power of two: the shared-memory tree halves it).
# The kernel factories take the block size as a parameter: under the CUDA simulator, which runs one
# Python thread per CUDA thread, convfast.cuda._backward launches them with 32 (the same code).
REDUCE_THREADS = 256
# wgrad_small_kernel: at most this many weights per tap and group (Ca_g x Cb_g), each thread
# accumulating all of them in a per-thread array.
SMALL_WEIGHTS = 16


@cuda.jit(device=True)
def _padded_candidate(u, before, size, i, mode):
    """Candidate u of input index i along one axis of fold_kernel: u = 0 is i's interior position
    (before + i), u = 1..before the head positions u - 1, u = before+1.. the tail positions
    size + u - 1; a border position counts when the padding mode copies it from i. Returns the
    padded position, or -1."""
    if u == 0:
        return before + i
    p = u - 1 if u <= before else size + u - 1
    return p if source_index(p - before, size, mode) == i else -1


@lru_cache(maxsize=None)
def fold_kernel(dtype_name: str):
    """The adjoint of padding, gather form: gx[n, c, i] = the sum of g[n, c, p] over the padded
    positions p (per axis: the interior one, i + before, and the border ones) whose padding-mode
    source (``source_index``) is i. One thread per input element, all axes at once.

    Per axis the candidates are u = 0 (interior), 1..before (head), before+1..before+after (tail)
    (``_padded_candidate``): the loops run over the pad widths only, and an axis's inner axes are
    only visited for the candidates that match, so an element costs O(before + after) per axis plus
    one addition per summand. The summation order is fixed (interior first, then head, then tail, D
    outermost)."""
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(g, gx, b_d, b_h, b_w, a_d, a_h, a_w, mode):
        n_d, n_h, n_w = gx.shape[2], gx.shape[3], gx.shape[4]
        start, step = cuda.grid(1), cuda.gridsize(1)
        for idx in range(start, gx.size, step):
            n, c, i_d, ih, iw = unravel5(idx, gx.shape)
            acc = DT(0)
            for ud in range(1 + b_d + a_d):
                pd = _padded_candidate(ud, b_d, n_d, i_d, mode)
                if pd < 0:
                    continue
                for uh in range(1 + b_h + a_h):
                    ph = _padded_candidate(uh, b_h, n_h, ih, mode)
                    if ph < 0:
                        continue
                    for uw in range(1 + b_w + a_w):
                        pw = _padded_candidate(uw, b_w, n_w, iw, mode)
                        if pw >= 0:
                            acc += DT(g[n, c, pd, ph, pw])
            gx[n, c, i_d, ih, iw] = acc

    return kernel


@cuda.jit(device=True)
def _unravel_k(k, o_all, o_hw, o_w):
    """(n, od, oh, ow) of reduction index k = (batch, output pixel), the pixel row-major."""
    nb = k // o_all
    rem = k - nb * o_all
    od = rem // o_hw
    rem -= od * o_hw
    oh = rem // o_w
    return nb, od, oh, rem - oh * o_w


@cuda.jit(device=True)
def _tile_position(idx, channels_fast, width, depth):
    """(k, channel) within a (depth x width) shared-memory tile of the idx-th element a thread
    loads: consecutive threads take consecutive channels when the operand's channels are innermost
    in memory, else consecutive k (pixels), so that global loads coalesce either way."""
    if channels_fast:
        return idx // width, idx % width
    return idx % depth, idx // depth


@cuda.jit(device=True)
def _wgrad_extents(a, b):
    """The sizes both weight-gradient kernels index with: (o_w, o_hw, o_all) of b's output pixels,
    k_total = batch x pixels (the reduction length), and a's spatial sizes (l_d, l_h, l_w)."""
    o_w = b.shape[4]
    o_hw = b.shape[3] * o_w
    o_all = b.shape[2] * o_hw
    return o_w, o_hw, o_all, b.shape[0] * o_all, a.shape[2], a.shape[3], a.shape[4]


@cuda.jit(device=True)
def _tap_origin(t, k_h, k_w, d_d, d_h, d_w, p_d, p_h, p_w):
    """Per axis, where kernel tap t (row-major over the kernel) reads relative to o * stride."""
    return (t // (k_h * k_w)) * d_d - p_d, ((t // k_w) % k_h) * d_h - p_h, (t % k_w) * d_w - p_w


@cuda.jit(device=True)
def _tap_source(od, oh, ow, s_d, s_h, s_w, off_d, off_h, off_w, l_d, l_h, l_w, mode):
    """a's (d, h, w) read by output pixel (od, oh, ow) for the tap at (off_d, off_h, off_w): each
    mapped by the padding mode, -1 where it reads the zero padding (source_index)."""
    return (source_index(od * s_d + off_d, l_d, mode), source_index(oh * s_h + off_h, l_h, mode),
            source_index(ow * s_w + off_w, l_w, mode))


@lru_cache(maxsize=None)
def wgrad_gemm_kernel(dtype_name: str, tile: str, a_cfast: bool, b_cfast: bool):
    """The weight gradient as a GEMM per (group, kernel tap, K chunk):

        part[s, (cb Ca_g + ca) T + t] = sum_{k in chunk s} B[n, cb, o] A_pad[n, g Ca_g + ca, o s + t d]

    with cb = g Cb_g + cb_l (group g), k = (n, o) (batch and output pixel, o row-major), A read
    unpadded through ``source_index`` (any padding mode, any pad width; no padded copy). M = Cb_g
    rows, N = Ca_g columns.

    A block computes a BM x BN tile of one (group, tap, chunk); each of its 256 threads a TM x TN
    register block whose rows are BM/TM apart, so that consecutive threads read consecutive
    shared-memory words. Per BK step the block stages a BK x BM tile of B and a BK x BN tile of A
    in shared memory (rows padded by one word: the column-wise stores hit distinct banks).

    a_cfast / b_cfast: that operand has its channels innermost in memory (channels_last); its loads
    then give consecutive threads consecutive channels, else consecutive k (pixels), so that global
    loads coalesce either way. The sum for one output runs over k in increasing order whatever the
    grid, the flags or the tile."""
    BM, BN, BK, TM, TN = WGRAD_TILES[tile]
    TXM = BM // TM
    NT = TXM * (BN // TN)
    A_ELEMS, B_ELEMS = BK * BN, BK * BM
    A_LOADS = (A_ELEMS + NT - 1) // NT
    B_LOADS = (B_ELEMS + NT - 1) // NT
    BMP, BNP = BM + 1, BN + 1  # padded rows (compile-time constants for the shared arrays)
    TXN = BN // TN
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(a, b, part, k_h, k_w, s_d, s_h, s_w, d_d, d_h, d_w, p_d, p_h, p_w, mode,
               num_groups, cb_g, ca_g, taps, splits, chunk):
        Bs = cuda.shared.array((BK, BMP), DT)
        As = cuda.shared.array((BK, BNP), DT)
        acc = cuda.local.array((TM, TN), DT)
        ra = cuda.local.array(TM, DT)
        rb = cuda.local.array(TN, DT)
        tid = cuda.threadIdx.x
        tm = tid % TXM
        tn = tid // TXM
        o_w, o_hw, o_all, k_total, l_d, l_h, l_w = _wgrad_extents(a, b)
        zero = DT(0)
        # Every condition that guards a syncthreads below is uniform across the block.
        for z in range(cuda.blockIdx.z, num_groups * taps * splits, cuda.gridDim.z):
            sp = z % splits
            rest = z // splits
            t = rest % taps
            g = rest // taps
            off_d, off_h, off_w = _tap_origin(t, k_h, k_w, d_d, d_h, d_w, p_d, p_h, p_w)
            k_begin = sp * chunk
            k_end = min(k_begin + chunk, k_total)
            for m0 in range(cuda.blockIdx.x * BM, cb_g, cuda.gridDim.x * BM):
                for n0 in range(cuda.blockIdx.y * BN, ca_g, cuda.gridDim.y * BN):
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] = zero
                    for k0 in range(k_begin, k_end, BK):
                        for i in range(B_LOADS):
                            idx = tid + i * NT
                            if idx < B_ELEMS:
                                kk, mm = _tile_position(idx, b_cfast, BM, BK)
                                k = k0 + kk
                                v = zero
                                if k < k_end and m0 + mm < cb_g:
                                    nb, od, oh, ow = _unravel_k(k, o_all, o_hw, o_w)
                                    v = DT(b[nb, g * cb_g + m0 + mm, od, oh, ow])
                                Bs[kk, mm] = v
                        for i in range(A_LOADS):
                            idx = tid + i * NT
                            if idx < A_ELEMS:
                                kk, nn = _tile_position(idx, a_cfast, BN, BK)
                                k = k0 + kk
                                v = zero
                                if k < k_end and n0 + nn < ca_g:
                                    nb, od, oh, ow = _unravel_k(k, o_all, o_hw, o_w)
                                    sd, sh, sw = _tap_source(od, oh, ow, s_d, s_h, s_w, off_d, off_h, off_w,
                                                             l_d, l_h, l_w, mode)
                                    if sd >= 0 and sh >= 0 and sw >= 0:
                                        v = DT(a[nb, g * ca_g + n0 + nn, sd, sh, sw])
                                As[kk, nn] = v
                        cuda.syncthreads()
                        for kk in range(BK):
                            for i in range(TM):
                                ra[i] = Bs[kk, tm + i * TXM]
                            for j in range(TN):
                                rb[j] = As[kk, tn + j * TXN]
                            for i in range(TM):
                                for j in range(TN):
                                    acc[i, j] += ra[i] * rb[j]
                        cuda.syncthreads()
                    for i in range(TM):
                        cb = m0 + tm + i * TXM
                        if cb < cb_g:
                            for j in range(TN):
                                ca = n0 + tn + j * TXN
                                if ca < ca_g:
                                    part[sp, ((g * cb_g + cb) * ca_g + ca) * taps + t] = acc[i, j]

    return kernel


@lru_cache(maxsize=None)
def wgrad_small_kernel(dtype_name: str, threads: int = REDUCE_THREADS):
    """The weight gradient of groups with at most SMALL_WEIGHTS weights per tap (Ca_g x Cb_g:
    depthwise, channel multipliers, ResNeXt-like 4 x 4), where a GEMM tile would be mostly idle:
    one block per (group, tap, K chunk) (grid x, grid-stride) computes all the group's weights of
    the tap. Its threads split the chunk (thread j takes k = j, j + threads, ...: consecutive threads
    read consecutive pixels), each reading the Ca_g + Cb_g values of its k once and accumulating
    the Ca_g x Cb_g products in a per-thread array (indexed at run time, so in local memory: 192 /
    384 bytes per thread, L1-resident); a fixed shared-memory tree then adds the threads' sums.
    Same operands and ``part`` layout as wgrad_gemm_kernel; padded positions are multiplied as
    zeros, as the GEMM does."""
    NT = threads
    W = SMALL_WEIGHTS
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(a, b, part, k_h, k_w, s_d, s_h, s_w, d_d, d_h, d_w, p_d, p_h, p_w, mode,
               num_groups, cb_g, ca_g, taps, splits, chunk):
        red = cuda.shared.array((W, NT), DT)
        acc = cuda.local.array(W, DT)
        av = cuda.local.array(W, DT)
        bv = cuda.local.array(W, DT)
        tid = cuda.threadIdx.x
        o_w, o_hw, o_all, k_total, l_d, l_h, l_w = _wgrad_extents(a, b)
        nw = ca_g * cb_g
        for item in range(cuda.blockIdx.x, splits * num_groups * taps, cuda.gridDim.x):
            t = item % taps
            rest = item // taps
            g = rest % num_groups
            sp = rest // num_groups
            off_d, off_h, off_w = _tap_origin(t, k_h, k_w, d_d, d_h, d_w, p_d, p_h, p_w)
            for i in range(W):
                acc[i] = DT(0)
            for k in range(sp * chunk + tid, min(sp * chunk + chunk, k_total), NT):
                nb, od, oh, ow = _unravel_k(k, o_all, o_hw, o_w)
                sd, sh, sw = _tap_source(od, oh, ow, s_d, s_h, s_w, off_d, off_h, off_w, l_d, l_h, l_w, mode)
                inside = sd >= 0 and sh >= 0 and sw >= 0
                for j in range(ca_g):
                    av[j] = DT(a[nb, g * ca_g + j, sd, sh, sw]) if inside else DT(0)
                for j in range(cb_g):
                    bv[j] = DT(b[nb, g * cb_g + j, od, oh, ow])
                for i in range(nw):
                    acc[i] += av[i % ca_g] * bv[i // ca_g]
            for i in range(nw):
                red[i, tid] = acc[i]
            cuda.syncthreads()
            half = NT // 2
            while half > 0:
                if tid < half:
                    for i in range(nw):
                        red[i, tid] += red[i, tid + half]
                cuda.syncthreads()
                half //= 2
            if tid < nw:  # weight (cb_l, ca) = (tid // ca_g, tid % ca_g) of group g
                part[sp, ((g * cb_g + tid // ca_g) * ca_g + tid % ca_g) * taps + t] = red[tid, 0]
            cuda.syncthreads()  # red is rewritten by the next item

    return kernel


@lru_cache(maxsize=None)
def bias_kernel(dtype_name: str, threads: int = REDUCE_THREADS):
    """grad_bias partial sums: part[s, c] = the sum of gy[n, c, o] over the k = (n, o) of chunk s;
    one block per (chunk, channel) (grid x, grid-stride), threads splitting the chunk, a fixed
    shared-memory tree adding their sums."""
    NT = threads
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(gy, part, splits, chunk):
        red = cuda.shared.array(NT, DT)
        tid = cuda.threadIdx.x
        channels = gy.shape[1]
        o_d = gy.shape[2]
        o_h = gy.shape[3]
        o_w = gy.shape[4]
        o_hw = o_h * o_w
        o_all = o_d * o_hw
        k_total = gy.shape[0] * o_all
        for item in range(cuda.blockIdx.x, splits * channels, cuda.gridDim.x):
            c = item % channels
            sp = item // channels
            acc = DT(0)
            for k in range(sp * chunk + tid, min(sp * chunk + chunk, k_total), NT):
                nb, od, oh, ow = _unravel_k(k, o_all, o_hw, o_w)
                acc += DT(gy[nb, c, od, oh, ow])
            red[tid] = acc
            cuda.syncthreads()
            half = NT // 2
            while half > 0:
                if tid < half:
                    red[tid] += red[tid + half]
                cuda.syncthreads()
                half //= 2
            if tid == 0:
                part[sp, c] = red[0]
            cuda.syncthreads()

    return kernel


@lru_cache(maxsize=None)
def split_sum_kernel(dtype_name: str):
    """out[i] = part[0, i] + part[1, i] + ... in that order (the split-K partial sums)."""
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(part, out):
        start, step = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, out.shape[0], step):
            acc = DT(0)
            for s in range(part.shape[0]):
                acc += part[s, i]
            out[i] = acc

    return kernel


@lru_cache(maxsize=None)
def fill_zero_kernel(dtype_name: str):
    """out[:] = 0 (a gradient that does not depend on its operand)."""
    DT = _numba_dtype(dtype_name)

    @cuda.jit
    def kernel(out):
        start, step = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, out.shape[0], step):
            out[i] = DT(0)

    return kernel


__all__ = ["WGRAD_TILES", "REDUCE_THREADS", "SMALL_WEIGHTS", "fold_kernel", "wgrad_gemm_kernel", "wgrad_small_kernel",
           "bias_kernel", "split_sum_kernel", "fill_zero_kernel"]
