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

from ._kernels import I64, SIMULATED, U64, ZEROS, _jit, _numba_dtype, source_index, unravel5

# Weight-gradient GEMM tiles: (BM output channels of B (rows), BN channels of A (columns), BK
# reduction rows per tile, TM x TN register block per thread, KS slices of K per block). Both run
# (BM/TM) x (BN/TN) x KS = 256 threads.
WGRAD_TILES = {
    "wide": (64, 64, 16, 4, 4, 1),     # Cb/G and Ca/G both >= 32
    # one of them small (e.g. a 3-channel stem): 16 slices of 16 threads share each 64-row tile, so
    # that a thread still runs 4 x 4 blocks (a 1 x 1 block per thread reached 20 % FMA at most)
    "narrow": (16, 16, 64, 4, 4, 16),
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


@cuda.jit(device=True, inline="always")
def _digits(step, o_d, o_h, o_w):
    """``step`` written in the mixed radix of a reduction index k = (n, od, oh, ow): the digits
    (dn, dd, dh, dw) that ``_advance`` adds (divisions here, once per kernel, never per element)."""
    dw = step % o_w
    q = step // o_w
    dh = q % o_h
    q //= o_h
    dd = q % o_d
    return q // o_d, dd, dh, dw


@cuda.jit(device=True, inline="always")
def _decode(k, o_d, o_h, o_w):
    """(n, od, oh, ow) of reduction index k (batch, output pixel row-major): once per work item."""
    return _digits(k, o_d, o_h, o_w)


@cuda.jit(device=True, inline="always")
def _advance(cn, cd, ch, cw, dn, dd, dh, dw, o_d, o_h, o_w):
    """The counters (cn, cd, ch, cw) of k moved to k + step, step's digits being (dn, dd, dh, dw):
    an addition with one carry per digit (each digit < its radix), no division."""
    cw += dw
    if cw >= o_w:
        cw -= o_w
        ch += 1
    ch += dh
    if ch >= o_h:
        ch -= o_h
        cd += 1
    cd += dd
    if cd >= o_d:
        cd -= o_d
        cn += 1
    return cn + dn, cd, ch, cw


@cuda.jit(device=True, inline="always")
def _tap_origin(t, k_h, k_w, d_d, d_h, d_w, p_d, p_h, p_w):
    """Per axis, where kernel tap t (row-major over the kernel) reads relative to o * stride."""
    return (t // (k_h * k_w)) * d_d - p_d, ((t // k_w) % k_h) * d_h - p_h, (t % k_w) * d_w - p_w


# The weight-gradient GEMM, generated like the forward's (convfast.cuda._kernels._gemm_source): every
# loop over a compile-time extent written out, accumulators and prefetch registers scalars.
_WGRAD_SRC = '''
def kernel(a1, b1, part, a_base, a_sn, a_sc, a_sd, a_sh, a_sw, b_base, b_sn, b_sc, b_sd, b_sh, b_sw,
           l_d, l_h, l_w, o_d, o_h, o_w, batch, k_h, k_w, s_d, s_h, s_w, d_d, d_h, d_w, p_d, p_h, p_w,
           num_groups, cb_g, ca_g, taps, splits, chunk, dn, dd, dh, dw):
    sm = cuda.shared.array(SM_SIZE, DT{ALIGN})  # 2 x (B tile, A tile); the K-slice sums at the end
    # per K row of a tile: the element offset of its pixel in a / b, channel 0 (base included, so
    # >= 0 whatever the strides' signs; -1: a padded zero of a, or a row beyond the chunk)
    KA = cuda.shared.array((2, BK), I64)
    KB = cuda.shared.array((2, BK), I64)
    # the staging threads' state between tiles (n, od, oh, ow of their row, rows left, the tap's
    # offsets): in shared memory, not registers, which the 4 x 4 blocks and the prefetch need
    CNT = cuda.shared.array((8, BK), I64)
    tid = cuda.threadIdx.x
    tm = tid % TXM
    tn = (tid // TXM) % TXN
    ks = tid // (TXM * TXN)
    zero = DT(0)
    k_total = batch * (o_d * o_h * o_w)
    # Every condition that guards a syncthreads below is uniform across the block.
    for z in range(cuda.blockIdx.z, num_groups * taps * splits, cuda.gridDim.z):
        sp = z % splits
        rest = z // splits
        t = rest % taps
        g = rest // taps
        off_d, off_h, off_w = tap_origin(t, k_h, k_w, d_d, d_h, d_w, p_d, p_h, p_w)
        k_begin = sp * chunk
        klen = min(k_begin + chunk, k_total) - k_begin
        k_tiles = (klen + BK - 1) // BK
        a_grp = g * ca_g
        b_grp = g * cb_g
        for m0 in range(cuda.blockIdx.x * BM, cb_g, cuda.gridDim.x * BM):
            for n0 in range(cuda.blockIdx.y * BN, ca_g, cuda.gridDim.y * BN):
{CHANNELS}
{ACC_INIT}
                if tid < BK:  # the staging threads: row tid of every tile, counters carried along K
                    cn, cd, ch, cw = decode(k_begin + tid, o_d, o_h, o_w)
                    left = klen - tid
                    tap_d = off_d
                    tap_h = off_h
                    tap_w = off_w
{STAGE0}
{STAGE1}
{SAVE}
                cuda.syncthreads()
                if k_tiles > 0:
{GATHER0}
{STORE0}
                cuda.syncthreads()
                for kt in range(k_tiles):
                    buf = kt & 1
                    nxt = 1 - buf
                    more = kt + 1 < k_tiles
                    if more:
{GATHER1}
{COMPUTE}
                    if more:
{STORE1}
{STAGE_LOOP}
                    cuda.syncthreads()
{EPILOGUE}
'''


def _wgrad_source(tile: str, a_cfast: bool, b_cfast: bool, mode: int) -> str:
    BM, BN, BK, TM, TN, KS = WGRAD_TILES[tile]
    NT = 256
    TXM, TXN = BM // TM, BN // TN
    R = BK // KS  # K rows per slice per tile
    assert TXM * TXN * KS == NT and NT % BK == 0 and BK % KS == 0
    BMP, BNP = BM + 4, BN + 4  # padded rows (16-byte aligned for the vector reads)
    b_off, a_off = 0, 2 * BK * BMP  # sm: Bs[buf, kk, m] then As[buf, kk, n]
    ind = lambda n, lines: "\n".join(" " * n + line for line in lines)  # noqa: E731

    def loads(width, cfast):
        """[(kk expression, channel expression)] of a thread's loads of a BK x width tile."""
        count = BK * width // NT
        assert count * NT == BK * width
        if cfast:  # consecutive threads: consecutive channels
            return [(f"tid // {width} + {i * (NT // width)}", f"tid % {width}") for i in range(count)]
        return [(f"tid % {BK}", f"tid // {BK} + {i * (NT // BK)}") for i in range(count)]

    a_loads, b_loads = loads(BN, a_cfast), loads(BM, b_cfast)
    # per distinct channel a thread loads, its element offset (fixed for a block tile). A channel
    # beyond the group's (a tile's edge) loads the last one instead: it only feeds sums of rows or
    # columns that the epilogue does not write, and the load needs no predicate.
    chans, chan_of = [], {}
    for name, lds, origin, total, grp, stride in (("a", a_loads, "n0", "ca_g", "a_grp", "a_sc"),
                                                   ("b", b_loads, "m0", "cb_g", "b_grp", "b_sc")):
        for _, cexpr in lds:
            if (name, cexpr) not in chan_of:
                c = f"{name}c{len(chan_of)}"
                chan_of[(name, cexpr)] = c
                chans += [f"{c}at = ({grp} + min({origin} + {cexpr}, {total} - 1)) * {stride}"]

    def stage(slot):
        """Row tid's offsets into slot ``slot``, then the counters moved BK rows on."""
        out = ["ka = I64(-1)", "kb = I64(-1)", "if left > 0:",
               "    kb = b_base + cn * b_sn + cd * b_sd + ch * b_sh + cw * b_sw",
               "    id_ = cd * s_d + tap_d", "    ih = ch * s_h + tap_h", "    iw = cw * s_w + tap_w"]
        if mode == ZEROS:
            out += ["    if U64(I64(id_)) < U64(l_d) and U64(I64(ih)) < U64(l_h) and U64(I64(iw)) < U64(l_w):",
                    "        ka = a_base + cn * a_sn + id_ * a_sd + ih * a_sh + iw * a_sw"]
        else:
            out += ["    sd = source_index(id_, l_d, MODE)", "    sh = source_index(ih, l_h, MODE)",
                    "    sw = source_index(iw, l_w, MODE)",
                    "    if sd >= 0 and sh >= 0 and sw >= 0:",
                    "        ka = a_base + cn * a_sn + sd * a_sd + sh * a_sh + sw * a_sw"]
        out += [f"KA[{slot}, tid] = ka", f"KB[{slot}, tid] = kb",
                "left -= BK", "cn, cd, ch, cw = advance(cn, cd, ch, cw, dn, dd, dh, dw, o_d, o_h, o_w)"]
        return out

    def gather(slot):
        out, staged = [], {}
        for name, lds, table in (("a", a_loads, "KA"), ("b", b_loads, "KB")):
            for i, (kexpr, cexpr) in enumerate(lds):
                key = (table, kexpr)
                if key not in staged:
                    staged[key] = f"{name}k{len(staged)}"
                    out.append(f"{staged[key]} = {table}[{slot}, U64({kexpr})]")
                c = chan_of[(name, cexpr)]
                out += [f"v{name}{i} = zero",
                        f"if {staged[key]} >= 0:",
                        f"    v{name}{i} = DT({name}1[U64({staged[key]} + {c}at)])"]
        return out

    def store(slot):
        out = [f"sm[U64({b_off} + ({slot} * BK + {kexpr}) * {BMP} + {cexpr})] = vb{i}" for i, (kexpr, cexpr) in
               enumerate(b_loads)]
        out += [f"sm[U64({a_off} + ({slot} * BK + {kexpr}) * {BNP} + {cexpr})] = va{i}" for i, (kexpr, cexpr) in
                enumerate(a_loads)]
        return out

    compute = []
    for r in range(R):
        row = f"buf * BK + {r}" if KS == 1 else f"buf * BK + ks * {R} + {r}"
        compute += [f"rb{i} = sm[U64({b_off} + ({row}) * {BMP} + tm * {TM} + {i})]" for i in range(TM)]
        compute += [f"ra{j} = sm[U64({a_off} + ({row}) * {BNP} + tn * {TN} + {j})]" for j in range(TN)]
        compute += [f"c{i}_{j} += rb{i} * ra{j}" for i in range(TM) for j in range(TN)]

    def write(i, j, value):
        return [f"cb = m0 + tm * {TM} + {i}", f"ca = n0 + tn * {TN} + {j}",
                "if cb < cb_g and ca < ca_g:",
                f"    part[sp, ((b_grp + cb) * ca_g + ca) * taps + t] = {value}"]

    epi = []
    if KS == 1:
        for i in range(TM):
            for j in range(TN):
                epi += write(i, j, f"c{i}_{j}")
    else:
        # the K slices' sums added in slice order (fixed: the result does not depend on the grid)
        epi += [f"sm[U64((ks * {TXM * TXN} + tn * {TXM} + tm) * {TM * TN} + {i * TN + j})] = c{i}_{j}"
                for i in range(TM) for j in range(TN)]
        epi += ["cuda.syncthreads()", f"if tid < {TXM * TXN}:"]
        for i in range(TM):
            for j in range(TN):
                e = i * TN + j
                epi += [f"    v = sm[U64(tid * {TM * TN} + {e})]"]
                epi += [f"    v += sm[U64(({s * TXM * TXN} + tid) * {TM * TN} + {e})]" for s in range(1, KS)]
                epi += ["    " + line for line in write(i, j, "v")]
        epi += ["cuda.syncthreads()  # sm is rewritten by the next tile"]
    names = ("cn", "cd", "ch", "cw", "left", "tap_d", "tap_h", "tap_w")
    load = [f"{v} = CNT[{i}, tid]" for i, v in enumerate(names)]
    save = [f"CNT[{i}, tid] = {v}" for i, v in enumerate(names)]
    sm_size = max(2 * BK * (BMP + BNP), KS * BM * BN if KS > 1 else 0)
    src = _WGRAD_SRC.replace("SM_SIZE", str(sm_size))
    return src.format(
        ALIGN="" if SIMULATED else ", alignment=16", CHANNELS=ind(16, chans),
        ACC_INIT=ind(16, [f"c{i}_{j} = zero" for i in range(TM) for j in range(TN)]),
        STAGE0=ind(20, stage(0)), STAGE1=ind(20, stage(1)),
        GATHER0=ind(20, gather(0)), STORE0=ind(20, store(0)),
        GATHER1=ind(24, gather("nxt")), COMPUTE=ind(20, compute), STORE1=ind(24, store("nxt")),
        STAGE_LOOP=ind(20, ["if tid < BK:"] + ["    " + line for line in load + stage("buf") + save]),
        SAVE=ind(20, save),
        EPILOGUE=ind(16, epi))


@lru_cache(maxsize=None)
def wgrad_gemm_kernel(dtype_name: str, tile: str, a_cfast: bool, b_cfast: bool, mode: int = ZEROS):
    """The weight gradient as a GEMM per (group, kernel tap, K chunk):

        part[s, (cb Ca_g + ca) T + t] = sum_{k in chunk s} B[n, cb, o] A_pad[n, g Ca_g + ca, o s + t d]

    with cb = g Cb_g + cb_l (group g), k = (n, o) (batch and output pixel, o row-major), A read
    unpadded (any padding mode, any pad width; no padded copy). M = Cb_g rows, N = Ca_g columns.
    a1 / b1 are flat views of the operands' memory (convfast.cuda._engine.flat), read through
    element offsets: base + n sn + c sc + d sd + h sh + w sw.

    A block computes a BM x BN tile of one (group, tap, chunk) with 256 threads: KS slices of K
    (KS > 1 for the narrow tile) of threads each holding a TM x TN register block of adjacent rows
    and columns (vector shared-memory reads). Per K tile of BK rows, BK threads stage each row's
    element offset in a and in b in shared memory (-1 for a padded position of a or a row beyond the
    chunk): they carry the row's (n, od, oh, ow) along K with ``_advance`` (no division in the
    loop), and apply the padding mode (a compile-time constant) once per row, not per element. The
    loading threads then do one add and one compare per element. The tiles are double-buffered like
    the forward GEMM's: tile kt+1 is loaded into registers before the FMAs of tile kt, one barrier
    per tile. With KS > 1 the slices' sums are added at the end in slice order.

    a_cfast / b_cfast: that operand has its channels innermost in memory (channels_last); its loads
    then give consecutive threads consecutive channels, else consecutive k (pixels), so that global
    loads coalesce either way. The summation order of an output depends on the shape and the tile
    only, never on the grid or the flags."""
    BM, BN, BK, TM, TN, KS = WGRAD_TILES[tile]
    namespace = dict(cuda=cuda, DT=_numba_dtype(dtype_name), I64=I64, U64=U64, BM=BM, BN=BN, BK=BK,
                     TXM=BM // TM, TXN=BN // TN, MODE=mode, source_index=source_index,
                     decode=_decode, advance=_advance, tap_origin=_tap_origin)
    exec(compile(_wgrad_source(tile, a_cfast, b_cfast, mode), f"<convfast wgrad {tile}>", "exec"), namespace)
    return _jit(namespace["kernel"], (256, 2))


@lru_cache(maxsize=None)
def wgrad_small_kernel(dtype_name: str, threads: int = REDUCE_THREADS, mode: int = ZEROS, lanes_w: int = 16):
    """The weight gradient of groups with at most SMALL_WEIGHTS weights per tap (Ca_g x Cb_g:
    depthwise, channel multipliers, ResNeXt-like 4 x 4), where a GEMM tile would be mostly idle:
    one block per (group, tap, K chunk) (grid x, grid-stride) computes all the group's weights of
    the tap. Thread tid takes weight tid % lanes_w (lanes_w, a compile-time power of two >=
    Ca_g x Cb_g; lanes beyond the group's weights compute a copy that is not written) and the k
    = lane, lane + S, ... of the chunk (lane = tid // lanes_w, S = threads / lanes_w: consecutive
    lanes read consecutive pixels), with one scalar accumulator (a register) and its (n, od, oh, ow)
    carried along k by ``_advance`` (no division in the loop). A fixed shared-memory tree then adds
    the lanes' sums. Same operands and ``part`` layout as wgrad_gemm_kernel; padded positions are
    multiplied as zeros, as the GEMM does; the padding mode is a compile-time constant."""
    NT = threads
    NWP = lanes_w
    S = NT // NWP
    DT = _numba_dtype(dtype_name)

    @cuda.jit(inline="always", device=True)
    def a_offset(cn, cd, ch, cw, s_d, s_h, s_w, off_d, off_h, off_w, l_d, l_h, l_w, a_base, a_sn, a_sd, a_sh, a_sw):
        """The element offset of a's pixel for k = (cn, cd, ch, cw), channel 0, base included (>= 0
        whatever the strides' signs), or -1 where the tap reads a padded zero."""
        sd = source_index(cd * s_d + off_d, l_d, mode)
        sh = source_index(ch * s_h + off_h, l_h, mode)
        sw = source_index(cw * s_w + off_w, l_w, mode)
        if sd >= 0 and sh >= 0 and sw >= 0:
            return a_base + cn * a_sn + sd * a_sd + sh * a_sh + sw * a_sw
        return I64(-1)

    @cuda.jit
    def kernel(a1, b1, part, a_base, a_sn, a_sc, a_sd, a_sh, a_sw, b_base, b_sn, b_sc, b_sd, b_sh, b_sw,
               l_d, l_h, l_w, o_d, o_h, o_w, batch, k_h, k_w, s_d, s_h, s_w, d_d, d_h, d_w, p_d, p_h, p_w,
               num_groups, cb_g, ca_g, taps, splits, chunk):
        red = cuda.shared.array(NT, DT)
        tid = cuda.threadIdx.x
        w = tid % NWP
        lane = tid // NWP
        nw = ca_g * cb_g
        wv = min(w, nw - 1)
        ca = wv % ca_g
        cb = wv // ca_g
        k_total = batch * (o_d * o_h * o_w)
        dn, dd, dh, dw = _digits(S, o_d, o_h, o_w)
        for item in range(cuda.blockIdx.x, splits * num_groups * taps, cuda.gridDim.x):
            t = item % taps
            rest = item // taps
            g = rest % num_groups
            sp = rest // num_groups
            off_d, off_h, off_w = _tap_origin(t, k_h, k_w, d_d, d_h, d_w, p_d, p_h, p_w)
            a_ch = (g * ca_g + ca) * a_sc
            b_ch = b_base + (g * cb_g + cb) * b_sc
            k_begin = sp * chunk
            left = min(k_begin + chunk, k_total) - k_begin - lane
            cn, cd, ch, cw = _decode(k_begin + lane, o_d, o_h, o_w)
            acc = DT(0)
            while left > 0:
                ka = a_offset(cn, cd, ch, cw, s_d, s_h, s_w, off_d, off_h, off_w, l_d, l_h, l_w, a_base, a_sn, a_sd,
                              a_sh, a_sw)
                va = DT(0)
                if ka >= 0:
                    va = DT(a1[U64(a_ch + ka)])
                acc += va * DT(b1[U64(b_ch + cn * b_sn + cd * b_sd + ch * b_sh + cw * b_sw)])
                left -= S
                cn, cd, ch, cw = _advance(cn, cd, ch, cw, dn, dd, dh, dw, o_d, o_h, o_w)
            red[tid] = acc
            cuda.syncthreads()
            half = S // 2
            while half > 0:
                if lane < half:
                    red[tid] += red[tid + half * NWP]
                cuda.syncthreads()
                half //= 2
            if tid < nw:  # lane 0 of weight (cb_l, ca) = (tid // ca_g, tid % ca_g) of group g
                part[sp, ((g * cb_g + cb) * ca_g + ca) * taps + t] = red[tid]
            cuda.syncthreads()  # red is rewritten by the next item

    return kernel


def small_lanes(weights: int) -> int:
    """wgrad_small_kernel's lanes_w for a group of ``weights`` weights per tap (<= SMALL_WEIGHTS)."""
    lanes = 1
    while lanes < weights:
        lanes *= 2
    return lanes


@lru_cache(maxsize=None)
def bias_kernel(dtype_name: str, threads: int = REDUCE_THREADS):
    """grad_bias partial sums: part[s, c] = the sum of gy[n, c, o] over the k = (n, o) of chunk s;
    one block per (chunk, channel) (grid x, grid-stride), threads splitting the chunk (k carried by
    ``_advance``), a fixed shared-memory tree adding their sums."""
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
        k_total = gy.shape[0] * (o_d * o_h * o_w)
        dn, dd, dh, dw = _digits(NT, o_d, o_h, o_w)
        for item in range(cuda.blockIdx.x, splits * channels, cuda.gridDim.x):
            c = item % channels
            sp = item // channels
            acc = DT(0)
            left = min(sp * chunk + chunk, k_total) - sp * chunk - tid
            cn, cd, ch, cw = _decode(sp * chunk + tid, o_d, o_h, o_w)
            while left > 0:
                acc += DT(gy[cn, c, cd, ch, cw])
                left -= NT
                cn, cd, ch, cw = _advance(cn, cd, ch, cw, dn, dd, dh, dw, o_d, o_h, o_w)
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
           "small_lanes",
           "bias_kernel", "split_sum_kernel", "fill_zero_kernel"]
