"""One-tap layers with one output pixel in the call (cpp/conv/algorithms/gemv.cpp): the weight rows
read in place, each output one multiply-add chain over the input channels as in the GEMM, so the
same bits as the GEMM (CONVFAST_ALGO=gemm). Checked bitwise against the GEMM and against the NumPy
reference for groups, strides, padding modes (a 1x1 tap reading the padding), both layouts,
strided views of x, w and out, bias, float64, transposed layers and the thread count (forced where
the layer has more pixels); and the automatic choice (one pixel, one tap, one phase)."""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close

# (batch, cin, cout, spatial, kwargs, taken by default): one output pixel in the call, or forced.
CASES = [
    (1, 1152, 48, (1, 1), {}, True),                    # EfficientNet's squeeze-and-excitation, batch 1
    (1, 48, 1152, (1, 1), {}, True),
    (1, 37, 11, (1, 1), {}, True),                      # channels not a multiple of 8 (the chains)
    (1, 64, 96, (2, 2), dict(stride=2), True),          # a strided 1x1: one output
    (1, 24, 40, (1,), {}, True),                        # 1-D
    (1, 30, 20, (1, 1, 1), {}, True),                   # 3-D
    (1, 64, 64, (1, 1), dict(groups=4), True),
    (2, 48, 100, (1, 1), {}, False),                    # two images
    (1, 37, 11, (2, 2), {}, False),                     # four pixels
    (1, 16, 8, (2, 1), dict(padding=(1, 0), padding_mode="reflect", stride=(3, 1)), False),  # reads the padding
    (1, 16, 8, (2, 2), dict(padding=1, stride=3), False),  # zero padding: outputs of the bias alone
]


def _operands(case, dtype):
    n, cin, cout, spatial, kw, _ = CASES[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal((n, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cout, cin // kw.get("groups", 1)) + (1,) * len(spatial)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    return x, w, b, kw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equal_to_gemm_and_reference(case, dtype, monkeypatch):
    x, w, b, kw = _operands(case, dtype)
    op = getattr(convfast, f"conv{x.ndim - 2}d")
    if CASES[case][5]:
        monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    else:
        monkeypatch.setenv("CONVFAST_ALGO", "gemv")
    for bias in (b, None):
        y = op(x, w, bias, **kw)
        assert _core.last_algorithm().startswith("gemv"), _core.last_algorithm()
        assert_close(y, getattr(ref, f"conv{x.ndim - 2}d")(x, w, bias, **kw), dtype, w.shape[1])
        monkeypatch.setenv("CONVFAST_ALGO", "gemm")
        np.testing.assert_array_equal(y, op(x, w, bias, **kw))
        monkeypatch.setenv("CONVFAST_ALGO", "gemv")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_layouts_and_out(dtype, monkeypatch):
    # channels-last input, a negative-stride channel view, weights whose input channels are not
    # contiguous, and an out= view with gaps: nothing outside it written.
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 80, 1, 1)).astype(dtype)
    x = base[:, ::-2]  # 40 channels, read backwards
    w = rng.standard_normal((40, 24)).astype(dtype).T[:, :, None, None]  # (24, 40, 1, 1), input channels 24 apart
    b = rng.standard_normal(24).astype(dtype)
    expected = ref.conv2d(np.ascontiguousarray(x), np.ascontiguousarray(w), b)
    big = np.full((1, 48, 1, 3), np.nan, dtype)
    out = big[:, ::2, :, 1:2]
    y = convfast.conv2d(x, w, b, out=out)
    assert y is out and _core.last_algorithm().startswith("gemv")
    assert_close(out, expected, dtype, 40)
    assert np.isnan(big[:, 1::2]).all() and np.isnan(big[..., 0]).all() and np.isnan(big[..., 2]).all()
    xl = np.ascontiguousarray(np.moveaxis(np.ascontiguousarray(x), 1, -1))
    yl = convfast.conv2d(xl, w, b, data_format="channels_last")
    assert _core.last_algorithm().startswith("gemv")
    assert_close(np.moveaxis(yl, -1, 1), expected, dtype, 40)


def test_transposed_one_by_one(monkeypatch):
    # (the automatic choice takes the scatter GEMM for transposed layers of small inputs)
    monkeypatch.setenv("CONVFAST_ALGO", "gemv")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 48, 1, 1))
    w = rng.standard_normal((48, 20, 1, 1))
    b = rng.standard_normal(20)
    y = convfast.conv_transpose2d(x, w, b)
    assert _core.last_algorithm().startswith("gemv"), _core.last_algorithm()
    assert_close(y, ref.conv_transpose2d(x, w, b), np.float64, 48)


def test_not_chosen_past_one_pixel_or_one_tap(monkeypatch):
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 64, 1, 1)).astype(np.float32)
    convfast.conv2d(rng.standard_normal((2, 64, 1, 1)).astype(np.float32), w)
    assert not _core.last_algorithm().startswith("gemv")
    convfast.conv2d(rng.standard_normal((1, 64, 3, 3)).astype(np.float32), w)
    assert not _core.last_algorithm().startswith("gemv")
    convfast.conv2d(rng.standard_normal((1, 64, 2, 2)).astype(np.float32),
                    rng.standard_normal((32, 64, 2, 2)).astype(np.float32))
    assert not _core.last_algorithm().startswith("gemv")


def test_forced_on_larger_layers_and_thread_count_independent(monkeypatch):
    # CONVFAST_ALGO=gemv takes every one-tap single-phase layer (the CI pass runs the suite so).
    monkeypatch.setenv("CONVFAST_ALGO", "gemv")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 200, 5, 6)).astype(np.float32)
    w = rng.standard_normal((130, 200, 1, 1)).astype(np.float32)
    expected = ref.conv2d(x, w)
    before = convfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            convfast.set_num_threads(threads)
            results.append(convfast.conv2d(x, w))
            assert _core.last_algorithm().startswith("gemv")
    finally:
        convfast.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert_close(results[0], expected, np.float32, 200)
