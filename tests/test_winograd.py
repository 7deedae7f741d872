"""Winograd F(2, 3) and F(4, 3), the engine's algorithm for stride-1 layers with 3 taps along two or three axes
(cpp/conv/algorithms/winograd.cpp), against the float64 NumPy oracle and closed-form identities.

It is chosen automatically when C_in/G and C_out/G are at least 64 (2-D) or 32 (3-D); CONVFAST_ALGO=winograd forces
it wherever it applies (small channel counts included, so the sweep below stays small), and
CONVFAST_ALGO=gemm|direct exclude it. Every case checks which algorithm ran, so a change in the
selection cannot silently turn these into tests of another path.
"""
import itertools

import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close, weight_grad_oracle

CONV = {2: convfast.conv2d, 3: convfast.conv3d}
CONVT = {2: convfast.conv_transpose2d, 3: convfast.conv_transpose3d}
REF_CONV = {2: ref.conv2d, 3: ref.conv3d}
REF_CONVT = {2: ref.conv_transpose2d, 3: ref.conv_transpose3d}
MODES = ("zeros", "reflect", "replicate", "circular", "symmetric")


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _ran_winograd():
    return _core.last_algorithm().startswith("winograd")


@pytest.fixture(autouse=True)
def automatic_choice(monkeypatch):
    """These tests are about Winograd whatever algorithm a CI pass forces (CONVFAST_ALGO=gemm
    excludes it): each starts from the automatic choice and forces what it needs itself."""
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("CONVFAST_ALGO", "winograd")


# Spatial sizes around the tile (2 outputs, 2 x dilation apart in dilated tiles): outputs of 1, 2,
# 3 and odd/even counts, so tiles whose second output falls past the end are covered.
CASES = list(itertools.product(
    [2, 3],                       # rank
    [(1, 1), (2, 2), (3, 1)],     # dilation, padding
    ["zeros", "reflect", "circular"],
))


@pytest.mark.parametrize("rank,dp,mode", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_reference(rank, dp, mode, dtype, forced):
    dilation, padding = dp
    rng = np.random.default_rng(hash((rank, dp, mode)) % 2**32)
    spatial = {2: (9, 12), 3: (7, 6, 9)}[rank]
    x = _rand(rng, (2, 5) + spatial, dtype)
    w = _rand(rng, (7, 5) + (3,) * rank, dtype)
    b = _rand(rng, (7,), dtype)
    y = CONV[rank](x, w, b, padding=padding, dilation=dilation, padding_mode=mode)
    assert _ran_winograd(), _core.last_algorithm()
    expected = REF_CONV[rank](x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=padding,
                              dilation=dilation, padding_mode=mode)
    assert_close(y, expected, dtype, reduction_size=5 * 3 ** rank)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("padding", [0, 1, 2, "same"])
def test_output_sizes_around_the_tile(size, padding, forced):
    rng = np.random.default_rng(size)
    x = _rand(rng, (1, 3, size + 2, size + 2), np.float64)
    w = _rand(rng, (4, 3, 3, 3), np.float64)
    y = convfast.conv2d(x, w, padding=padding)
    assert _ran_winograd()
    assert_close(y, ref.conv2d(x, w, padding=padding), np.float64, reduction_size=27)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_stride_one(rank, dilation, dtype, forced):
    # A stride-1 transposed convolution is one phase whose taps run backwards; the tile reads them
    # sorted by input offset. Cropping (padding) and a bias included.
    rng = np.random.default_rng(rank * 10 + dilation)
    spatial = {2: (8, 11), 3: (5, 6, 7)}[rank]
    x = _rand(rng, (2, 6) + spatial, dtype)
    w = _rand(rng, (6, 5) + (3,) * rank, dtype)
    b = _rand(rng, (5,), dtype)
    y = CONVT[rank](x, w, b, padding=1, dilation=dilation)
    assert _ran_winograd()
    expected = REF_CONVT[rank](x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1,
                               dilation=dilation)
    assert_close(y, expected, dtype, reduction_size=6 * 3 ** rank)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_single_phase_with_output_step(dtype, forced):
    # Stride 2 with dilation 2 along the last axis: every tap lands on the even outputs, one stride
    # phase whose outputs are 2 apart (odd outputs are the bias alone), its inputs 1 apart -- a
    # Winograd axis whose outputs step by 2 in y (found by the property sweep).
    rng = np.random.default_rng(2)
    x = _rand(rng, (2, 4, 6, 7), dtype)
    w = _rand(rng, (4, 3, 3, 3), dtype)
    b = _rand(rng, (3,), dtype)
    kw = dict(stride=(1, 2), dilation=(1, 2), padding=[(0, 0), (0, 1)])
    y = convfast.conv_transpose2d(x, w, b, **kw)
    assert _ran_winograd()
    expected = ref.conv_transpose2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    assert_close(y, expected, dtype, reduction_size=36)


@pytest.mark.parametrize("kernel", [(3, 3, 1), (1, 3, 3), (3, 1, 3)])
def test_3d_with_one_tap_axis(kernel, forced):
    # Two Winograd axes and a one-tap axis with stride 2 on it (a one-tap axis may be strided).
    rng = np.random.default_rng(sum(kernel))
    x = _rand(rng, (1, 4, 6, 7, 8), np.float64)
    w = _rand(rng, (5, 4) + kernel, np.float64)
    stride = tuple(2 if k == 1 else 1 for k in kernel)
    y = convfast.conv3d(x, w, stride=stride, padding=1)
    assert _ran_winograd()
    assert_close(y, ref.conv3d(x, w, stride=stride, padding=1), np.float64, reduction_size=36)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_groups_layouts_and_flipped_views(layout, forced):
    rng = np.random.default_rng(3)
    x = _rand(rng, (2, 6, 10, 9), np.float32)
    w = _rand(rng, (9, 2, 3, 3), np.float32)
    b = _rand(rng, (9,), np.float32)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1, groups=3)
    xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if layout == "channels_last" else x
    y = convfast.conv2d(xin, w, b, padding=1, groups=3, data_format=layout)
    assert _ran_winograd()
    got = np.moveaxis(y, -1, 1) if layout == "channels_last" else y
    assert_close(got, expected, np.float32, reduction_size=18)
    # A negative-stride view of the input reaches the kernels without a copy.
    flipped = x[:, :, ::-1, ::-1]
    y = convfast.conv2d(flipped, w, b, padding=1, groups=3)
    ref_flipped = ref.conv2d(np.ascontiguousarray(flipped).astype(np.float64), w.astype(np.float64),
                             b.astype(np.float64), padding=1, groups=3)
    assert_close(y, ref_flipped, np.float32, reduction_size=18)


def test_automatic_choice(monkeypatch):
    """Chosen where each channel count per group is at least 16, both together at least 48, on
    at least 16 tiles (256 below 128 channels together, where the transforms weigh more)."""
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(0)
    x = _rand(rng, (1, 64, 12, 12), np.float32)  # 36 F(2, 3) tiles
    convfast.conv2d(x, _rand(rng, (64, 64, 3, 3), np.float32), padding=1)
    assert _ran_winograd()
    x3 = _rand(rng, (2, 32, 12, 12, 12), np.float32)  # 432 tiles
    convfast.conv3d(x3, _rand(rng, (16, 32, 3, 3, 3), np.float32), padding=1)
    assert _ran_winograd()
    convfast.conv3d(x3[:, :16], _rand(rng, (16, 16, 3, 3, 3), np.float32), padding=1)
    assert not _ran_winograd()  # 16 + 16 channels: the direct path
    convfast.conv3d(x[:, :32, None], _rand(rng, (32, 32, 3, 3, 3), np.float32), padding=1)
    assert not _ran_winograd()  # 64 channels together on 36 tiles
    for kw, wshape in [(dict(padding=1), (15, 64, 3, 3)),             # too few output channels
                       (dict(padding=1, stride=2), (64, 64, 3, 3)),  # strided
                       (dict(padding=2), (64, 64, 5, 5)),            # 5 taps
                       (dict(padding=(1, 0)), (64, 64, 3, 1))]:      # one Winograd axis
        convfast.conv2d(x, _rand(rng, wshape, np.float32), **kw)
        assert not _ran_winograd(), (kw, wshape, _core.last_algorithm())


@pytest.mark.parametrize("algo", ["gemm", "direct"])
def test_excluded_when_another_algorithm_is_forced(algo, monkeypatch):
    monkeypatch.setenv("CONVFAST_ALGO", algo)
    x = np.ones((1, 64, 8, 8), np.float32)
    convfast.conv2d(x, np.ones((64, 64, 3, 3), np.float32), padding=1)
    assert not _ran_winograd()


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_integer_data_is_exact(rank, dtype):
    # F(2, 3)'s coefficients are 0, +-1 and 1/2, so small integers stay exact: the result equals
    # the exact integer convolution bit for bit (float32: sums far below 2**24). float64 layers
    # whose weights are all integers keep F(2, 3) for this (F(4, 3)'s 1/6 would round), which
    # keeps integer inputs (computed in float64) exact.
    rng = np.random.default_rng(rank)
    spatial = (11, 10) if rank == 2 else (6, 7, 5)
    x = rng.integers(-8, 9, (2, 64) + spatial).astype(dtype)
    w = rng.integers(-4, 5, (64, 64) + (3,) * rank).astype(dtype)
    b = rng.integers(-3, 4, 64).astype(dtype)
    y = CONV[rank](x, w, b, padding=1)
    assert _core.last_algorithm().startswith("winograd F(2,3)"), _core.last_algorithm()
    exact = REF_CONV[rank](x.astype(np.int64), w.astype(np.int64), b.astype(np.int64), padding=1)
    assert np.array_equal(y, exact.astype(y.dtype))


def test_error_close_to_the_direct_sum():
    # Rounding: the Winograd result's error against float64 stays within a small factor of the
    # GEMM path's (both well inside the documented bound the other tests use).
    rng = np.random.default_rng(7)
    x = _rand(rng, (2, 64, 20, 20), np.float32)
    w = _rand(rng, (64, 64, 3, 3), np.float32)
    exact = ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    y = convfast.conv2d(x, w, padding=1)
    assert _ran_winograd()
    err = np.abs(y - exact).max()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVFAST_ALGO", "gemm")
        err_gemm = np.abs(convfast.conv2d(x, w, padding=1) - exact).max()
    assert err <= 4 * err_gemm, (err, err_gemm)


def test_linearity_and_threads():
    rng = np.random.default_rng(11)
    x1, x2 = _rand(rng, (3, 64, 14, 13), np.float64), _rand(rng, (3, 64, 14, 13), np.float64)
    w = _rand(rng, (64, 64, 3, 3), np.float64)
    y1, y2 = convfast.conv2d(x1, w, padding=1), convfast.conv2d(x2, w, padding=1)
    assert _ran_winograd()
    np.testing.assert_allclose(convfast.conv2d(2 * x1 - x2, w, padding=1), 2 * y1 - y2, rtol=1e-12, atol=1e-11)
    n = convfast.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            convfast.set_num_threads(t)
            results.append(convfast.conv2d(x1, w, padding=1))
        for r in results[1:]:
            assert np.array_equal(r, results[0])
    finally:
        convfast.set_num_threads(n)


def test_layer_object_and_out_argument():
    rng = np.random.default_rng(5)
    layer = convfast.Conv2d(64, 64, 3, padding=1, dtype=np.float32, seed=1)
    x = _rand(rng, (2, 64, 9, 9), np.float32)
    y = layer(x)
    assert _ran_winograd()
    w = np.asarray(layer.weight, np.float64)
    b = None if layer.bias is None else np.asarray(layer.bias, np.float64)
    assert_close(y, ref.conv2d(x.astype(np.float64), w, b, padding=1), np.float32, reduction_size=576)
    big = np.full((2, 64, 9, 12), 5.0, np.float32)
    convfast.conv2d(x, layer.weight.astype(np.float32), None, padding=1, out=big[..., 1:10])
    assert (big[..., :1] == 5).all() and (big[..., 10:] == 5).all()
    assert_close(big[..., 1:10], ref.conv2d(x.astype(np.float64), w, padding=1), np.float32, reduction_size=576)


@pytest.mark.parametrize("cin,cout", [(40, 30), (96, 100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_transform_in_and_beyond_l2(cin, cout, dtype, forced):
    # Weight transforms up to 512 KiB run chunk by chunk; larger ones (96 x 100 x 16 points) keep a
    # whole block's products in scratch and read each point's panels once per block. Both with
    # several chunks per block, a partial last chunk, reflect padding and a bias.
    rng = np.random.default_rng(cin)
    x = _rand(rng, (2, cin, 19, 23), dtype)
    w = _rand(rng, (cout, cin, 3, 3), dtype)
    b = _rand(rng, (cout,), dtype)
    y = convfast.conv2d(x, w, b, padding=1, padding_mode="reflect")
    assert _ran_winograd()
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1,
                          padding_mode="reflect")
    assert_close(y, expected, dtype, reduction_size=9 * cin)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_weight_transform_output_channel_groups(dtype, threads, forced):
    # A large weight transform with blocks of several chunks: the products wait in scratch for a
    # group of output-channel tiles at a time (here 34 tiles of 6 in groups of 21 in float32, 9 in
    # float64, the last group partial), so every group's outputs must land in its own channels;
    # the last row of tiles runs past the image (61 rows). Bitwise the same for 1 and 2 threads.
    rng = np.random.default_rng(7)
    x = _rand(rng, (1, 96, 61, 64), dtype)
    w = _rand(rng, (200, 96, 3, 3), dtype)
    b = _rand(rng, (200,), dtype)
    before = convfast.get_num_threads()
    try:
        convfast.set_num_threads(threads)
        y = convfast.conv2d(x, w, b, padding=1)
        assert _ran_winograd()
        convfast.set_num_threads(3 - threads)
        assert np.array_equal(convfast.conv2d(x, w, b, padding=1), y)
    finally:
        convfast.set_num_threads(before)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1)
    assert_close(y, expected, dtype, reduction_size=9 * 96)


@pytest.mark.parametrize("cin,cout,groups", [(130, 70, 1), (200, 14, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_weight_transform_channel_blocks(cin, cout, groups, transposed, forced):
    # The weight transform runs per output-channel tile and block of 64 input channels: several
    # blocks with a partial last one, a partial last tile, groups, and the transposed weight layout
    # (C_in, C_out / G, k, k), whose strides differ.
    rng = np.random.default_rng(cin + transposed)
    x = _rand(rng, (2, cin, 9, 11), np.float64)
    shape = (cin, cout // groups, 3, 3) if transposed else (cout, cin // groups, 3, 3)
    w = _rand(rng, shape, np.float64)
    fn = "conv_transpose2d" if transposed else "conv2d"
    y = getattr(convfast, fn)(x, w, padding=1, groups=groups)
    assert _ran_winograd()
    expected = getattr(ref, fn)(x, w, padding=1, groups=groups)
    assert_close(y, expected, np.float64, reduction_size=9 * cin)


def test_tile_size_choice(monkeypatch):
    # float32 always F(2, 3); float64 F(4, 3) where its saved products beat its coarser tiles'
    # edge waste by 20 % and its weight transform stays within 32 MiB.
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(1)
    for dtype, cin, size, dilation, tile, batch in [(np.float32, 64, 24, 1, 2, 1), (np.float64, 64, 24, 1, 4, 1),
                                                    (np.float64, 64, 28, 2, 4, 1),   # dilated tiles interleave
                                                    (np.float64, 64, 32, 6, 2, 1),   # equal modelled cost
                                                    # 76 MiB weight transform; 144 tiles amortise F(2, 3)'s
                                                    (np.float64, 512, 6, 1, 2, 16)]:
        x = _rand(rng, (batch, cin, size, size), dtype)
        w = _rand(rng, (cin, cin, 3, 3), dtype)
        y = convfast.conv2d(x, w, padding=dilation, dilation=dilation)
        assert _core.last_algorithm().startswith(f"winograd F({tile},3)"), (dtype, size, _core.last_algorithm())
        expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding=dilation, dilation=dilation)
        assert_close(y, expected, dtype, reduction_size=9 * cin)


def test_weight_transform_memory_cap(monkeypatch):
    # A weight transform over 48 MiB (3-D 3x3x3, 384 channels, float64: 64 x 384^2 x 8 bytes =
    # 72 MiB) leaves the layer to the GEMM path, whose packed weights are 27/64 of that.
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    x = np.zeros((1, 384, 2, 2, 2))
    w = np.zeros((384, 384, 3, 3, 3))
    convfast.conv3d(x, w, padding=1)
    assert not _ran_winograd(), _core.last_algorithm()
    convfast.conv3d(np.zeros((1, 160, 16, 16, 8)), w[:160, :160], padding=1)  # 12.5 MiB, 256 tiles
    assert _ran_winograd(), _core.last_algorithm()


def test_winograd_needs_tiles_to_amortise_its_weight_transform(monkeypatch):
    # 16 tiles plus 4 per MiB of transformed weights: 512 channels (16 MiB in float32) on a 7x7 map
    # (16 tiles) take the GEMM, on eight of them (128 tiles) Winograd; 256 channels (4 MiB) on 14x14
    # (49 tiles) Winograd.
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(3)
    for batch, cin, size, winograd in [(1, 512, 7, False), (8, 512, 7, True), (1, 256, 14, True), (1, 256, 4, False)]:
        x = _rand(rng, (batch, cin, size, size), np.float32)
        w = _rand(rng, (cin, cin, 3, 3), np.float32)
        y = convfast.conv2d(x, w, padding=1)
        assert _ran_winograd() == winograd, (batch, cin, size, _core.last_algorithm())
        expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
        assert_close(y, expected, np.float32, reduction_size=9 * cin)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", ["input_inf", "input_nan", "weight_inf"])
@pytest.mark.parametrize("size", [(10, 11), (5, 70)])
def test_non_finite_values_recomputed_exactly(dtype, where, size, monkeypatch):
    # An infinity inside a Winograd tile becomes Inf - Inf = NaN in the transforms where the direct
    # sum gives +-Inf; an output holding Inf or NaN sends the call to the exact-chain GEMM, so the
    # result is the GEMM path's bit for bit (the NaN/Inf pattern of PyTorch and the oracle). The
    # 70-wide rows have runs of tiles long enough for the vector stores of the output rows, the
    # 11-wide ones only their scalar tails.
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(4)
    height, width = size
    x = _rand(rng, (2, 64, height, width), dtype)
    w = _rand(rng, (64, 64, 3, 3), dtype)
    if where == "input_inf":
        x[1, 3, 2, width // 2] = np.inf
        x[0, 7, 0, 0] = -np.inf
    elif where == "input_nan":
        x[0, 2, height - 1, width - 1] = np.nan
        x[1, 5, 2, width // 2 + 1] = np.nan
    else:
        w[5, 6, 1, 2] = np.inf
    y = convfast.conv2d(x, w, padding=1)
    assert "after winograd" in _core.last_algorithm(), _core.last_algorithm()
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    exact = convfast.conv2d(x, w, padding=1)
    assert np.array_equal(y, exact, equal_nan=True)
    if where == "input_inf":
        assert np.isinf(y).any()
    monkeypatch.delenv("CONVFAST_ALGO")
    convfast.conv2d(np.nan_to_num(x, posinf=1.0, neginf=-1.0, nan=0.0), np.nan_to_num(w, posinf=1.0), padding=1)
    assert _core.last_algorithm().startswith("winograd")  # finite data stays on Winograd


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(stride=2), dict(stride=3, padding=1, output_padding=2),
                                dict(stride=2, padding=1, output_padding=1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_stride_phases_with_two_taps(rank, kw, dtype, forced):
    # Even kernels of strided transposed convolutions (k4 s2, k6 s3): every stride phase has 2 taps
    # per axis and runs as its own F(2, 2) convolution writing its interleaved outputs.
    k = 2 * kw["stride"]
    rng = np.random.default_rng(rank * 7 + k)
    spatial = {2: (5, 7), 3: (3, 4, 5)}[rank]
    x = _rand(rng, (2, 6) + spatial, dtype)
    w = _rand(rng, (6, 5) + (k,) * rank, dtype)
    b = _rand(rng, (5,), dtype)
    y = CONVT[rank](x, w, b, **kw)
    assert _core.last_algorithm().startswith("winograd F(2,2)"), _core.last_algorithm()
    expected = REF_CONVT[rank](x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    assert_close(y, expected, dtype, reduction_size=6 * k ** rank)


@pytest.mark.parametrize("kernel", [(2, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_tap_axes_forward(kernel, dtype, forced):
    # 2-tap axes in a forward convolution, alone or next to a 3-tap axis (F(2, 2) x F(m, 3)).
    rng = np.random.default_rng(sum(kernel))
    x = _rand(rng, (2, 5, 9, 8), dtype)
    w = _rand(rng, (7, 5) + kernel, dtype)
    y = convfast.conv2d(x, w, padding="same", padding_mode="reflect")
    assert _ran_winograd()
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding="same", padding_mode="reflect")
    assert_close(y, expected, dtype, reduction_size=5 * kernel[0] * kernel[1])


def test_transposed_phase_choice():
    rng = np.random.default_rng(2)
    x = _rand(rng, (1, 64, 12, 12), np.float32)  # 36 F(2, 2) tiles per phase (a 6 x 6 input's 9 take the GEMM)
    convfast.conv_transpose2d(x, _rand(rng, (64, 64, 4, 4), np.float32), stride=2, padding=1)
    assert _core.last_algorithm().startswith("winograd F(2,2)") and "phases=4" in _core.last_algorithm()
    # k3 s2: the phases have 1 or 2 taps per axis, some no Winograd axis at all: the GEMM runs all.
    convfast.conv_transpose2d(x, _rand(rng, (64, 64, 3, 3), np.float32), stride=2, padding=1, output_padding=1)
    assert not _ran_winograd()


# ---- The weight gradient (cpp/conv/weight_grad/gemm.cpp, WeightGrad::run_winograd) ----
# The adjoint of F(2, 3) (and in float64 F(4, 3), below) with respect to the weights, for stride-1
# layers (any dilation) with 3 taps along two or three axes and one tap on the others. Checked against a NumPy-only sum over windows
# of the padded input.

BACK = {2: convfast.conv2d_backward, 3: convfast.conv3d_backward}
BACKT = {2: convfast.conv_transpose2d_backward, 3: convfast.conv_transpose3d_backward}
def _ran_winograd_weight_grad():
    return _core.last_algorithm().startswith("weight_grad winograd")


def _grad_weight(fn, *args, **kw):
    """fn(*args, needs=(False, True, False), **kw)'s grad_weight; the last algorithm is reset first
    (by a forward call), so that _core.last_algorithm() describes this call's weight gradient."""
    convfast.conv1d(np.zeros((1, 1, 3)), np.zeros((1, 1, 1)))
    return fn(*args, needs=(False, True, False), **kw)[1]


WG_CASES = [
    # rank, batch, C_in, C_out, groups, spatial, kernel, padding
    (2, 2, 5, 7, 1, (9, 10), (3, 3), (1, 1)),
    (2, 1, 5, 4, 1, (4, 3), (3, 3), (0, 0)),        # 2 x 1 outputs: one partial tile
    (2, 2, 10, 8, 2, (7, 8), (3, 3), (2, 1)),       # groups; odd output counts
    (3, 1, 4, 5, 1, (5, 6, 7), (3, 3, 3), (1, 1, 1)),
    (3, 2, 10, 8, 2, (4, 5, 3), (1, 3, 3), (0, 1, 1)),  # a one-tap axis; groups
    (3, 1, 17, 9, 1, (3, 6, 5), (3, 1, 3), (1, 0, 2)),
]


@pytest.mark.parametrize("case", WG_CASES, ids=lambda c: f"{c[0]}d-{c[2]}x{c[3]}g{c[4]}-{'x'.join(map(str, c[6]))}")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular", "replicate", "symmetric"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_matches_numpy(case, mode, dtype, forced):
    r, n, cin, cout, g, sizes, kernel, padding = case
    rng = np.random.default_rng(abs(hash((case, mode))) % 2**32)
    x = _rand(rng, (n, cin) + sizes, dtype)
    w = _rand(rng, (cout, cin // g) + kernel, dtype)
    out = tuple(s + 2 * p - k + 1 for s, p, k in zip(sizes, padding, kernel))
    gy = _rand(rng, (n, cout) + out, dtype)
    gw = _grad_weight(BACK[r], gy, x, w, padding=padding, groups=g, padding_mode=mode)
    assert _ran_winograd_weight_grad(), _core.last_algorithm()
    assert_close(gw, weight_grad_oracle(x, gy, kernel, [(p, p) for p in padding], mode, g), dtype, reduction_size=n * np.prod(out))


DILATED_WG_CASES = [
    # rank, spatial, kernel, dilation, padding: tiles of outputs o and o + d in blocks of 2d outputs
    (2, (13, 17), (3, 3), (2, 3), (2, 3)),   # 13 and 17 outputs: partial last blocks (1 of 2, 5 of 6)
    (2, (9, 30), (3, 3), (4, 1), (1, 0)),    # 1 output row (< d): the block's other tiles absent
    (3, (7, 8, 9), (3, 1, 3), (2, 5, 3), (2, 0, 0)),
]


@pytest.mark.parametrize("case", DILATED_WG_CASES, ids=lambda c: f"{c[0]}d-d{'x'.join(map(str, c[3]))}")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_dilated(case, mode, dtype, forced):
    r, sizes, kernel, dilation, padding = case
    rng = np.random.default_rng(abs(hash((case, mode))) % 2**32)
    x = _rand(rng, (2, 6) + sizes, dtype)
    w = _rand(rng, (5, 6) + kernel, dtype)
    out = tuple(s + 2 * p - d * (k - 1) for s, p, k, d in zip(sizes, padding, kernel, dilation))
    gy = _rand(rng, (2, 5) + out, dtype)
    gw = _grad_weight(BACK[r], gy, x, w, padding=padding, dilation=dilation, padding_mode=mode)
    assert _ran_winograd_weight_grad(), _core.last_algorithm()
    expected = weight_grad_oracle(x, gy, kernel, [(p, p) for p in padding], mode, dilation=dilation)
    assert_close(gw, expected, dtype, reduction_size=2 * np.prod(out))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_channels_last_and_transposed(dtype, forced, monkeypatch):
    rng = np.random.default_rng(7)
    x = _rand(rng, (2, 6, 7, 9), dtype)
    w = _rand(rng, (5, 6, 3, 3), dtype)
    gy = _rand(rng, (2, 5, 7, 9), dtype)
    expected = weight_grad_oracle(x, gy, (3, 3), [(1, 1)] * 2)
    gw = _grad_weight(BACK[2], np.moveaxis(gy, 1, -1), np.moveaxis(x, 1, -1), w, padding=1,
                      data_format="channels_last")
    assert _ran_winograd_weight_grad()
    assert_close(gw, expected, dtype, reduction_size=2 * 63)
    # The transposed convolution's weight gradient correlates its output gradient (a) with x (b);
    # stride 1 qualifies. Against the exact-chain GEMM.
    wt = _rand(rng, (6, 4, 3, 3), dtype)
    gyt = _rand(rng, (2, 4, 5, 7), dtype)
    gw_wino = _grad_weight(BACKT[2], gyt, x, wt, padding=2)
    assert _ran_winograd_weight_grad()
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    monkeypatch.setenv("CONVFAST_WGRAD_GEMM", "1")  # 4 input channels: else the rows path
    gw_gemm = _grad_weight(BACKT[2], gyt, x, wt, padding=2)
    assert _core.last_algorithm().startswith("weight_grad gemm")
    assert_close(gw_wino, gw_gemm, dtype, reduction_size=2 * 63)


def test_weight_grad_automatic_choice(monkeypatch):
    rng = np.random.default_rng(3)

    def algorithm(rank, cin, cout, **kw):
        x = _rand(rng, (1, cin) + (6,) * rank, np.float32)
        w = _rand(rng, (cout, cin) + (3,) * rank, np.float32)
        y = CONV[rank](x, w, **kw)
        _grad_weight(BACK[rank], np.ones_like(y), x, w, **kw)
        return _core.last_algorithm().split(" threads")[0]

    assert algorithm(2, 64, 64, padding=1).startswith("weight_grad winograd F(2,3) 16 points")
    assert algorithm(3, 32, 32, padding=1).startswith("weight_grad winograd F(2,3) 64 points")
    assert algorithm(2, 64, 64, padding=1).startswith("weight_grad winograd")  # 2-D: from 64 channels
    assert algorithm(2, 48, 64, padding=1).startswith("weight_grad gemm")
    assert algorithm(3, 16, 64, padding=1).startswith("weight_grad winograd")  # 3-D: from 16
    # 16 input channels that stack in the GEMM's lanes (two taps per 32-lane tile) keep the GEMM
    # unless the output channels are many.
    nr = _core.ukernel_tiles()[0][1]
    assert algorithm(3, 16, 16, padding=1).startswith("weight_grad winograd") == (2 * 16 > nr)
    assert algorithm(2, 31, 64, padding=1) == "weight_grad gemm"
    assert algorithm(3, 16, 15, padding=1) == "weight_grad gemm"
    assert algorithm(2, 64, 64, stride=2) == "weight_grad gemm"
    assert algorithm(2, 64, 64, dilation=2).startswith("weight_grad winograd F(2,3) 16 points")
    for forced_algorithm in ("gemm", "direct"):
        monkeypatch.setenv("CONVFAST_ALGO", forced_algorithm)
        assert algorithm(2, 64, 64, padding=1) == "weight_grad gemm"


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_integer_data_is_exact(rank, dtype, forced):
    # The coefficients are 0, +-1 and 1/2 (in G^T, applied to even sums): integer-valued data whose
    # sums fit the mantissa comes out exact.
    rng = np.random.default_rng(rank)
    x = rng.integers(-3, 4, (2, 6) + (5,) * rank).astype(dtype)
    gy = rng.integers(-3, 4, (2, 5) + (5,) * rank).astype(dtype)
    w = np.zeros((5, 6) + (3,) * rank, dtype)
    gw = _grad_weight(BACK[rank], gy, x, w, padding=1, padding_mode="reflect")
    assert _ran_winograd_weight_grad()
    expected = weight_grad_oracle(x.astype(np.int64), gy.astype(np.int64), (3,) * rank, [(1, 1)] * rank, "reflect",
                                  dtype=np.int64)
    np.testing.assert_array_equal(gw, expected.astype(dtype))


def test_weight_grad_error_close_to_the_gemm(monkeypatch):
    rng = np.random.default_rng(11)
    x = _rand(rng, (4, 64, 12, 12), np.float32)
    w = _rand(rng, (64, 64, 3, 3), np.float32)
    gy = _rand(rng, (4, 64, 12, 12), np.float32)
    exact = weight_grad_oracle(x, gy, (3, 3), [(1, 1)] * 2)
    gw_wino = _grad_weight(BACK[2], gy, x, w, padding=1)
    assert _ran_winograd_weight_grad()
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    gw_gemm = _grad_weight(BACK[2], gy, x, w, padding=1)
    err_wino, err_gemm = (float(np.abs(g - exact).max()) for g in (gw_wino, gw_gemm))
    assert err_wino <= 4 * err_gemm, (err_wino, err_gemm)


@pytest.mark.parametrize("where", ["x_inf", "x_nan", "grad_output_inf"])
def test_weight_grad_non_finite_values_recomputed_exactly(where, forced, monkeypatch):
    # Inf - Inf inside a transform is NaN where the direct sums give +-Inf: an output that is not
    # finite sends the call to the exact-chain GEMM, whose result it then equals bit for bit.
    rng = np.random.default_rng(5)
    x = _rand(rng, (2, 6, 8, 8), np.float64)
    w = _rand(rng, (5, 6, 3, 3), np.float64)
    gy = _rand(rng, (2, 5, 8, 8), np.float64)
    target, value = {"x_inf": (x, np.inf), "x_nan": (x, np.nan), "grad_output_inf": (gy, -np.inf)}[where]
    target[1, 2, 3, 4] = value
    gw = _grad_weight(BACK[2], gy, x, w, padding=1)
    assert "after winograd" in _core.last_algorithm()
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    monkeypatch.setenv("CONVFAST_WGRAD_GEMM", "1")  # 6 input channels would take the rows path
    gw_gemm = _grad_weight(BACK[2], gy, x, w, padding=1)
    np.testing.assert_array_equal(gw, gw_gemm)
    assert not np.isfinite(gw).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_bitwise_identical_across_thread_counts(dtype, forced):
    rng = np.random.default_rng(13)
    x = _rand(rng, (3, 40, 9, 10), dtype)
    w = _rand(rng, (36, 40, 3, 3), dtype)
    gy = _rand(rng, (3, 36, 9, 10), dtype)
    before = convfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            convfast.set_num_threads(threads)
            results.append(_grad_weight(BACK[2], gy, x, w, padding=1, padding_mode="circular"))
            assert _ran_winograd_weight_grad()
    finally:
        convfast.set_num_threads(before)
    for gw in results[1:]:
        np.testing.assert_array_equal(gw, results[0])


# ---- The weight gradient's F(4, 3) (float64) ----
# Chosen where its points x tiles beat F(2, 3)'s by 50 % (edge waste of the 4-output tiles
# included): output sizes below are picked for that, with partial last tiles of 1, 2 and 3 outputs.

WG43_CASES = [
    # rank, output sizes, dilation, kernel, groups
    (2, (16, 13), (1, 1), (3, 3), 1),          # 13: a last tile of 1
    (2, (15, 14), (1, 1), (3, 3), 2),          # 3 and 2
    (2, (17, 16), (2, 1), (3, 3), 1),          # dilated tiles of o, o + 2, ...: a partial block
    (2, (24, 16), (3, 1), (3, 3), 1),
    (3, (8, 8, 8), (1, 1, 1), (3, 3, 3), 1),
    (3, (6, 8, 7), (1, 1, 1), (3, 3, 3), 1),
    (3, (5, 16, 16), (1, 1, 1), (1, 3, 3), 1),  # a one-tap axis
]


def _wg43_operands(rng, case, dtype, cin=6, cout=5, batch=2):
    r, out, dilation, kernel, g = case
    pads = tuple(d * (k // 2) for d, k in zip(dilation, kernel))
    sizes = tuple(o + d * (k - 1) - 2 * p for o, d, k, p in zip(out, dilation, kernel, pads))
    x = _rand(rng, (batch, cin * g) + sizes, dtype)
    w = _rand(rng, (cout * g, cin) + kernel, dtype)
    gy = _rand(rng, (batch, cout * g) + out, dtype)
    return x, w, gy, dict(padding=pads, dilation=dilation, groups=g)


@pytest.mark.parametrize("case", WG43_CASES, ids=lambda c: f"{c[0]}d-{'x'.join(map(str, c[1]))}-d{'x'.join(map(str, c[2]))}")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular", "symmetric"])
def test_weight_grad_f43_matches_numpy(case, mode, forced):
    rng = np.random.default_rng(abs(hash((case, mode))) % 2**32)
    x, w, gy, kw = _wg43_operands(rng, case, np.float64)
    rank = case[0]
    gw = _grad_weight(BACK[rank], gy, x, w, padding_mode=mode, **kw)
    assert _core.last_algorithm().startswith("weight_grad winograd F(4,3)"), _core.last_algorithm()
    expected = weight_grad_oracle(x, gy, case[3], [(p, p) for p in kw["padding"]], mode, kw["groups"],
                                  dilation=kw["dilation"])
    assert_close(gw, expected, np.float64, reduction_size=2 * np.prod(case[1]))
    # float32 keeps F(2, 3) on the same layer.
    gw32 = _grad_weight(BACK[rank], gy.astype(np.float32), x.astype(np.float32), w.astype(np.float32),
                        padding_mode=mode, **kw)
    assert _core.last_algorithm().startswith("weight_grad winograd F(2,3)"), _core.last_algorithm()
    assert_close(gw32, expected, np.float32, reduction_size=2 * np.prod(case[1]))


def test_weight_grad_tile_size_choice(monkeypatch):
    # F(4, 3) in float64 where it saves 50 % of the points x tiles (56x56: 1.78x), F(2, 3) where it
    # saves less (14x14: 1.36x), for integer-valued operands (F(2, 3) keeps them exact) and past
    # the products' 48 MiB (512 channels: 36 x 512^2 x 8 bytes).
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    rng = np.random.default_rng(2)

    def tile(cin, size, dtype=np.float64, integers=False):
        x = _rand(rng, (1, cin, size, size), dtype)
        gy = _rand(rng, (1, cin, size, size), dtype)
        if integers:
            x, gy = np.round(x * 4), np.round(gy * 4)
        w = np.zeros((cin, cin, 3, 3), dtype)
        _grad_weight(BACK[2], gy, x, w, padding=1)
        return _core.last_algorithm().split(" points")[0]

    assert tile(64, 56) == "weight_grad winograd F(4,3) 36"
    assert tile(64, 56, np.float32) == "weight_grad winograd F(2,3) 16"
    assert tile(64, 14) == "weight_grad winograd F(2,3) 16"
    assert tile(64, 56, integers=True) == "weight_grad winograd F(2,3) 16"
    assert tile(512, 8) == "weight_grad winograd F(2,3) 16"


def test_weight_grad_f43_integer_data_and_threads(forced):
    rng = np.random.default_rng(17)
    case = WG43_CASES[0]
    x, w, gy, kw = _wg43_operands(rng, case, np.float64, cin=9, cout=7, batch=3)
    # One non-integer element is enough to take F(4, 3); every thread count gives the same bits.
    xi, gyi = np.round(x * 3), np.round(gy * 3)
    xi[0, 0, 0, 0] += 0.5
    before = convfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            convfast.set_num_threads(threads)
            results.append(_grad_weight(BACK[2], gyi, xi, w, padding_mode="reflect", **kw))
            assert _core.last_algorithm().startswith("weight_grad winograd F(4,3)"), _core.last_algorithm()
    finally:
        convfast.set_num_threads(before)
    for gw in results[1:]:
        np.testing.assert_array_equal(gw, results[0])
    # All integers: F(2, 3), exact.
    xi[0, 0, 0, 0] -= 0.5
    gw = _grad_weight(BACK[2], gyi, xi, w, padding_mode="reflect", **kw)
    assert _core.last_algorithm().startswith("weight_grad winograd F(2,3)"), _core.last_algorithm()
    expected = weight_grad_oracle(xi.astype(np.int64), gyi.astype(np.int64), case[3],
                                  [(p, p) for p in kw["padding"]], "reflect", dtype=np.int64)
    np.testing.assert_array_equal(gw, expected.astype(np.float64))


def test_weight_grad_f43_non_finite_values_recomputed_exactly(forced, monkeypatch):
    rng = np.random.default_rng(19)
    x, w, gy, kw = _wg43_operands(rng, WG43_CASES[0], np.float64)
    x[1, 2, 3, 4] = np.inf
    gw = _grad_weight(BACK[2], gy, x, w, **kw)
    assert "after winograd" in _core.last_algorithm()
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    monkeypatch.setenv("CONVFAST_WGRAD_GEMM", "1")
    np.testing.assert_array_equal(gw, _grad_weight(BACK[2], gy, x, w, **kw))
