"""The weight gradient's rows path (cpp/conv/weight_grad/rows.cpp, rows_weight_grad): layers with at most 8
input channels per group and a channels-first output gradient, whose rows are multiplied in the
vector lanes without packing (a padded copy of the input first, its rows split into stride phases).

Checked against a float64 NumPy oracle written from the definition (conftest.weight_grad_oracle,
independent of the C++), against the GEMM path (CONVFAST_WGRAD_GEMM=1; another summation order, so to rounding), and for
bitwise independence of the thread count.
"""

import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close, weight_grad_oracle

@pytest.fixture(autouse=True)
def no_forced_algorithm(monkeypatch):
    """Winograd, when a CI pass forces it (CONVFAST_ALGO=winograd), would take the 3x3 stride-1 cases."""
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)


def _grad_weight(monkeypatch, rank, x, w, gy, gemm=False, **kw):
    if gemm:
        monkeypatch.setenv("CONVFAST_WGRAD_GEMM", "1")
    else:
        monkeypatch.delenv("CONVFAST_WGRAD_GEMM", raising=False)
    _, gw, _ = getattr(convfast, f"conv{rank}d_backward")(gy, x, w, needs=(False, True, False), **kw)
    return gw, _core.last_algorithm()


# (rank, batch, C_in, C_out, spatial, kernel, kwargs): C_out/G not a multiple of the 4-row block,
# kernel rows of 1 to 7 taps (3-tap blocks), row lengths with tails, dilation, strides along the
# outer axes, every padding mode, groups, 1-D to 3-D.
CASES = [
    (3, 2, 1, 8, (6, 7, 19), (3, 3, 3), dict(padding=1)),
    (2, 1, 3, 9, (11, 21), (3, 3), dict(padding=1)),
    (2, 2, 2, 5, (9, 13), (2, 5), dict(padding=(1, 2), dilation=(1, 2))),
    (2, 1, 4, 6, (14, 17), (3, 7), dict(stride=(2, 1), padding=(1, 3))),
    (1, 3, 1, 12, (40,), (4,), dict(padding="same")),
    (2, 1, 2, 8, (10, 12), (3, 3), dict(padding=2, padding_mode="reflect")),
    (2, 1, 3, 8, (10, 12), (3, 3), dict(padding=1, padding_mode="replicate")),
    (3, 1, 2, 7, (5, 6, 12), (2, 3, 1), dict(padding=(1, 0, 0), padding_mode="circular")),
    (2, 2, 4, 16, (9, 16), (3, 3), dict(padding=1, groups=2)),
    (2, 1, 6, 12, (13, 20), (5, 3), dict(stride=(3, 1), dilation=(2, 3), groups=3)),
    # 5 to 8 input channels per group, the path's upper range.
    (2, 2, 8, 10, (9, 19), (3, 3), dict(padding=1)),
    (3, 1, 5, 4, (4, 5, 17), (3, 2, 3), dict(padding=(1, 0, 1), padding_mode="reflect")),
    (2, 1, 14, 8, (8, 21), (2, 4), dict(stride=(1, 2), padding="same", groups=2)),
    # Strided rows: the padded copy holds each row as its stride phases.
    (2, 1, 3, 8, (15, 40), (7, 7), dict(stride=2, padding=3)),
    (1, 2, 2, 6, (60,), (5,), dict(stride=3, dilation=2, padding=2)),
    (2, 1, 1, 9, (12, 33), (3, 4), dict(stride=(1, 2), padding=(1, 2), padding_mode="reflect")),
    (3, 1, 2, 4, (5, 7, 30), (2, 2, 3), dict(stride=(1, 2, 2), padding=1, padding_mode="replicate")),
    # Output-gradient planes over 128 KiB per 4-row block go in blocks of rows (about 8 KiB of them:
    # 5 rows in float32, 2 in float64 here, the last block partial).
    (2, 1, 3, 9, (182, 190), (7, 7), dict(stride=2, padding=3)),
    (3, 1, 2, 5, (3, 101, 110), (3, 3, 3), dict(padding=1, padding_mode="reflect")),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank,batch,cin,cout,spatial,kernel,kw", CASES)
def test_rows_weight_grad_matches_oracle_and_gemm(monkeypatch, dtype, rank, batch, cin, cout, spatial, kernel, kw):
    rng = np.random.default_rng(21)
    groups = kw.get("groups", 1)
    x = rng.standard_normal((batch, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cout, cin // groups) + kernel).astype(dtype)
    spec = ref.conv_spec("t", rank, x, w, None, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                         groups, kw.get("padding_mode", "zeros"), "channels_first")
    gy = rng.standard_normal(spec.output_shape()).astype(dtype)
    rows, algo = _grad_weight(monkeypatch, rank, x, w, gy, **kw)
    if not algo.startswith("weight_grad rows") and convfast.get_isa() == "avx512":
        # AVX-512's 16 float32 lanes are wider than these cases' output rows, which the rows path
        # needs at least one vector of: check the path with AVX2's 8 lanes.
        isa = convfast.get_isa()
        convfast.set_isa("avx2")
        try:
            rows, algo = _grad_weight(monkeypatch, rank, x, w, gy, **kw)
        finally:
            convfast.set_isa(isa)
    assert algo.startswith("weight_grad rows"), algo
    gemm, gemm_algo = _grad_weight(monkeypatch, rank, x, w, gy, gemm=True, **kw)
    assert gemm_algo.startswith("weight_grad gemm"), gemm_algo
    expected = weight_grad_oracle(x, gy, kernel, spec.pads, spec.padding_mode, groups, spec.stride, spec.dilation)
    k_w = batch * int(np.prod(spec.out_spatial))
    assert_close(rows, expected, dtype, k_w)
    assert_close(gemm, expected, dtype, k_w)


def test_rows_weight_grad_kernel_shapes(monkeypatch):
    """The 3 x 4 shape (3 gradient channels x 4 taps per call) where its calls are at most 1.4x the
    4 x 3 shape's (that one reloads a vector per tap), else 4 x 3; both agree with the oracle."""
    rng = np.random.default_rng(8)
    for cout, k, shape in [(64, 7, "3x4"), (9, 7, "3x4"), (8, 3, "4x3"), (4, 3, "4x3"), (32, 3, "3x4"), (12, 3, "3x4"), (16, 3, "4x3")]:
        # from 32 output channels only on images of at least 4096 pixels per input channel
        size = (9, 20) if cout < 32 else (64, 130)
        for dtype in ("float32", "float64"):
            x = rng.standard_normal((1, 2) + size).astype(dtype)
            w = rng.standard_normal((cout, 2, 3, k)).astype(dtype)
            gy = rng.standard_normal((1, cout) + size).astype(dtype)
            gw, algo = _grad_weight(monkeypatch, 2, x, w, gy, padding=(1, k // 2))
            assert algo.startswith(f"weight_grad rows {shape}"), (cout, k, algo)
            expected = weight_grad_oracle(x, gy, (3, k), [(1, 1), (k // 2, k // 2)])
            assert_close(gw, expected, dtype, size[0] * size[1])


def test_rows_weight_grad_leaves_small_images_to_the_gemm(monkeypatch):
    """From 32 output channels, images under 4096 pixels per input channel take the GEMM."""
    rng = np.random.default_rng(9)
    for size, rows in [((56, 72), False), ((64, 130), True)]:
        x = rng.standard_normal((1, 2) + size).astype("float32")
        w = rng.standard_normal((32, 2, 3, 3)).astype("float32")
        gy = rng.standard_normal((1, 32) + size).astype("float32")
        gw, algo = _grad_weight(monkeypatch, 2, x, w, gy, padding=1)
        assert algo.startswith("weight_grad rows") == rows, (size, algo)
        assert_close(gw, weight_grad_oracle(x, gy, (3, 3), [(1, 1), (1, 1)]), "float32", size[0] * size[1])


def test_rows_weight_grad_threads_and_layouts(monkeypatch):
    """Bitwise the same for 1 to 4 threads; a channels-last input takes the path too (it is copied),
    a channels-last gradient does not (its rows are not contiguous)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 12, 18)).astype("float32")
    w = rng.standard_normal((10, 2, 3, 3)).astype("float32")
    gy = rng.standard_normal((2, 10, 12, 18)).astype("float32")
    before = convfast.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            convfast.set_num_threads(n)
            results.append(_grad_weight(monkeypatch, 2, x, w, gy, padding=1)[0])
    finally:
        convfast.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    x_cl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    gy_cl = np.ascontiguousarray(np.moveaxis(gy, 1, -1))
    _, gw, _ = convfast.conv2d_backward(gy, np.moveaxis(x_cl, -1, 1), w, padding=1, needs=(False, True, False))
    assert _core.last_algorithm().startswith("weight_grad rows")
    np.testing.assert_array_equal(gw, results[0])
    _, gw_cl, _ = convfast.conv2d_backward(gy_cl, x_cl, w, padding=1, needs=(False, True, False),
                                           data_format="channels_last")
    assert _core.last_algorithm().startswith("weight_grad gemm")
    assert_close(gw_cl, results[0], "float32", 2 * 12 * 18)
