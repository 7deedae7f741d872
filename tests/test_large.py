"""Large problems: more than 2**31 output elements, so that every offset computation must be 64-bit.

Slow (about a minute per test and ~9-11 GiB of memory each, one at a time), so not part of CI:
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
    expected_flat = channel(boundary_channel)[INT32_LIMIT - boundary_channel * L - 4:][:8]
    assert_close(flat[INT32_LIMIT - 4:INT32_LIMIT + 4], expected_flat, dtype=np.float32, reduction_size=3)

    # Samples over every channel, as explicit dot products.
    idx = _samples(rng, 20000, y.size, must=[0, y.size - 1, INT32_LIMIT - 1, INT32_LIMIT, 2**32 % y.size])
    c, t = np.divmod(idx, L)
    expected = b64[c] + (w64[c, 0, :] * np.stack([xp[t], xp[t + 1], xp[t + 2]], axis=1)).sum(axis=1)
    assert_close(flat[idx], expected, dtype=np.float32, reduction_size=3)

    # convfast.reference on small slices of the input (with the padding where a slice meets an end).
    for t0, t1 in [(0, 64), (L // 2, L // 2 + 64), (INT32_LIMIT - boundary_channel * L - 32,
                                                     INT32_LIMIT - boundary_channel * L + 32), (L - 64, L)]:
        lo, hi = max(t0 - 1, 0), min(t1 + 1, L)
        ref = reference.conv1d(x[:, :, lo:hi], w, b, padding=[(int(t0 == 0), int(t1 == L))])
        assert_close(y[:, :, t0:t1], ref, dtype=np.float32, reduction_size=3)


def test_conv_transpose1d_spatial_coordinates_beyond_int32():
    """conv_transpose1d with stride 64 and a 64-tap kernel: one output axis of 2.16e9 elements
    (8.6 GB of float32), so output *coordinates* exceed int32, not only offsets."""
    L = 2**25 + 2**17
    s = k = 64
    crop = 3
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, L), dtype=np.float32)
    w = rng.standard_normal((2, 1, k), dtype=np.float32)
    b = np.array([0.25], dtype=np.float32)
    y = convfast.conv_transpose1d(x, w, b, stride=s, padding=crop)
    n_out = (L - 1) * s - 2 * crop + k
    assert y.shape == (1, 1, n_out) and n_out > INT32_LIMIT

    # With k == stride, full-output position f = o + crop gets exactly tap f % s of input f // s
    # from each input channel: y[o] = b + sum_ci x[ci, f // s] * w[ci, 0, f % s].
    x64, w64 = x[0].astype(np.float64), w[:, 0, :].astype(np.float64)

    def expected(o):
        f = o + crop
        i, t = np.divmod(f, s)
        return 0.25 + x64[0, i] * w64[0, t] + x64[1, i] * w64[1, t]

    row = y[0, 0]
    chunk = 2**25
    starts = [0, INT32_LIMIT - chunk // 2, n_out - chunk]     # both ends and the 2**31 crossing
    for start in starts:
        o = np.arange(start, start + chunk, dtype=np.int64)
        assert_close(row[start:start + chunk], expected(o), dtype=np.float32, reduction_size=2)
    idx = _samples(rng, 50000, n_out, must=[0, n_out - 1, INT32_LIMIT - 1, INT32_LIMIT, INT32_LIMIT + 1])
    assert_close(row[idx], expected(idx), dtype=np.float32, reduction_size=2)

    # convfast.reference on a slice of the input around the crossing: inputs i0..i1 produce the full
    # outputs i0*s .. (i1+1)*s - 1 exactly (k == s), i.e. outputs o = f - crop.
    i0 = (INT32_LIMIT + crop) // s - 8
    i1 = i0 + 16
    ref = reference.conv_transpose1d(x[:, :, i0:i1], w, b, stride=s)      # full outputs of the slice
    o0 = i0 * s - crop
    assert_close(row[o0:o0 + (i1 - i0) * s], ref[0, 0], dtype=np.float32, reduction_size=2)


def test_pad_beyond_int32_elements():
    """convfast.pad of a 2**31 + 2**20 byte array (reflect) and a 2-D array whose padded rows start
    beyond byte offset 2**31 (constant): ~4.3 GB each."""
    n = INT32_LIMIT + 2**20
    pattern = (np.arange(251 * 4096) % 251).astype(np.uint8)
    src = np.resize(pattern, n)
    before, after = 1000, 777
    out = convfast.pad(src, (before, after), mode="reflect")
    assert out.shape == (n + before + after,) and out.dtype == np.uint8
    assert np.array_equal(out[before:before + n], src)
    assert np.array_equal(out[:before], src[before:0:-1])
    assert np.array_equal(out[before + n:], src[n - 2:n - 2 - after:-1])
    del out

    rows, cols = 2**15, 2**16 + 3
    src2 = np.resize(pattern, (rows, cols))
    out2 = convfast.pad(src2, ((2, 1), (5, 4)), mode="constant", constant_values=((7, 8), (9, 10)))
    assert out2.shape == (rows + 3, cols + 9) and out2.size > INT32_LIMIT
    assert np.array_equal(out2[2:-1, 5:-4], src2)
    # np.pad's order: axis 0's constants fill the new rows, then axis 1's the new columns (corners too)
    assert (out2[:2, 5:-4] == 7).all() and (out2[-1, 5:-4] == 8).all()
    assert (out2[:, :5] == 9).all() and (out2[:, -4:] == 10).all()
