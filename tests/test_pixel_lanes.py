"""The pixel-lanes GEMM (cpp/conv/algorithms/gemm.cpp, pixel_lanes_item): the GEMM with the roles of its
operands swapped, so that pixels fill the vector lanes and output channels the broadcast rows. It is
chosen, for channels-first outputs, where the usual orientation would pack every tile anyway: one-tap
layers (1x1, and the single phase of a 1x1 transposed convolution at stride 1) and strided layers whose
inputs are not read in place (k2s2, stride 3 and more); CONVFAST_PIXEL_LANES=1 forces it on every GEMM layer, =0 excludes it.

Each output is the same multiply-add chain over k, in the same K blocks, in both orientations, so
the two must agree bit for bit; both are checked against the float64 NumPy oracle too.
"""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close, conv_operands

MODES = ("zeros", "reflect", "replicate", "circular", "symmetric")


@pytest.fixture(autouse=True)
def gemm_only(monkeypatch):
    """Both orientations are GEMMs: the direct and Winograd paths stay out whatever a CI pass forces."""
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    monkeypatch.delenv("CONVFAST_PIXEL_LANES", raising=False)


def _run_both(monkeypatch, fn, *args, **kwargs):
    """(result, algorithm) with the pixel-lanes GEMM forced, then with it excluded."""
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CONVFAST_PIXEL_LANES", flag)
        y = fn(*args, **kwargs)
        out.append((y, _core.last_algorithm()))
    monkeypatch.delenv("CONVFAST_PIXEL_LANES")
    (lanes, lanes_algo), (rows, rows_algo) = out
    assert lanes_algo.startswith("pixel_lanes_gemm"), lanes_algo
    assert rows_algo.startswith("gather_gemm"), rows_algo
    return lanes, rows


# (rank, batch, C_in, C_out, spatial, kernel, kwargs): one-tap layers at the tile edges (pixel counts
# and channel counts not multiples of the tiles, K beyond one K block of 256, C_out large enough to
# shrink the pixel block to one tile), strided, padded in every mode, grouped; and, forced, layers
# with several taps and transposed ones (several phases, interleaved outputs).
CASES = [
    (2, 2, 7, 13, (9, 11), (1, 1), {}),
    (2, 1, 300, 9, (5, 7), (1, 1), {}),
    (2, 1, 600, 5, (3, 4), (1, 1), {}),
    (2, 1, 16, 700, (6, 6), (1, 1), {}),
    (2, 2, 8, 12, (13, 17), (1, 1), dict(stride=2)),
    (2, 2, 6, 10, (9, 11), (1, 1), dict(stride=(2, 3), groups=2)),
    (1, 3, 5, 7, (37,), (1,), dict(stride=3)),
    (3, 2, 4, 6, (3, 5, 7), (1, 1, 1), dict(stride=(1, 2, 1))),
    (2, 2, 5, 6, (8, 9), (3, 3), dict(padding=1)),
    (2, 1, 3, 17, (10, 10), (3, 2), dict(stride=2, dilation=(2, 1), padding=(2, 1))),
    (3, 1, 4, 5, (5, 6, 7), (2, 3, 3), dict(padding="same")),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_orientations_agree_bitwise_and_with_reference(case, dtype, monkeypatch):
    rank, n, cin, cout, spatial, kernel, kwargs = CASES[case]
    x, w, b = conv_operands(np.random.default_rng(case), n, cin, cout, spatial, kernel, kwargs.get("groups", 1), dtype)
    fn = getattr(convfast, f"conv{rank}d")
    lanes, rows = _run_both(monkeypatch, fn, x, w, b, **kwargs)
    np.testing.assert_array_equal(lanes, rows)
    assert_close(lanes, getattr(ref, f"conv{rank}d")(x, w, b, **kwargs))


@pytest.mark.parametrize("mode", MODES)
def test_one_by_one_padding_modes(mode, monkeypatch):
    # A padded 1x1 layer: the border outputs read the padding (zeros, or the mode's mirrored values).
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 6, 7))
    w = rng.standard_normal((9, 5, 1, 1))
    lanes, rows = _run_both(monkeypatch, convfast.conv2d, x, w, padding=(2, 3), padding_mode=mode)
    np.testing.assert_array_equal(lanes, rows)
    assert_close(lanes, ref.conv2d(x, w, padding=(2, 3), padding_mode=mode))


@pytest.mark.parametrize("stride", [1, 2])
def test_transposed_forced(stride, monkeypatch):
    # Transposed layers: a single phase at stride 1; interleaved phases and uncovered outputs at 2.
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, 6, 7, 8)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    lanes, rows = _run_both(monkeypatch, convfast.conv_transpose2d, x, w, b, stride=stride, padding=1)
    np.testing.assert_array_equal(lanes, rows)
    assert_close(lanes, ref.conv_transpose2d(x, w, b, stride=stride, padding=1))


def test_strided_views_and_out(monkeypatch):
    # A non-contiguous input and an `out=` view whose rows are not contiguous: pixel runs of one.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 12, 20)).astype(np.float32)[:, ::2, ::-1, ::2]
    w = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CONVFAST_PIXEL_LANES", flag)
        base = np.full((2, 5, 12, 20), np.nan, np.float32)
        view = base[:, :, :, ::2]
        convfast.conv2d(x, w, out=view)
        results.append(base)
    np.testing.assert_array_equal(results[0], results[1])
    assert np.isnan(results[0][:, :, :, 1::2]).all()  # nothing written outside the view
    assert_close(results[0][:, :, :, ::2], ref.conv2d(x, w))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_rows_with_gaps(monkeypatch, dtype):
    # Pixel tiles are written straight into y only where their pixels are consecutive there: with
    # `out=` rows of 13 inside rows of 20, tiles that cross a row end go through the C block. 24
    # output channels fill the channel tiles (a multiple of every ISA's MR), which direct writes need.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 8, 9, 13)).astype(dtype)
    w = rng.standard_normal((24, 8, 1, 1)).astype(dtype)
    b = rng.standard_normal(24).astype(dtype)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CONVFAST_PIXEL_LANES", flag)
        base = np.full((2, 24, 9, 20), np.nan, dtype)
        convfast.conv2d(x, w, b, out=base[..., :13])
        results.append(base)
    np.testing.assert_array_equal(results[0], results[1])
    assert np.isnan(results[0][..., 13:]).all()  # nothing written outside the view
    assert_close(results[0][..., :13], ref.conv2d(x, w, b), dtype, 8)


def test_chosen_for_channels_first_one_by_one(monkeypatch):
    # The automatic choice: 1x1 channels-first takes the pixel lanes (on maps whose tiles both
    # orientations fill); channels-last and 3x3 do not.
    monkeypatch.delenv("CONVFAST_ALGO")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 32, 32)).astype(np.float32)
    w1 = rng.standard_normal((48, 32, 1, 1)).astype(np.float32)
    convfast.conv2d(x, w1)
    assert _core.last_algorithm().startswith("pixel_lanes_gemm")
    convfast.conv2d(x, w1, stride=2)
    assert _core.last_algorithm().startswith("pixel_lanes_gemm")
    convfast.conv2d(x.transpose(0, 2, 3, 1), w1, data_format="channels_last")
    assert not _core.last_algorithm().startswith("pixel_lanes_gemm")
    convfast.conv2d(x, rng.standard_normal((48, 32, 3, 3)).astype(np.float32), padding=1)
    assert not _core.last_algorithm().startswith("pixel_lanes_gemm")
    # Strided layers whose tiles the usual orientation would pack anyway (k2s2, stride 3) take it;
    # a stride-2 3x3 layer, whose interior tiles are read in place, does not.
    convfast.conv2d(x, rng.standard_normal((48, 32, 2, 2)).astype(np.float32), stride=2)
    assert _core.last_algorithm().startswith("pixel_lanes_gemm")
    convfast.conv2d(x, rng.standard_normal((48, 32, 3, 3)).astype(np.float32), stride=3)
    assert _core.last_algorithm().startswith("pixel_lanes_gemm")
    convfast.conv2d(x, rng.standard_normal((48, 32, 3, 3)).astype(np.float32), stride=2, padding=1)
    assert not _core.last_algorithm().startswith("pixel_lanes_gemm")


@pytest.mark.parametrize("cin, cout, side", [(96, 160, 7), (192, 32, 28), (128, 64, 20), (64, 24, 14), (32, 192, 28),
                                             (48, 40, 10), (16, 24, 56)])
def test_small_maps_take_the_better_filled_tiles(cin, cout, side, monkeypatch):
    # On maps of at most 32x32, a 1x1 layer takes the usual orientation (MR pixels, NR channels per
    # tile) where it fills its tiles at least 5 % better than the pixel lanes (NR pixels, MR
    # channels); both compute the same bits.
    monkeypatch.delenv("CONVFAST_ALGO")
    (mr, nr), _ = _core.ukernel_tiles()
    filled = lambda n, tile: n / (-(-n // tile) * tile)
    pixels = side * side
    gather = pixels <= 1024 and filled(pixels, mr) * filled(cout, nr) >= 1.05 * filled(pixels, nr) * filled(cout, mr)
    rng = np.random.default_rng(cin + cout)
    x = rng.standard_normal((1, cin, side, side)).astype(np.float32)
    w = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    y = convfast.conv2d(x, w)
    assert _core.last_algorithm().startswith("gather_gemm" if gather else "pixel_lanes_gemm"), _core.last_algorithm()
    for forced in ("0", "1"):
        monkeypatch.setenv("CONVFAST_PIXEL_LANES", forced)
        np.testing.assert_array_equal(convfast.conv2d(x, w), y)
    assert_close(y, ref.conv2d(x, w), np.float32, cin)
