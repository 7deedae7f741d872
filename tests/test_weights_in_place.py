"""The pixel-lanes GEMM with the weights read in place (no packing): small maps under large weights.

CONVFAST_WEIGHTS_IN_PLACE=1 takes it wherever it can run; its results must be the packed GEMM's bit
for bit (the same multiply-add chains) and within the accuracy bound of the float64 reference."""
import numpy as np
import pytest

import convfast
from convfast import _core, reference
from convfast._spec import conv_spec, conv_transpose_spec

RANKS = {1: (convfast.conv1d, convfast.conv_transpose1d), 2: (convfast.conv2d, convfast.conv_transpose2d),
         3: (convfast.conv3d, convfast.conv_transpose3d)}

CASES = [
    # rank, batch, cin, cout, size, kernel, stride, padding, dilation, groups, transposed
    (2, 1, 20, 26, 4, 3, 1, 1, 1, 1, False),    # partial last channel tile
    (2, 3, 64, 40, 4, 3, 1, 1, 1, 1, False),    # patches packed once per pixel block over 5 K blocks
    (2, 2, 16, 24, 3, 3, 1, 1, 1, 1, False),
    (2, 1, 12, 36, 5, 3, 2, 1, 1, 1, False),    # strided gather
    (2, 1, 8, 30, 6, 3, 1, 2, 2, 1, False),     # dilated
    (2, 3, 12, 18, 4, 3, 1, 1, 1, 3, False),    # groups
    (2, 1, 24, 40, 1, 4, 1, 3, 1, 1, False),    # 1x1 input, padding
    (2, 1, 24, 40, 7, 1, 1, 0, 1, 1, False),    # 1x1 kernel
    (2, 1, 10, 14, 1, 4, 1, 0, 1, 1, True),     # transposed from a 1x1 input (one phase)
    (2, 2, 9, 13, 3, 3, 1, 1, 1, 1, True),
    (1, 1, 16, 20, 9, 3, 1, 1, 1, 1, False),
    (1, 2, 16, 20, 7, 5, 2, 2, 1, 2, False),
    (3, 1, 8, 20, 3, 3, 1, 1, 1, 1, False),
    (3, 1, 6, 14, 2, 2, 1, 0, 1, 1, True),
]


def _run(monkeypatch, setting, fn, *args, **kw):
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")  # the small channel counts here would take the direct path
    monkeypatch.setenv("CONVFAST_WEIGHTS_IN_PLACE", setting)
    y = fn(*args, **kw)
    return y, _core.last_algorithm()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_in_place_weights_equal_packed_and_reference(monkeypatch, case, dtype, mode):
    rank, n, cin, cout, size, k, s, p, d, g, transposed = case
    if transposed and mode != "zeros":
        pytest.skip("transposed convolutions pad with zeros")
    if mode == "reflect" and p >= size:
        pytest.skip("reflect padding must be smaller than the input")
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((n, cin) + (size,) * rank).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    conv, conv_t = RANKS[rank]
    if transposed:
        w = rng.standard_normal((cin, cout // g) + (k,) * rank).astype(dtype)
        args, kw = (x, w, b), dict(stride=s, padding=p, groups=g, dilation=d)
        fn = conv_t
        spec = conv_transpose_spec("t", rank, x, w, b, s, p, 0, g, d, None, "channels_first")
        expected = reference.conv_transpose_reference(spec, x, w, b)
    else:
        w = rng.standard_normal((cout, cin // g) + (k,) * rank).astype(dtype)
        args, kw = (x, w, b), dict(stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
        fn = conv
        spec = conv_spec("c", rank, x, w, b, s, p, d, g, mode, "channels_first")
        expected = reference.conv_reference(spec, x, w, b)
    y1, algo1 = _run(monkeypatch, "1", fn, *args, **kw)
    y0, algo0 = _run(monkeypatch, "0", fn, *args, **kw)
    assert "in_place" not in algo0
    assert algo1.startswith("pixel_lanes_gemm_in_place"), algo1
    np.testing.assert_array_equal(y1, y0)
    kk = cin // g * k ** rank
    tol = (2e-6 * np.sqrt(kk) if dtype == np.float32 else 1e-12) * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(y1, expected, rtol=0, atol=tol)


def test_in_place_weights_apply_where_expected(monkeypatch):
    for knob in ("CONVFAST_WEIGHTS_IN_PLACE", "CONVFAST_ALGO", "CONVFAST_PIXEL_LANES"):  # CI passes force them
        monkeypatch.delenv(knob, raising=False)
    rng = np.random.default_rng(0)
    for shape, cin, cout, k, expect in [((4, 4), 512, 512, 3, True),     # 9.4 MB of weights, 16 pixels
                                        ((7, 7), 512, 2048, 1, True),    # 1x1, 4 MB
                                        ((7, 7), 256, 256, 3, True),     # 2.4 MB, 49 pixels
                                        ((7, 7), 128, 128, 3, False),    # 0.6 MB: packed
                                        ((28, 28), 512, 512, 3, False)]:  # many pixels
        x = rng.standard_normal((1, cin) + shape).astype(np.float32)
        w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        convfast.conv2d(x, w, padding=k // 2)
        assert _core.last_algorithm().startswith("pixel_lanes_gemm_in_place") == expect, _core.last_algorithm()


def test_in_place_weights_bitwise_across_threads(monkeypatch):
    monkeypatch.setenv("CONVFAST_WEIGHTS_IN_PLACE", "1")
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")  # a CI pass may force another algorithm
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 64, 5, 5)).astype(np.float32)
    w = rng.standard_normal((100, 64, 3, 3)).astype(np.float32)
    before = convfast.get_num_threads()
    try:
        ys = []
        for t in (1, 2, 3):
            convfast.set_num_threads(t)
            ys.append(convfast.conv2d(x, w, padding=1))
            assert _core.last_algorithm().startswith("pixel_lanes_gemm_in_place")
    finally:
        convfast.set_num_threads(before)
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])
