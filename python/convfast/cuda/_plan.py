"""Host-side planning for the GPU kernels: pure NumPy, no Numba (so it is importable and testable
without a GPU).

Every call is reduced to the same N-D problem the CPU engine solves: three spatial axes (1-D and
2-D get unit leading axes), split into *phases*. A forward convolution has one phase; a transposed
convolution has one phase per combination of output residues ``o mod stride`` (stride-phase
decomposition). Inside a phase, output ``o = q * out_step + residue`` reads input coordinate
``q * in_step + offset[tap]`` on every axis, so each phase is an ordinary gather convolution with
its own tap subset: no zeros are inserted and multiplied, and every output is written by exactly one
thread (no atomics).

The plan is two small int32 tables that the kernels index instead of dividing by the kernel size:

* ``phases`` (P, 8): q extent per axis (D, H, W), output residue per axis, the phase's first row in
  ``ktab`` and its number of rows (its K = C_in/G x taps of the phase);
* ``ktab`` (K_total, 8): one row per reduction index k: input channel within the group, input
  offset per axis (D, H, W), kernel tap per axis (D, H, W) (read only by the weight-packing
  kernel), and a zero.

The packed weights follow ``ktab``'s row order: (G, K_total, C_out/G), so a K-step of the GEMM
reads contiguous rows of output channels (coalesced).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import numpy as np

Triple = Tuple[int, int, int]

# GEMM block tiles: (BM output pixels, BN output channels, BK reduction step, TM, TN register block
# per thread). Every config runs (BM/TM) x (BN/TN) = 256 threads.
TILES = {
    "wide": (64, 64, 8, 4, 4),      # the default
    "large": (128, 128, 8, 8, 8),   # float32 layers with many output channels and pixels
    "narrow": (128, 16, 8, 8, 1),   # few output channels per group: a 64-wide N tile would be mostly empty
}
KERNELS = ("direct", "depthwise") + tuple(TILES)

# The direct (depthwise) kernel: threads per block and outputs per thread.
DIRECT_THREADS = 128
DIRECT_PER_THREAD = 4
DIRECT_CHUNK = 256  # reduction rows (weights + ktab rows) staged in shared memory at a time


@dataclass(frozen=True)
class GpuPlan:
    transposed: bool
    in_step: Triple        # input coordinate step per q (forward: stride; transposed: 1)
    out_step: Triple       # output coordinate step per q (forward: 1; transposed: stride)
    ci_inner: bool         # ktab order: channel fastest (channels-last memory) or taps fastest
    phases: np.ndarray     # (P, 8) int32
    ktab: np.ndarray       # (max(K_total, 1), 8) int32
    k_total: int
    max_q: int             # the largest phase (output pixels per image)
    max_k: int             # the largest phase's K
    fits_int32: bool       # every coordinate the kernels form fits in 32 bits (else not runnable)

    @property
    def num_phases(self) -> int:
        return int(self.phases.shape[0])


def _axis_phases(transposed: bool, n_in: int, n_out: int, k: int, s: int, d: int, p: int):
    """[(q extent, residue, taps, offsets)] for one spatial axis."""
    taps = np.arange(k, dtype=np.int64)
    if not transposed:
        return [(n_out, 0, taps, taps * d - p)]
    phases = []
    for r in range(min(s, n_out)):
        q = (n_out - r + s - 1) // s
        # o + p = i * s + t * d with o = q' * s + r  =>  i = q' + (r + p - t * d) / s, exact.
        num = np.int64(r + p) - taps * d
        hit = num % s == 0
        offsets = num[hit] // s
        t = taps[hit]
        # Only taps that reach an input for some q' in [0, q): the others would only multiply
        # implicit zeros.
        reach = (offsets + (q - 1) >= 0) & (offsets <= n_in - 1)
        phases.append((q, r, t[reach], offsets[reach]))
    return phases


@lru_cache(maxsize=256)
def build_plan(transposed: bool, in_spatial: Triple, out_spatial: Triple, kernel: Triple, stride: Triple,
               dilation: Triple, pad_before: Triple, cin_g: int, ci_inner: bool) -> GpuPlan:
    """The phase and reduction tables of one problem (all arguments rank-3 tuples: unit axes first).
    Cached: a repeated call with the same geometry reuses the (read-only) tables."""
    axes = [_axis_phases(transposed, *args)
            for args in zip(in_spatial, out_spatial, kernel, stride, dilation, pad_before)]
    ci = np.arange(cin_g, dtype=np.int64)
    rows, phase_rows = [], []
    start = 0
    for (qd, rd, td, od), (qh, rh, th, oh), (qw, rw, tw, ow) in itertools.product(*axes):
        # all taps of the phase, D slowest: (T, 3) taps and offsets
        grid = np.stack(np.meshgrid(np.arange(td.size), np.arange(th.size), np.arange(tw.size),
                                    indexing="ij"), -1).reshape(-1, 3)
        taps = np.stack([td[grid[:, 0]], th[grid[:, 1]], tw[grid[:, 2]]], 1)
        offs = np.stack([od[grid[:, 0]], oh[grid[:, 1]], ow[grid[:, 2]]], 1)
        t = taps.shape[0]
        if ci_inner:   # k = tap * C_in/G + ci: consecutive k are consecutive channels in memory
            tap_of_k, ci_of_k = np.repeat(np.arange(t), cin_g), np.tile(ci, t)
        else:          # k = ci * taps + tap: consecutive k walk along the kernel (channels-first)
            tap_of_k, ci_of_k = np.tile(np.arange(t), cin_g), np.repeat(ci, t)
        block = np.zeros((t * cin_g, 8), dtype=np.int64)
        block[:, 0] = ci_of_k
        block[:, 1:4] = offs[tap_of_k]
        block[:, 4:7] = taps[tap_of_k]
        rows.append(block)
        phase_rows.append((qd, qh, qw, rd, rh, rw, start, block.shape[0]))
        start += block.shape[0]
    phases = np.array(phase_rows, dtype=np.int64).reshape(-1, 8)
    ktab = np.concatenate(rows) if start else np.zeros((1, 8), dtype=np.int64)
    # The kernels read the tables as int32 and form coordinates q * step + offset: all must fit.
    limit = 2 ** 31 - 1
    reach = max(int(np.abs(ktab).max()), int(np.abs(phases).max())) + \
        max(int(phases[:, a].max()) * s for a, s in zip(range(3), stride))
    fits = reach < limit and max(in_spatial) < limit and max(out_spatial) < limit
    phases, ktab = phases.astype(np.int32), ktab.astype(np.int32)
    phases.flags.writeable = False
    ktab.flags.writeable = False
    q_sizes = phases[:, 0] * phases[:, 1] * phases[:, 2]
    return GpuPlan(transposed=transposed,
                   in_step=(1, 1, 1) if transposed else tuple(stride),
                   out_step=tuple(stride) if transposed else (1, 1, 1),
                   ci_inner=ci_inner, phases=phases, ktab=ktab, k_total=start,
                   max_q=int(q_sizes.max()), max_k=int(phases[:, 7].max()), fits_int32=fits)


def choose_kernel(cin_g: int, cout_g: int, dtype: np.dtype, pixels: int) -> str:
    """Which kernel computes a problem. CONVFAST_CUDA_KERNEL=direct|depthwise|wide|large|narrow forces one
    (tests, comparisons). The thresholds are a first guess, not measured on a GPU yet (see
    docs/gpu.md). Whatever is chosen, a transposed convolution with a non-finite weight is computed
    by the direct kernel (see _engine.compute)."""
    forced = os.environ.get("CONVFAST_CUDA_KERNEL", "").strip().lower()
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"CONVFAST_CUDA_KERNEL must be one of {KERNELS}, got {forced!r}")
        return forced
    if cin_g == 1 and cout_g <= 4:
        # depthwise: K = taps only, a GEMM tile would be mostly padding. The engine runs a forward
        # one on depthwise_kernel (shared-memory input tiles) where its tile fits.
        return "depthwise"
    if cout_g <= 16:
        return "narrow"
    if np.dtype(dtype) == np.float32 and cout_g >= 128 and pixels >= 128 * 128:
        return "large"
    return "wide"
