"""Regression tests for the reliability findings (issue 6): misaligned operands, non-finite weights in
transposed convolutions, strides far larger than the kernel, memory that must not scale with the
stride or with an axis' length, and pad's argument checks matching np.pad."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convfast
from conftest import assert_close, requires_torch


def _misaligned(shape, dtype):
    """A C-contiguous array whose data pointer is not aligned to its itemsize."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + dtype.itemsize, np.uint8)[1:1 + n]
    a = raw.view(dtype).reshape(shape)
    assert not a.flags.aligned
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["x", "weight", "bias", "out"])
def test_misaligned_operands(dtype, which):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((2, 3, 9)).astype(dtype), "weight": rng.standard_normal((4, 3, 3)).astype(dtype),
              "bias": rng.standard_normal(4).astype(dtype)}
    expected = convfast.reference.conv1d(arrays["x"], arrays["weight"], arrays["bias"], padding=1)
    if which == "out":
        out = _misaligned((2, 4, 9), dtype)
        got = convfast.conv1d(arrays["x"], arrays["weight"], arrays["bias"], padding=1, out=out)
        assert got is out
    else:
        bad = _misaligned(arrays[which].shape, dtype)
        bad[...] = arrays[which]
        arrays[which] = bad
        got = convfast.conv1d(arrays["x"], arrays["weight"], arrays["bias"], padding=1)
    assert_close(got, expected, dtype, reduction_size=9)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_transposed_non_finite_weight_touches_only_real_products(bad_value):
    # y[o] = sum over real inputs i of x[i] * w[o - i]: the ends of the output never meet w[1].
    y = convfast.conv_transpose1d(np.ones((1, 1, 3)), np.array([[[1.0, bad_value, 1.0]]]))
    assert y[0, 0, 0] == 1.0 and y[0, 0, -1] == 1.0
    assert not np.isfinite(y[0, 0, 1:-1]).any()


@requires_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_non_finite_weight_matches_torch(dtype):
    import torch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 6)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    w[1, 2, 0, 2] = np.nan
    w[3, 0, 2, 1] = np.inf
    kwargs = dict(stride=2, padding=1, output_padding=1)
    got = convfast.conv_transpose2d(x, w, **kwargs)
    want = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), **kwargs).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert_close(got[finite], want[finite], dtype, reduction_size=4 * 9)


@pytest.mark.parametrize("stride,kernel", [(3, 2), (5, 1), (7, 3), (10 ** 6, 2)])
@pytest.mark.parametrize("padding", [0, 1])
def test_transposed_stride_beyond_kernel_fills_bias(stride, kernel, padding):
    rng = np.random.default_rng(stride + kernel)
    x = rng.standard_normal((1, 2, 3))
    w = rng.standard_normal((2, 3, kernel))
    b = rng.standard_normal(3)
    got = convfast.conv_transpose1d(x, w, b, stride=stride, padding=padding)
    assert_close(got, convfast.reference.conv_transpose1d(x, w, b, stride=stride, padding=padding), np.float64)


def _peak_rss_mib_of(code: str) -> float:
    """Run code in a fresh interpreter; return the growth of its peak RSS while code ran (MiB)."""
    script = textwrap.dedent(f"""
        import resource, numpy as np, convfast
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {code}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return float(res.stdout.split()[-1])


def test_huge_transposed_stride_memory_is_the_output():
    # 3 inputs, stride 10**7: the output has 2 * 10**7 + 1 float32 values (80 MB); the plan must
    # not hold per-residue state for ten million empty phases.
    grew = _peak_rss_mib_of("y = convfast.conv_transpose1d(np.ones((1, 1, 3), np.float32), "
                            "np.ones((1, 1, 1), np.float32), stride=10**7); assert y.sum() == 3")
    assert grew < 80 + 60, grew


def test_long_axis_working_memory_is_small():
    # A 1-D signal of 2**24 float32 samples with a 15-tap kernel: output 64 MiB. Index tables per
    # output position and tap would add 8 * 15 bytes per sample (~1.9 GiB).
    grew = _peak_rss_mib_of("x = np.ones((1, 1, 2**24), np.float32); w = np.ones((1, 1, 15), np.float32)\n"
                            "        y = convfast.conv1d(x, w, padding='same', padding_mode='reflect')")
    assert grew < 64 + 64 + 60, grew


def test_pad_long_axis_working_memory_is_small():
    grew = _peak_rss_mib_of("a = np.zeros(2**26, np.uint8); p = convfast.pad(a, 5, mode='reflect')")
    assert grew < 64 + 64 + 30, grew


@pytest.mark.parametrize("widths", [np.array([1, 2], np.uint8), np.array(1, np.uint64), [True, False], 1.0])
def test_pad_width_types_match_numpy(widths):
    with pytest.raises(TypeError):
        np.pad(np.ones(3), widths)
    with pytest.raises(TypeError, match="convfast.pad.*pad_width"):
        convfast.pad(np.ones(3), widths)


def test_pad_validates_constants_even_when_empty():
    with pytest.raises(ValueError):
        np.pad(np.ones((0, 2)), 0, constant_values="x")
    with pytest.raises(ValueError):
        convfast.pad(np.ones((0, 2)), 0, constant_values="x")


def test_core_handles_empty_output_axis():
    # The compiled entry point is reachable directly: an empty output axis must not divide by zero.
    from convfast import _core
    x = np.ones((1, 1, 1, 1, 4), np.float32)
    w = np.ones((1, 1, 1, 1, 1, 3), np.float32)
    y = np.empty((1, 1, 1, 1, 0), np.float32)
    _core.conv(x, w, None, y, 0, (1, 1, 1), (1, 1, 1), (0, 0, 0), 0)


@pytest.mark.parametrize("stride,dilation,pad", [((1, 1, 2 ** 62), (1, 1, 1), (0, 0, 0)),
                                                 ((1, 1, 1), (1, 1, 2 ** 62), (0, 0, 0)),
                                                 ((1, 1, 1), (1, 1, 1), (0, 0, 2 ** 62)),
                                                 ((1, 1, 1), (1, 1, 1), (0, 0, -2 ** 62))])
def test_core_rejects_overflowing_index_arithmetic(stride, dilation, pad):
    from convfast import _core
    x = np.ones((1, 1, 1, 1, 4), np.float32)
    w = np.ones((1, 1, 1, 1, 1, 3), np.float32)
    y = np.empty((1, 1, 1, 1, 2), np.float32)
    for kind in (0, 1):
        with pytest.raises(ValueError, match="64-bit"):
            _core.conv(x, w, None, y, kind, stride, dilation, pad, 0)


@pytest.mark.parametrize("algo", ["auto", "direct", "gemm"])
def test_core_huge_stride_on_a_single_output(algo, monkeypatch):
    # One output along the axis: the stride never steps, but the direct path's row buffers extend
    # to a whole tile and must not compute coordinates with it (UBSan finding of the fuzz harness).
    from convfast import _core
    if algo != "auto":
        monkeypatch.setenv("CONVFAST_ALGO", algo)
    x = np.arange(4.0).reshape(1, 1, 1, 1, 4)
    w = np.ones((1, 1, 1, 1, 1, 3))
    y = np.empty((1, 1, 1, 1, 1))
    _core.Plan(x, w, y, 0, (1, 1, 2 ** 62), (1, 1, 1), (0, 0, 0), 4).execute(x, w, None, y)
    assert y.ravel().tolist() == [3.0]


@pytest.mark.parametrize("direct_mode", ["rows", "planes"])
@pytest.mark.parametrize("seed", range(12))
def test_direct_row_and_plane_modes_agree_with_reference(direct_mode, seed, monkeypatch):
    # The direct path buffers either single rows or 2-D slabs of rows (short rows); both layouts
    # must give the reference's result for every stride / dilation / padding mode / transposition.
    monkeypatch.setenv("CONVFAST_ALGO", "direct")
    if direct_mode == "rows":
        monkeypatch.setenv("CONVFAST_DIRECT", "rows")
    else:
        monkeypatch.delenv("CONVFAST_DIRECT", raising=False)
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(1, 4))
    groups = int(rng.choice([1, 2]))
    cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 4))
    spatial = tuple(int(v) for v in rng.integers(5, 12, rank))
    kernel = tuple(int(v) for v in rng.integers(1, 4, rank))
    stride = tuple(int(v) for v in rng.integers(1, 4, rank))
    dilation = tuple(int(v) for v in rng.integers(1, 3, rank))
    dtype = rng.choice([np.float32, np.float64])
    x = rng.standard_normal((2, cin) + spatial).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    if seed % 2:
        w = rng.standard_normal((cin, cout // groups) + kernel).astype(dtype)
        kwargs = dict(stride=stride, padding=1 if min(kernel) > 1 else 0, dilation=dilation, groups=groups)
        got = getattr(convfast, f"conv_transpose{rank}d")(x, w, b, **kwargs)
        want = getattr(convfast.reference, f"conv_transpose{rank}d")(x, w, b, **kwargs)
    else:
        w = rng.standard_normal((cout, cin // groups) + kernel).astype(dtype)
        mode = str(rng.choice(["zeros", "reflect", "replicate", "circular", "symmetric"]))
        kwargs = dict(stride=stride, padding="same", dilation=dilation, groups=groups, padding_mode=mode)
        try:
            want = getattr(convfast.reference, f"conv{rank}d")(x, w, b, **kwargs)
        except ValueError:  # reflect padding wider than the input
            return
        got = getattr(convfast, f"conv{rank}d")(x, w, b, **kwargs)
    assert ("direct_planes" if direct_mode == "planes" else "direct_rows") in convfast._core.last_algorithm()
    assert_close(got, want, dtype, reduction_size=cin * int(np.prod(kernel)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_algorithms_and_blockings_give_identical_bits(dtype, seed, monkeypatch):
    # Every output is one multiply-add chain over k = (input channel, tap) in the same order in the
    # GEMM (whatever its K blocking) and in both direct modes, so the result does not depend on
    # which algorithm the shape selects -- chunked callers (convfast.dask) rely on it.
    rng = np.random.default_rng(100 + seed)
    groups = int(rng.choice([1, 2, 4]))
    cin = groups * int(rng.integers(1, 90 if groups == 1 else 20))  # K beyond one GEMM K block
    cout = groups * int(rng.integers(1, 4))
    x = rng.standard_normal((2, cin, 9, 11)).astype(dtype)
    w = rng.standard_normal((cout, cin // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    kwargs = dict(stride=int(rng.integers(1, 3)), padding=1, groups=groups)
    results = {}
    for algo, mode in (("gemm", None), ("direct", "rows"), ("direct", "planes")):
        monkeypatch.setenv("CONVFAST_ALGO", algo)
        if mode == "rows":
            monkeypatch.setenv("CONVFAST_DIRECT", "rows")
        else:
            monkeypatch.delenv("CONVFAST_DIRECT", raising=False)
        results[(algo, mode)] = convfast.conv2d(x, w, b, **kwargs)
    first = results[("gemm", None)]
    for key, y in results.items():
        np.testing.assert_array_equal(y, first, err_msg=str(key))
