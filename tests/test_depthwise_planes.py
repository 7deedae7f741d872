"""The depthwise-planes path (cpp/conv/algorithms/depthwise_planes.cpp): a channel plane at a time,
its rows copied into a flat buffer one pitch apart with zeros around them, every tap one load at a
fixed distance; the weight gradient stacks a channel's planes into one such buffer.

Each forward output is one multiply-add chain over the taps in the direct kernel's order with the
bias added to the finished sum, so the path must equal the GEMM bit for bit; both gradients are
checked against the NumPy oracle. Cases cover short and long rows (the whole-chunk row copies and
their bounds), asymmetric and over-wide padding, dilation, 1-D layers, batches folded into axis 0,
strided and negative-stride views, transposed (grad_input) layers, non-finite inputs in the weight
gradient (whose stacked planes multiply dropped columns by zero) and thread-count independence.
"""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close

# (batch, groups, spatial, kernel, kwargs), all at unit stride with zero padding.
CASES = [
    (2, 16, (7, 7), (3, 3), dict(padding=1)),
    (1, 24, (14, 14), (3, 3), dict(padding=1)),
    (3, 17, (9, 5), (5, 5), dict(padding=2)),
    (2, 9, (6, 8), (3, 3), dict(padding=2, dilation=2)),
    (1, 16, (4, 4), (3, 3), dict(padding=0)),
    (2, 16, (10, 23), (3, 3), dict(padding=((1, 2), (2, 0)))),
    (4, 8, (3, 40), (1, 7), dict(padding=(0, 3))),
    (2, 5, (1, 1), (3, 3), dict(padding=1)),
    (12, 16, (7, 7), (3, 3), dict(padding=1)),  # a batch folded into axis 0; stacked gradient chunks
    (2, 16, (33, 31), (3, 3), dict(padding=1)),  # beyond the automatic rule: forced only
]
CASES_1D = [(2, 16, (30,), (3,), dict(padding=1)), (3, 7, (5,), (5,), dict(padding=4, dilation=2))]


def _operands(case, dtype, cases=CASES):
    batch, groups, spatial, kernel, kw = cases[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal((batch, groups) + spatial).astype(dtype)
    w = rng.standard_normal((groups, 1) + kernel).astype(dtype)
    b = rng.standard_normal(groups).astype(dtype)
    return x, w, b, dict(kw, groups=groups)


def _forced(monkeypatch, algo):
    monkeypatch.setenv("CONVFAST_ALGO", algo)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_planes_equal_gemm_and_reference(case, dtype, monkeypatch):
    x, w, b, kw = _operands(case, dtype)
    _forced(monkeypatch, "planes")
    y = convfast.conv2d(x, w, b, **kw)
    assert _core.last_algorithm().startswith("depthwise_planes")
    _forced(monkeypatch, "gemm")
    assert np.array_equal(y, convfast.conv2d(x, w, b, **kw))
    assert_close(y, ref.conv2d(x, w, b, **kw), dtype=dtype, reduction_size=w[0].size)


@pytest.mark.parametrize("case", range(len(CASES_1D)))
def test_planes_1d(case, monkeypatch):
    x, w, b, kw = _operands(case, np.float32, CASES_1D)
    _forced(monkeypatch, "planes")
    y = convfast.conv1d(x, w, b, **kw)
    assert _core.last_algorithm().startswith("depthwise_planes")
    assert_close(y, ref.conv1d(x, w, b, **kw), dtype=np.float32, reduction_size=w[0].size)


def test_views(monkeypatch):
    """Negative-stride rows, rows with a gap after them (a column slice), and an out= view."""
    x, w, b, kw = _operands(0, np.float32)
    wide = np.random.default_rng(5).standard_normal(x.shape[:3] + (x.shape[3] + 20,)).astype(np.float32)
    _forced(monkeypatch, "planes")
    for view in (x[:, :, ::-1], wide[..., 3:3 + x.shape[3]], wide[..., -x.shape[3]:]):
        y = convfast.conv2d(view, w, b, **kw)
        assert_close(y, ref.conv2d(view, w, b, **kw), dtype=np.float32, reduction_size=9)
    out = np.full((2,) + (x.shape[0], x.shape[1]) + x.shape[2:], 7.0, np.float32)
    convfast.conv2d(x, w, b, out=out[1], **kw)
    assert np.all(out[0] == 7.0)
    assert_close(out[1], ref.conv2d(x, w, b, **kw), dtype=np.float32, reduction_size=9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients(case, dtype, monkeypatch):
    """grad_input (a stride-1 transposed layer: the planes with the kernel flipped) against the
    GEMM's, grad_weight against the definition."""
    from conftest import weight_grad_oracle
    x, w, b, kw = _operands(case, dtype)
    spec = ref.conv_spec("t", 2, x, w, None, 1, kw["padding"], kw.get("dilation", 1), kw["groups"], "zeros",
                         "channels_first")
    gy = np.random.default_rng(case + 50).standard_normal(spec.output_shape()).astype(dtype)
    _forced(monkeypatch, "planes")
    gx, gw, _ = convfast.conv2d_backward(gy, x, w, None, needs=(True, True, False), **kw)
    assert "depthwise_planes" in _core.last_algorithm()
    _forced(monkeypatch, "gemm")
    gx_gemm = convfast.conv2d_backward(gy, x, w, None, needs=(True, False, False), **kw)[0]
    assert np.array_equal(gx, gx_gemm)
    expected = weight_grad_oracle(x, gy, CASES[case][3], spec.pads, "zeros", kw["groups"], spec.stride, spec.dilation)
    assert_close(gw, expected, dtype, x.shape[0] * int(np.prod(spec.out_spatial)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_non_finite_inputs(dtype, monkeypatch):
    """An infinity or NaN in x: the stacked planes' dropped columns would multiply it by zero (NaN);
    the channel is summed again output by output, so the gradient is the GEMM's, non-finite
    values where they belong."""
    x, w, b, kw = _operands(0, dtype)
    x[0, 3, 2, 6] = np.inf   # the last column: read by the next column's dropped output only at tap -1
    x[1, 5, 0, 0] = np.nan
    x[1, 7, 4, 0] = -np.inf  # the first column
    gy = np.random.default_rng(9).standard_normal(x.shape).astype(dtype)
    _forced(monkeypatch, "planes")
    gw = convfast.conv2d_backward(gy, x, w, None, needs=(False, True, False), **kw)[1]
    assert "depthwise_planes" in _core.last_algorithm()
    _forced(monkeypatch, "gemm")
    expected = convfast.conv2d_backward(gy, x, w, None, needs=(False, True, False), **kw)[1]
    np.testing.assert_array_equal(np.isnan(gw), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(gw), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(gw), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert_close(gw[finite], expected[finite], dtype=dtype, reduction_size=gy[:, 0].size)
    assert np.isfinite(gw[0]).all() and not np.isfinite(gw[3]).all()


def test_thread_count_independent(monkeypatch):
    x, w, b, kw = _operands(8, np.float32)
    gy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    _forced(monkeypatch, "planes")
    before, work = convfast.get_num_threads(), _core.min_work_per_thread()
    _core.set_min_work_per_thread(0)
    results = []
    try:
        for threads in (1, 2, 3):
            convfast.set_num_threads(threads)
            y = convfast.conv2d(x, w, b, **kw)
            grads = convfast.conv2d_backward(gy, x, w, None, needs=(True, True, False), **kw)
            results.append((y.tobytes(), grads[0].tobytes(), grads[1].tobytes()))
    finally:
        convfast.set_num_threads(before)
        _core.set_min_work_per_thread(work)
    assert results[0] == results[1] == results[2]


def test_automatic_choice(monkeypatch):
    """Small channels-first depthwise maps with rows of at least 14 and kernels of at most 25 taps
    take the planes unforced; strided, channels-last, padded by another mode, large maps, shorter
    rows and larger kernels keep the channel lanes. The weight gradient takes the planes only with
    fewer groups than vector lanes."""
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 32, 14, 14)).astype(np.float32)
    w = rng.standard_normal((32, 1, 3, 3)).astype(np.float32)
    convfast.conv2d(x, w, padding=1, groups=32)
    assert _core.last_algorithm().startswith("depthwise_planes")
    convfast.conv2d_backward(x, x, w, None, padding=1, groups=32, needs=(False, True, False))
    assert _core.last_algorithm().startswith("weight_grad channel_lanes")
    few = np.ascontiguousarray(x[:, :3])
    convfast.conv2d_backward(few, few, w[:3], None, padding=1, groups=3, needs=(False, True, False))
    assert _core.last_algorithm().startswith("weight_grad depthwise_planes")
    convfast.conv2d(x[..., :7, :7].copy(), w, padding=1, groups=32)  # rows of 7
    assert _core.last_algorithm().startswith("channel_lanes")
    w7 = rng.standard_normal((32, 1, 7, 7)).astype(np.float32)
    convfast.conv2d(x, w7, padding=3, groups=32)  # 49 taps
    assert _core.last_algorithm().startswith("channel_lanes")
    for kw in (dict(stride=2), dict(padding_mode="reflect")):
        convfast.conv2d(x, w, padding=1, groups=32, **kw)
        assert _core.last_algorithm().startswith("channel_lanes")
    convfast.conv2d(x.transpose(0, 2, 3, 1), w, padding=1, groups=32, data_format="channels_last")
    assert _core.last_algorithm().startswith("channel_lanes")
    big = rng.standard_normal((1, 32, 56, 56)).astype(np.float32)
    convfast.conv2d(big, w, padding=1, groups=32)
    assert _core.last_algorithm().startswith("channel_lanes")
