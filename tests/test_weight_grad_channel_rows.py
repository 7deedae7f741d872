"""The weight gradient's channel-rows path (cpp/conv/weight_grad/channel_rows.cpp): 1x1 stride-1
unpadded layers with few input channels per group, whose gradient and input rows are multiplied in
the vector lanes where they lie (no copies).

Checked against a float64 NumPy oracle written from the definition (conftest.weight_grad_oracle,
independent of the C++), against the GEMM path (CONVFAST_WGRAD_GEMM=1; another summation order, so
to rounding), for bitwise independence of the thread count, and for the layouts it does not take.
"""

import numpy as np
import pytest

import convfast
from convfast import _core
from conftest import assert_close, weight_grad_oracle


# the rows path's helpers: its autouse fixture (no forced algorithm) and the gradient call
from test_weight_grad_rows import _grad_weight, no_forced_algorithm  # noqa: F401


# (rank, batch, C_in, C_out, groups, spatial): channel counts that are not multiples of the 3- and
# 4-row blocks, rows with and without a ragged tail, planes longer than one 2 KiB chunk, groups.
CASES = [
    (2, 2, 16, 96, 1, (9, 13)),
    (2, 1, 5, 7, 1, (4, 4)),
    (2, 3, 24, 30, 1, (23, 31)),
    (1, 2, 32, 32, 1, (700,)),
    (1, 1, 3, 4, 1, (17,)),
    (3, 2, 8, 12, 1, (3, 5, 7)),
    (2, 2, 32, 64, 2, (6, 6)),
    (2, 1, 20, 200, 4, (5, 9)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank, batch, cin, cout, groups, spatial", CASES)
def test_channel_rows_matches_oracle_and_gemm(monkeypatch, dtype, rank, batch, cin, cout, groups, spatial):
    rng = np.random.default_rng(cin * 1000 + cout)
    x = rng.standard_normal((batch, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cout, cin // groups) + (1,) * rank).astype(dtype)
    gy = rng.standard_normal((batch, cout) + spatial).astype(dtype)
    got, algo = _grad_weight(monkeypatch, rank, x, w, gy, groups=groups)
    assert algo.startswith("weight_grad channel_rows"), algo
    gemm, gemm_algo = _grad_weight(monkeypatch, rank, x, w, gy, gemm=True, groups=groups)
    assert gemm_algo.startswith("weight_grad gemm"), gemm_algo
    expected = weight_grad_oracle(x, gy, (1,) * rank, [(0, 0)] * rank, "zeros", groups)
    k = batch * int(np.prod(spatial))
    assert_close(got, expected, dtype, k)
    assert_close(gemm, expected, dtype, k)


def test_channel_rows_threads_and_layouts(monkeypatch):
    """Bitwise the same for 1 to 4 threads; strided, padded, channels-last or many-channel layers
    take another path and agree to rounding."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 12, 10, 18)).astype("float32")
    w = rng.standard_normal((40, 12, 1, 1)).astype("float32")
    gy = rng.standard_normal((2, 40, 10, 18)).astype("float32")
    before = convfast.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            convfast.set_num_threads(n)
            results.append(_grad_weight(monkeypatch, 2, x, w, gy)[0])
            assert _core.last_algorithm().startswith("weight_grad channel_rows")
    finally:
        convfast.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    # a channels-last gradient: rows not contiguous
    x_cl, gy_cl = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, gy))
    _, gw_cl, _ = convfast.conv2d_backward(gy_cl, x_cl, w, needs=(False, True, False), data_format="channels_last")
    assert not _core.last_algorithm().startswith("weight_grad channel_rows")
    assert_close(gw_cl, results[0], "float32", 2 * 10 * 18)
    # stride 2 and padding: not one unpadded tap per output
    xs = rng.standard_normal((2, 12, 20, 36)).astype("float32")
    _, gw_s, _ = convfast.conv2d_backward(gy, xs, w, stride=2, needs=(False, True, False))
    assert_close(gw_s, weight_grad_oracle(xs, gy, (1, 1), [(0, 0), (0, 0)], "zeros", 1, (2, 2)), "float32", 360)
    gyp = rng.standard_normal((2, 40, 12, 20)).astype("float32")
    _, gw_p, _ = convfast.conv2d_backward(gyp, x, w, padding=1, needs=(False, True, False))
    assert not _core.last_algorithm().startswith("weight_grad channel_rows")
    assert_close(gw_p, weight_grad_oracle(x, gyp, (1, 1), [(1, 1), (1, 1)]), "float32", 2 * 12 * 20)
