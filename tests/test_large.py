"""Large problems: more than 2**31 output elements, so that every offset computation must be 64-bit.

Slow (up to a few minutes per test and ~9-11 GiB of memory each, one at a time), so not part of CI:
every test here is marked ``slow`` and skipped unless ``CONVFAST_RUN_SLOW=1`` is set and at least
20 GiB of memory is available (``MemAvailable`` in /proc/meminfo). ``scripts/run_large.sh`` runs them.

What could go wrong with 32-bit arithmetic anywhere (a row offset, a channel offset, a loop counter,
an output coordinate, a byte count) shows up as wrong values or a crash at and beyond flat index 2**31,
so each test checks the whole region around that index, the last elements, and samples everywhere,
against an independent float64 computation (an explicit per-tap sum) or ``convfast.reference`` on
small slices of the input.
"""
import os

import numpy as np
import pytest

import convfast
from convfast import reference
from conftest import assert_close

INT32_LIMIT = 2**31


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


_MEM = _mem_available_gib()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CONVFAST_RUN_SLOW") != "1",
                       reason="large (> 2**31 elements) tests: set CONVFAST_RUN_SLOW=1 (scripts/run_large.sh)"),
    pytest.mark.skipif(_MEM is None or _MEM < 20,
                       reason=f"needs >= 20 GiB of available memory (MemAvailable: {_MEM})"),
]


def _samples(rng, n, limit, must=()):
    idx = np.concatenate([rng.integers(0, limit, n), np.asarray(must, dtype=np.int64)])
    return np.unique(idx[(idx >= 0) & (idx < limit)])


def test_conv1d_channel_offsets_beyond_int32():
    """conv1d, N=1, C_in=1 -> C_out=64 over a 34M-sample signal: 2.18e9 output elements (8.7 GB of
    float32). Flat output index 2**31 lies inside channel 63, so channel offsets exceed int32."""
    L = 2**25 + 2**19
    cout = 64
    assert cout * L > INT32_LIMIT
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((1, 1, L), dtype=np.float32)
    w = rng.standard_normal((cout, 1, 3), dtype=np.float32)
    b = rng.standard_normal(cout, dtype=np.float32)
    y = convfast.conv1d(x, w, b, padding=1)
    assert y.shape == (1, cout, L) and y.dtype == np.float32 and y.flags.c_contiguous
    assert y.size > INT32_LIMIT

    xp = np.pad(x[0, 0].astype(np.float64), 1)          # zero padding, float64
    w64, b64 = w.astype(np.float64), b.astype(np.float64)

    def channel(c):                                      # explicit per-tap sum, whole channel
        return b64[c] + w64[c, 0, 0] * xp[:L] + w64[c, 0, 1] * xp[1:L + 1] + w64[c, 0, 2] * xp[2:L + 2]

    boundary_channel = INT32_LIMIT // L                  # the channel holding flat index 2**31
    assert boundary_channel * L < INT32_LIMIT < (boundary_channel + 1) * L
    for c in sorted({0, 1, cout // 2, boundary_channel - 1, boundary_channel, cout - 1}):
        assert_close(y[0, c], channel(c), dtype=np.float32, reduction_size=3)

    flat = y.reshape(-1)
    # Samples over every channel (and flat indices 2**31 - 8 .. 2**31 + 7), as explicit dot products.
    idx = _samples(rng, 20000, y.size, must=[0, y.size - 1, *range(INT32_LIMIT - 8, INT32_LIMIT + 8)])
    c, t = np.divmod(idx, L)
    expected = b64[c] + (w64[c, 0, :] * np.stack([xp[t], xp[t + 1], xp[t + 2]], axis=1)).sum(axis=1)
    assert_close(flat[idx], expected, dtype=np.float32, reduction_size=3)

    # convfast.reference on small slices of the input (with the padding where a slice meets an end).
    for t0, t1 in [(0, 64), (L // 2, L // 2 + 64), (INT32_LIMIT - boundary_channel * L - 32,
                                                     INT32_LIMIT - boundary_channel * L + 32), (L - 64, L)]:
        lo, hi = max(t0 - 1, 0), min(t1 + 1, L)
        ref = reference.conv1d(x[:, :, lo:hi], w, b, padding=[(int(t0 == 0), int(t1 == L))])
        assert_close(y[:, :, t0:t1], ref, dtype=np.float32, reduction_size=3)


def test_conv_transpose2d_row_offsets_beyond_int32():
    """conv_transpose2d with stride 4 and a 4x4 kernel: a (32766, 67582) output plane of 2.21e9
    elements (8.9 GB of float32), so row offsets exceed int32 inside a single plane.

    (One *axis* longer than 2**31 is out of reach on a 24 GiB machine: the engine's per-axis index
    tables hold 8 bytes per output position and tap of an axis, several times the output itself.)"""
    H, W = 2**13, 2**14 + 2**9
    s = k = 4
    crop = 1
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 1, H, W), dtype=np.float32)
    w = rng.standard_normal((1, 1, k, k), dtype=np.float32)
    b = np.array([0.25], dtype=np.float32)
    y = convfast.conv_transpose2d(x, w, b, stride=s, padding=crop)
    oh, ow = (H - 1) * s - 2 * crop + k, (W - 1) * s - 2 * crop + k
    assert y.shape == (1, 1, oh, ow) and y.size > INT32_LIMIT and y.dtype == np.float32

    # With k == stride, full-output position f = o + crop gets exactly tap f % s of input f // s:
    # y[oh, ow] = b + x[fh // s, fw // s] * w[fh % s, fw % s].
    x64, w64 = x[0, 0].astype(np.float64), w[0, 0].astype(np.float64)
    iw, tw = np.divmod(np.arange(ow) + crop, s)

    def expected_rows(r0, r1):
        ih, th = np.divmod(np.arange(r0, r1) + crop, s)
        return 0.25 + x64[ih][:, iw] * w64[th][:, tw]

    plane = y[0, 0]
    boundary_row = INT32_LIMIT // ow                          # the row holding flat index 2**31
    assert boundary_row * ow < INT32_LIMIT < (boundary_row + 1) * ow
    for r0 in (0, boundary_row - 256, oh - 512):              # both ends and the 2**31 crossing
        assert_close(plane[r0:r0 + 512], expected_rows(r0, r0 + 512), dtype=np.float32, reduction_size=1)
    flat = y.reshape(-1)
    idx = _samples(rng, 50000, y.size, must=[0, y.size - 1, INT32_LIMIT - 1, INT32_LIMIT, INT32_LIMIT + 1])
    rr, cc = np.divmod(idx, ow)
    fh, fw = rr + crop, cc + crop
    assert_close(flat[idx], 0.25 + x64[fh // s, fw // s] * w64[fh % s, fw % s], dtype=np.float32, reduction_size=1)

    # convfast.reference on a slice of the input around the crossing: inputs rows i0..i1, columns
    # j0..j1 produce exactly the full outputs [i0*s, i1*s) x [j0*s, j1*s) (k == s), i.e. o = f - crop.
    i0, j0 = (boundary_row + crop) // s - 4, W // 2
    i1, j1 = i0 + 8, j0 + 8
    ref = reference.conv_transpose2d(x[:, :, i0:i1, j0:j1], w, b, stride=s)
    o_h, o_w = i0 * s - crop, j0 * s - crop
    assert_close(plane[o_h:o_h + (i1 - i0) * s, o_w:o_w + (j1 - j0) * s], ref[0, 0], dtype=np.float32)


def test_pad_beyond_int32_elements():
    """convfast.pad past 2**31 elements: a 3-D uint8 array in reflect mode and a 2-D one in constant
    mode, ~2.2 GB in and out each, whose padded rows start beyond byte offset 2**31.

    (A 1-D pad of that size is out of reach on a 24 GiB machine: the kernel's per-axis index maps
    hold 8 bytes per output position of an axis, 8x a uint8 output.)"""
    pattern = (np.arange(251 * 4096) % 251).astype(np.uint8)
    shape = (2**11, 2**10, 2**10 + 5)
    src = np.resize(pattern, shape)
    widths = ((3, 2), (1, 4), (6, 5))
    out = convfast.pad(src, widths, mode="reflect")
    assert out.shape == tuple(n + b + a for n, (b, a) in zip(shape, widths)) and out.size > INT32_LIMIT
    (b0, a0), (b1, a1), (b2, a2) = widths
    assert np.array_equal(out[b0:-a0, b1:-a1, b2:-a2], src)
    # reflect per axis, checked on the outermost slabs against np.pad of the same slab of src
    assert np.array_equal(out[:b0], np.pad(src[b0:0:-1], ((0, 0),) + widths[1:], mode="reflect"))
    assert np.array_equal(out[-a0:], np.pad(src[-2:-2 - a0:-1], ((0, 0),) + widths[1:], mode="reflect"))
    rows = np.random.default_rng(3).integers(0, out.shape[0], 64)
    for i in rows:
        src_i = np.pad(np.arange(shape[0]), widths[0], mode="reflect")[i]
        assert np.array_equal(out[i], np.pad(src[src_i], widths[1:], mode="reflect"))
    del out

    rows, cols = 2**15, 2**16 + 3
    src2 = np.resize(pattern, (rows, cols))
    out2 = convfast.pad(src2, ((2, 1), (5, 4)), mode="constant", constant_values=((7, 8), (9, 10)))
    assert out2.shape == (rows + 3, cols + 9) and out2.size > INT32_LIMIT
    assert np.array_equal(out2[2:-1, 5:-4], src2)
    # np.pad's order: axis 0's constants fill the new rows, then axis 1's the new columns (corners too)
    assert (out2[:2, 5:-4] == 7).all() and (out2[-1, 5:-4] == 8).all()
    assert (out2[:, :5] == 9).all() and (out2[:, -4:] == 10).all()
