"""The channel-lanes path for depthwise layers (cpp/conv/algorithms/channel_lanes.cpp): L groups (the vector
width) in the lanes, the input window of a block of output rows buffered as pixels of L channels
(transposed L x L from channels-first input, copied from channels-last), the padding written in.

Each output is one multiply-add chain over the taps in the direct kernel's order and the bias is
added to the finished sum, so the path must equal the direct path bit for bit; both are checked
against the NumPy oracle. Cases cover partial channel blocks (groups not a multiple of L), every
padding mode, stride and dilation, 1-D to 3-D, both layouts, strided and negative-stride views,
`out=` views, transposed layers (several stride phases, the pair store, outputs no tap reaches),
and thread-count independence. The depthwise weight gradient on the same buffers is checked against
the definition and against the depthwise kernel it replaces (to rounding: another summation order).
"""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close

# (rank, batch, groups, spatial, kernel, kwargs); groups from under one vector (forced only) to
# several blocks with a partial last one.
CASES = [
    (2, 2, 16, (13, 11), (3, 3), dict(stride=2, padding=1)),
    (2, 1, 24, (9, 20), (3, 3), dict(padding=1)),
    (2, 2, 17, (10, 9), (3, 5), dict(stride=(1, 2), padding=(1, 2), padding_mode="reflect")),
    (2, 1, 9, (8, 8), (3, 3), dict(dilation=2, padding=2, padding_mode="circular")),
    (2, 1, 32, (12, 12), (5, 5), dict(stride=2, padding="same", padding_mode="replicate")),
    (2, 2, 8, (7, 30), (2, 4), dict(stride=3, padding=(0, 3))),
    (1, 2, 12, (40,), (7,), dict(stride=2, padding=3, padding_mode="reflect")),
    (1, 1, 8, (5,), (3,), dict()),
    (3, 1, 16, (6, 7, 9), (3, 3, 3), dict(padding=1)),
    (3, 2, 20, (5, 8, 8), (3, 2, 3), dict(stride=2, padding=(1, 0, 1), padding_mode="replicate")),
    # Short rows: an item's rows run as one sequence of outputs, its interior input rows are
    # transposed as one run of pixels and its outputs stored as one run of y.
    (2, 2, 40, (7, 7), (7, 7), dict(padding=3)),
    (2, 1, 32, (14, 14), (5, 5), dict(padding=2, padding_mode="reflect")),
    (3, 1, 16, (3, 150, 7), (3, 3, 3), dict(padding=1)),  # 150 rows: several items per plane
    (2, 1, 4, (9, 9), (3, 3), dict(padding=1)),  # fewer groups than lanes: CONVFAST_ALGO=lanes only
]


# The automatic choice for depthwise layers: the channel lanes, or on small unit-stride maps the
# depthwise planes (tests/test_depthwise_planes.py), which compute the same bits.
DEPTHWISE_PATHS = ("channel_lanes", "depthwise_planes")


def _run(monkeypatch, algo, rank, x, w, b, op="conv", out=None, **kw):
    if algo:
        monkeypatch.setenv("CONVFAST_ALGO", algo)
    else:
        monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    y = getattr(convfast, f"{op}{rank}d")(x, w, b, out=out, **kw)
    return y, _core.last_algorithm()


def _operands(case, dtype, layout="channels_first"):
    rank, batch, groups, spatial, kernel, kw = CASES[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal((batch, groups) + spatial).astype(dtype)
    w = rng.standard_normal((groups, 1) + kernel).astype(dtype)
    b = rng.standard_normal(groups).astype(dtype)
    return rank, x, w, b, dict(kw, groups=groups)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lanes_equal_direct_and_reference(case, dtype, layout, monkeypatch):
    rank, x, w, b, kw = _operands(case, dtype)
    expected = getattr(ref, f"conv{rank}d")(x, w, b, **kw)
    if layout == "channels_last":
        x = np.moveaxis(x, 1, -1).copy()
        kw["data_format"] = layout
    default, algo = _run(monkeypatch, None, rank, x, w, b, **kw)
    if kw["groups"] >= 16:  # at least one vector's worth of groups on every ISA
        assert algo.startswith(DEPTHWISE_PATHS), algo
    forced, forced_algo = _run(monkeypatch, "lanes", rank, x, w, b, **kw)
    assert forced_algo.startswith("channel_lanes"), forced_algo
    np.testing.assert_array_equal(forced, default)
    direct, direct_algo = _run(monkeypatch, "direct", rank, x, w, b, **kw)
    assert direct_algo.startswith("direct_"), direct_algo
    np.testing.assert_array_equal(forced, direct)
    got = np.moveaxis(forced, -1, 1) if layout == "channels_last" else forced
    assert_close(got, expected, dtype, int(np.prod(CASES[case][4])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_and_out(dtype, monkeypatch):
    # A negative-stride, channel-strided input view and an `out=` view with gaps between rows and
    # channels: the buffer and the stores take any strides; nothing outside `out` is written.
    rng = np.random.default_rng(7)
    base = rng.standard_normal((2, 40, 15, 19)).astype(dtype)
    x = base[:, ::2, :, ::-1]  # 20 channels, 2 apart; rows read backwards
    w = rng.standard_normal((20, 1, 3, 3)).astype(dtype)
    b = rng.standard_normal(20).astype(dtype)
    kw = dict(stride=2, padding=1, groups=20)
    expected = ref.conv2d(np.ascontiguousarray(x), w, b, **kw)
    results = []
    for algo in ("lanes", "direct"):
        big = np.full((2, 40, 8, 14), np.nan, dtype)
        view = big[:, ::2, :, :10]
        y, used = _run(monkeypatch, algo, 2, x, w, b, out=view, **kw)
        assert y is view
        assert used.startswith("channel_lanes" if algo == "lanes" else "direct_"), used
        assert np.isnan(big[:, 1::2]).all() and np.isnan(big[..., 10:]).all()
        results.append(view.copy())
    np.testing.assert_array_equal(results[0], results[1])
    assert_close(results[0], expected, dtype, 9)


TRANSPOSED = [
    (2, (9, 11), (3, 3), dict(padding=1)),
    (2, (9, 11), (1, 1), dict(stride=2)),  # one phase at step 2: every other output is only the bias
    (2, (9, 11), (3, 3), dict(padding=(0, 1), dilation=2)),
    (2, (9, 11), (3, 3), dict(stride=2, padding=1, output_padding=1)),  # four phases, rows stored in pairs
    (2, (7, 10), (4, 4), dict(stride=2, padding=1)),
    (2, (6, 13), (3, 5), dict(stride=(3, 2), padding=(1, 2), output_padding=(2, 0))),
    (2, (5, 6), (2, 3), dict(stride=3, dilation=(2, 1))),  # outputs no tap reaches
    (1, (30,), (5,), dict(stride=2, padding=2, output_padding=1)),
    (3, (4, 5, 7), (3, 3, 3), dict(stride=2, padding=1, output_padding=(1, 0, 1))),
]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(TRANSPOSED)))
def test_transposed(case, dtype, layout, monkeypatch):
    # Transposed depthwise layers (the grad_input of depthwise layers): every stride phase along the
    # row is computed from one buffer; two phases at step 2 are stored by the pair store.
    rank, spatial, kernel, kw = TRANSPOSED[case]
    rng = np.random.default_rng(10 + case)
    groups = 19 if case % 3 == 2 else 16  # 19: a partial channel block
    x = rng.standard_normal((2, groups) + spatial).astype(dtype)
    w = rng.standard_normal((groups, 1) + kernel).astype(dtype)
    b = rng.standard_normal(groups).astype(dtype)
    kw = dict(kw, groups=groups)
    expected = getattr(ref, f"conv_transpose{rank}d")(x, w, b, **kw)
    if layout == "channels_last":
        x = np.moveaxis(x, 1, -1).copy()
        kw["data_format"] = layout
    default, algo = _run(monkeypatch, None, rank, x, w, b, op="conv_transpose", **kw)
    assert algo.startswith(DEPTHWISE_PATHS), algo
    if kw.get("stride") == 2 and kernel[-1] > 1:  # two phases along the row
        assert "paired" in algo, algo
    direct, _ = _run(monkeypatch, "direct", rank, x, w, b, op="conv_transpose", **kw)
    np.testing.assert_array_equal(default, direct)
    got = np.moveaxis(default, -1, 1) if layout == "channels_last" else default
    assert_close(got, expected, dtype, int(np.prod(kernel)))


def test_thread_count_independent(monkeypatch):
    rank, x, w, b, kw = _operands(0, np.float32)
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    results = []
    before = convfast.get_num_threads()
    try:
        for threads in (1, 2, 3):
            convfast.set_num_threads(threads)
            results.append(convfast.conv2d(x, w, b, **kw))
    finally:
        convfast.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_input_not_mutated(monkeypatch):
    rank, x, w, b, kw = _operands(1, np.float64)
    copies = [a.copy() for a in (x, w, b)]
    _run(monkeypatch, "lanes", rank, x, w, b, **kw)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


# The weight gradient of depthwise layers with the channels in the lanes (channel_lanes.cpp,
# weight_grad): every tap one vector chain per item, the items' sums added in a fixed order. Checked
# against the definition (conftest.weight_grad_oracle, float64) and against the depthwise kernel it
# replaces (CONVFAST_ALGO=gemm keeps that one; another summation order, so to rounding).
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES) - 1))
def test_weight_grad(case, dtype, layout, monkeypatch):
    from conftest import weight_grad_oracle
    rank, x, w, b, kw = _operands(case, dtype)
    spec = ref.conv_spec("t", rank, x, w, None, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                         kw["groups"], kw.get("padding_mode", "zeros"), "channels_first")
    gy = np.random.default_rng(100 + case).standard_normal(spec.output_shape()).astype(dtype)
    expected = weight_grad_oracle(x, gy, CASES[case][4], spec.pads, spec.padding_mode, kw["groups"], spec.stride,
                                  spec.dilation)
    xin, gyin = x, gy
    if layout == "channels_last":
        xin, gyin = np.moveaxis(x, 1, -1).copy(), np.moveaxis(gy, 1, -1).copy()
        kw["data_format"] = layout
    backward = getattr(convfast, f"conv{rank}d_backward")
    results = {}
    for algo in (None, "gemm"):
        if algo:
            monkeypatch.setenv("CONVFAST_ALGO", algo)
        else:
            monkeypatch.delenv("CONVFAST_ALGO", raising=False)
        results[algo] = backward(gyin, xin, w, None, needs=(False, True, False), **kw).grad_weight
        used = _core.last_algorithm()
        if algo is None and kw["groups"] >= 16:
            assert used.startswith(tuple("weight_grad " + p for p in DEPTHWISE_PATHS)), used
        if algo == "gemm":
            assert not used.startswith("weight_grad channel_lanes"), used
    size = x.shape[0] * int(np.prod(spec.out_spatial))
    assert_close(results[None], expected, dtype, size)
    assert_close(results["gemm"], expected, dtype, size)


@pytest.mark.parametrize("case", [0, 3, 5, 8])
def test_transposed_weight_grad(case, monkeypatch):
    # A transposed depthwise layer's weight gradient correlates its grad_output (the larger operand)
    # with its input: the same kernel with the roles of the operands swapped.
    from conftest import weight_grad_oracle
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rank, spatial, kernel, kw = TRANSPOSED[case]
    rng = np.random.default_rng(50 + case)
    x = rng.standard_normal((2, 16) + spatial)
    w = rng.standard_normal((16, 1) + kernel)
    kw = dict(kw, groups=16)
    y = getattr(convfast, f"conv_transpose{rank}d")(x, w, None, **kw)
    gy = rng.standard_normal(y.shape)
    gw = getattr(convfast, f"conv_transpose{rank}d_backward")(gy, x, w, None, needs=(False, True, False),
                                                              **kw).grad_weight
    assert _core.last_algorithm().startswith("weight_grad channel_lanes"), _core.last_algorithm()
    stride = kw.get("stride", 1)
    stride = stride if isinstance(stride, tuple) else (stride,) * rank
    dilation = kw.get("dilation", 1)
    dilation = dilation if isinstance(dilation, tuple) else (dilation,) * rank
    pad = kw.get("padding", 0)
    pad = pad if isinstance(pad, tuple) else (pad,) * rank
    # gy padded by `padding` at the start (the cropped outputs) and enough zeros at the end.
    pads = [(p, p + s * n) for p, s, n in zip(pad, stride, spatial)]
    expected = weight_grad_oracle(gy, x, kernel, pads, "zeros", 16, stride, dilation)
    assert_close(gw, expected, np.float64, 2 * int(np.prod(spatial)))


def test_weight_grad_thread_count_independent(monkeypatch):
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rank, x, w, b, kw = _operands(4, np.float32)
    y = convfast.conv2d(x, w, None, **kw)
    gy = np.random.default_rng(9).standard_normal(y.shape).astype(np.float32)
    before = convfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            convfast.set_num_threads(threads)
            results.append(convfast.conv2d_backward(gy, x, w, None, needs=(False, True, False), **kw).grad_weight)
            assert _core.last_algorithm().startswith("weight_grad channel_lanes")
    finally:
        convfast.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
