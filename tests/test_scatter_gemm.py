"""The scatter GEMM: transposed convolutions of small inputs as one GEMM over the input pixels whose
products are added into the output (cpp/conv/algorithms/scatter_gemm.cpp).

CONVFAST_ALGO=scatter forces it wherever it applies. Its results are compared with the float64
reference and PyTorch; its summation order is its own (each tap's sum over input channels, then the
taps), so against the other algorithms only to rounding, but bit for bit across thread counts."""
import numpy as np
import pytest

import convfast
from convfast import _core, reference
from convfast._spec import conv_transpose_spec

CONV_T = {1: convfast.conv_transpose1d, 2: convfast.conv_transpose2d, 3: convfast.conv_transpose3d}

CASES = [
    # rank, batch, cin, cout, size, kernel, stride, padding, output_padding, dilation, groups
    (2, 1, 100, 40, 1, 4, 1, 0, 0, 1, 1),    # DCGAN's first layer: a 1x1 input
    (2, 2, 24, 20, 4, 4, 2, 1, 0, 1, 1),     # k4s2: overlapping taps
    (2, 1, 16, 12, 5, 2, 2, 0, 0, 1, 1),     # k2s2: disjoint taps
    (2, 3, 12, 18, 3, 3, 2, 1, 1, 1, 3),     # groups, output_padding
    (2, 1, 8, 10, 4, 3, 3, 0, 2, 2, 1),      # dilation, outputs no tap reaches (stride > span)
    (2, 1, 6, 5, 3, 2, 4, 1, 3, 1, 1),       # stride > kernel: uncovered outputs hold the bias
    (1, 2, 20, 14, 7, 4, 2, 1, 0, 1, 2),
    (1, 1, 9, 40, 13, 5, 1, 2, 0, 3, 1),     # 13 pixels: two pixel tiles with AVX2's 6-pixel rows
    (3, 1, 10, 6, 2, 2, 2, 0, 0, 1, 1),
    (3, 2, 8, 9, 2, 3, 2, 1, 1, 1, 1),
]


def _expected(rank, x, w, b, s, p, op, d, g):
    spec = conv_transpose_spec("t", rank, x, w, b, s, p, op, g, d, None, "channels_first")
    return reference.conv_transpose_reference(spec, x.astype(np.float64), w.astype(np.float64),
                                              None if b is None else b.astype(np.float64))


def _case_arrays(case, dtype, bias=True):
    rank, n, cin, cout, size, k, s, p, op, d, g = case
    rng = np.random.default_rng(sum(case) * 7 + rank)
    x = rng.standard_normal((n, cin) + (size,) * rank).astype(dtype)
    w = rng.standard_normal((cin, cout // g) + (k,) * rank).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_forced_scatter_matches_reference(monkeypatch, case, dtype):
    rank, n, cin, cout, size, k, s, p, op, d, g = case
    x, w, b = _case_arrays(case, dtype, bias=case[1] != 3)
    monkeypatch.setenv("CONVFAST_ALGO", "scatter")
    y = CONV_T[rank](x, w, b, stride=s, padding=p, output_padding=op, dilation=d, groups=g)
    assert _core.last_algorithm().startswith("scatter_gemm"), _core.last_algorithm()
    expected = _expected(rank, x, w, b, s, p, op, d, g)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max()))
    assert y.dtype == dtype


def test_strided_views_and_layer_calls(monkeypatch):
    """Channels-last and negative-stride inputs, a bias view with a stride, and the layer object's
    kept plan: all through the scatter GEMM, all equal to the reference."""
    monkeypatch.setenv("CONVFAST_ALGO", "scatter")
    rng = np.random.default_rng(5)
    x = np.ascontiguousarray(rng.standard_normal((2, 6, 5, 18)).transpose(0, 3, 1, 2))[..., ::-1]
    w = rng.standard_normal((18, 7, 4, 4))
    b = rng.standard_normal(14)[::2]
    y = convfast.conv_transpose2d(x, w, b, stride=2, padding=1)
    assert _core.last_algorithm().startswith("scatter_gemm")
    expected = _expected(2, x, w, b, 2, 1, 0, 1, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-12)
    layer = convfast.ConvTranspose2d.from_weights(w, b, stride=2, padding=1)
    for _ in range(2):
        np.testing.assert_allclose(layer(x), expected, rtol=1e-13, atol=1e-12)


def test_bitwise_identical_for_any_thread_count(monkeypatch):
    """Several work items (more columns than one item takes) and several pixel tiles."""
    monkeypatch.setenv("CONVFAST_ALGO", "scatter")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 64, 4, 5)).astype(np.float32)
    w = rng.standard_normal((64, 70, 4, 4)).astype(np.float32)
    results = []
    before = convfast.get_num_threads()
    try:
        for threads in (1, 2, 3):
            convfast.set_num_threads(threads)
            results.append(convfast.conv_transpose2d(x, w, stride=2, padding=1))
            assert _core.last_algorithm().startswith("scatter_gemm")
    finally:
        convfast.set_num_threads(before)
    for other in results[1:]:
        assert np.array_equal(results[0], other)


@pytest.mark.parametrize("forced", ["", "gemm", "direct", "winograd"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weights_take_the_exact_scatter(monkeypatch, forced, bad):
    """The phase algorithms multiply the zeros beyond the input's edges by the weights; a NaN or
    infinite weight must only meet real inputs (PyTorch's result), whatever algorithm is forced."""
    torch = pytest.importorskip("torch")
    if forced:
        monkeypatch.setenv("CONVFAST_ALGO", forced)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 5, 5))
    w = rng.standard_normal((8, 6, 3, 3))
    w[2, 1, 0, 2] = bad
    y = convfast.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1)
    assert _core.last_algorithm().startswith("scatter_gemm"), _core.last_algorithm()
    expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1,
                                                    output_padding=1).numpy()
    assert np.array_equal(np.isnan(y), np.isnan(expected))
    assert np.array_equal(np.isinf(y), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-12, atol=1e-12)
    assert not np.isnan(w).all()  # the input was not touched: only the one planted value


def test_weight_strides_do_not_change_the_result(monkeypatch):
    """A weight view whose (output channel, tap) columns are not one contiguous run per input
    channel is gathered: the same algorithm, the same bits as its contiguous copy (the choice never
    depends on the weights' layout)."""
    monkeypatch.setenv("CONVFAST_ALGO", "scatter")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 12, 3, 3))
    w = rng.standard_normal((12, 4, 4, 10)).transpose(0, 3, 1, 2)  # (12, 10, 4, 4), taps strided
    y = convfast.conv_transpose2d(x, w, stride=2, padding=1)
    assert _core.last_algorithm().startswith("scatter_gemm")
    assert np.array_equal(y, convfast.conv_transpose2d(x, np.ascontiguousarray(w), stride=2, padding=1))
    np.testing.assert_allclose(y, _expected(2, x, w, None, 2, 1, 0, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, chosen", [
    ((1, 100, 1, 1, 512, 4, 1, 0), True),     # DCGAN's latent to 4x4
    ((1, 512, 4, 4, 256, 4, 2, 1), True),     # its next layer at batch 1
    ((8, 512, 4, 4, 256, 4, 2, 1), True),     # ... and at batch 8 (128 pixels, 512 channels)
    ((1, 64, 28, 28, 64, 3, 1, 1), False),    # a large map: the phase GEMMs / Winograd
    ((1, 128, 16, 16, 64, 4, 2, 1), False),   # 256 pixels, 128 channels
])
def test_automatic_choice(monkeypatch, shape, chosen):
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    monkeypatch.delenv("CONVFAST_SCATTER", raising=False)
    n, cin, h, wd, cout, k, s, p = shape
    x = np.zeros((n, cin, h, wd), np.float32)
    w = np.zeros((cin, cout, k, k), np.float32)
    convfast.conv_transpose2d(x, w, stride=s, padding=p)
    assert _core.last_algorithm().startswith("scatter_gemm") == chosen, _core.last_algorithm()
