"""The GEMM's in-place tiles (cpp/conv/algorithms/gemm.cpp, gemm_block): a tile of MR pixels whose
inputs, for every tap, are the first pixel's shifted by one offset per pixel is not packed; the
micro-kernel reads it where it lies, through the rows variant (pixels 1 or 2 apart) or the pixels
variant (any offsets: tiles that wrap from one output row to the next, or across planes).

Unpadded layers whose rows are not a multiple of the tile make every wrapping tile take the pixels
variant; padded layers keep packing the tiles that touch the padding. Each output is the same
multiply-add chain whichever way its tile is read, and the same as the direct path's, so the GEMM
must agree bit for bit with the direct path; both are checked against the float64 NumPy oracle.
"""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close, conv_operands


def _gemm_and_direct(monkeypatch, fn, *args, **kwargs):
    out = []
    for algo in ("gemm", "direct"):
        monkeypatch.setenv("CONVFAST_ALGO", algo)
        out.append((fn(*args, **kwargs), _core.last_algorithm()))
    (gemm, gemm_algo), (direct, direct_algo) = out
    assert gemm_algo.startswith("gather_gemm"), gemm_algo
    assert direct_algo.startswith("direct"), direct_algo
    return gemm, direct


@pytest.fixture(autouse=True)
def usual_orientation(monkeypatch):
    """The usual GEMM orientation (pixels as the broadcast rows) is the one that reads in place."""
    monkeypatch.setenv("CONVFAST_PIXEL_LANES", "0")
    monkeypatch.delenv("CONVFAST_DIRECT", raising=False)


# (rank, batch, C_in, C_out, spatial, kernel, kwargs). Row lengths 5, 7, 11, 13... wrap the tile
# (MR = 6 for AVX2, 14 for AVX-512 float32, 4 for the baseline) at every row; strides 1, 2, 3;
# dilation; K beyond one K block; C_out over several channel tiles; 1-D, 2-D, 3-D; groups.
CASES = [
    (2, 2, 5, 7, (9, 11), (3, 3), {}),
    (2, 1, 3, 17, (12, 13), (3, 3), dict(stride=2)),
    (2, 2, 4, 9, (15, 17), (3, 3), dict(stride=3)),
    (2, 1, 6, 5, (14, 15), (3, 3), dict(dilation=2)),
    (2, 1, 40, 20, (10, 9), (3, 3), {}),
    (2, 2, 8, 12, (11, 10), (5, 3), dict(stride=(1, 2))),
    (1, 3, 7, 9, (41,), (5,), dict(stride=2)),
    (3, 1, 4, 6, (7, 9, 11), (3, 3, 3), dict(stride=2)),
    (3, 2, 3, 5, (6, 7, 8), (2, 3, 3), {}),
    (2, 2, 8, 8, (13, 9), (3, 3), dict(groups=2, stride=2)),
    (2, 1, 5, 6, (12, 11), (3, 3), dict(padding=1, stride=2)),
    (2, 1, 5, 6, (12, 11), (3, 3), dict(padding=(2, 1), padding_mode="reflect")),
    # Padded: the edge pixels go last in each block, so rows are stored in pieces shorter than a
    # vector (output channels beyond one vector of them, for the vector stores).
    (2, 2, 6, 20, (13, 15), (3, 3), dict(padding=1)),
    (2, 1, 8, 17, (19, 12), (3, 5), dict(padding=(1, 2), dilation=(2, 1))),
    (2, 1, 4, 16, (21, 14), (5, 5), dict(padding="same", stride=2)),
    (3, 1, 4, 24, (9, 10, 11), (3, 3, 3), dict(padding=1, stride=2)),
    (1, 2, 5, 18, (50,), (7,), dict(padding=3)),
    (2, 1, 6, 20, (13, 15), (3, 3), dict(padding=1, padding_mode="circular")),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank,batch,cin,cout,spatial,kernel,kw", CASES)
def test_in_place_tiles_match_direct_bitwise_and_oracle(monkeypatch, dtype, rank, batch, cin, cout, spatial, kernel,
                                                        kw):
    x, w, b = conv_operands(np.random.default_rng(7), batch, cin, cout, spatial, kernel, kw.get("groups", 1), dtype)
    fn = getattr(convfast, f"conv{rank}d")
    gemm, direct = _gemm_and_direct(monkeypatch, fn, x, w, b, **kw)
    np.testing.assert_array_equal(gemm, direct)
    assert_close(gemm, getattr(ref, f"conv{rank}d")(x, w, b, **kw), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_transposed_phases_with_wrapping_tiles(monkeypatch, dtype):
    """The stride phases of a transposed layer are stride-1 convolutions over the input; their rows
    (7 wide here) wrap the tiles too."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 5, 7)).astype(dtype)
    w = rng.standard_normal((6, 4, 4, 4)).astype(dtype)
    gemm, direct = _gemm_and_direct(monkeypatch, convfast.conv_transpose2d, x, w, stride=2, padding=1)
    np.testing.assert_array_equal(gemm, direct)
    assert_close(gemm, ref.conv_transpose2d(x, w, stride=2, padding=1), dtype)


def test_strided_input_views(monkeypatch):
    """A non-contiguous input (every other row, a reversed axis) is read in place through its strides."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 5, 26, 13)).astype("float32")
    w = rng.standard_normal((7, 5, 3, 3)).astype("float32")
    for x in (base[:, :, ::2, :], base[:, :, :, ::-1], base[:, :, ::-1, :]):
        gemm, direct = _gemm_and_direct(monkeypatch, convfast.conv2d, x, w, stride=(1, 2))
        np.testing.assert_array_equal(gemm, direct)
        gemm, direct = _gemm_and_direct(monkeypatch, convfast.conv2d, x, w)
        np.testing.assert_array_equal(gemm, direct)
        assert_close(gemm, ref.conv2d(x, w), "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_padded_channels_last(monkeypatch, dtype):
    """Channels-last output takes C's rows as they are, in the block's pixel order (edges last)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 13, 11, 6)).astype(dtype)
    w = rng.standard_normal((20, 6, 3, 3)).astype(dtype)
    b = rng.standard_normal(20).astype(dtype)
    gemm, direct = _gemm_and_direct(monkeypatch, convfast.conv2d, x, w, b, padding=1, data_format="channels_last")
    np.testing.assert_array_equal(gemm, direct)
    assert_close(gemm, ref.conv2d(x, w, b, padding=1, data_format="channels_last"), dtype)


# Channels-last inputs with at least 16 channels per group are read in place whatever the taps and
# the step between pixels (there consecutive k are neighbouring channels of one pixel): 1x1 layers,
# strides, dilation, padding modes, groups, 1-D to 3-D.
CHANNELS_LAST_CASES = [
    (2, 2, 32, 20, (9, 11), (1, 1), {}),
    (2, 1, 16, 40, (12, 13), (3, 3), dict(padding=1)),
    (2, 2, 24, 17, (15, 17), (3, 3), dict(stride=2, padding=1)),
    (2, 1, 20, 12, (14, 15), (3, 3), dict(dilation=2, padding=(2, 1), padding_mode="reflect")),
    (2, 2, 32, 16, (11, 10), (3, 3), dict(groups=2, padding=1)),
    (1, 2, 48, 30, (41,), (5,), dict(stride=2, padding=2)),
    (3, 1, 16, 12, (5, 7, 9), (3, 3, 3), dict(padding=1)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank,batch,cin,cout,spatial,kernel,kw", CHANNELS_LAST_CASES)
def test_channels_last_input_read_in_place(monkeypatch, dtype, rank, batch, cin, cout, spatial, kernel, kw):
    x, w, b = conv_operands(np.random.default_rng(13), batch, cin, cout, spatial, kernel, kw.get("groups", 1), dtype)
    xl = np.moveaxis(x, 1, -1)
    fn = getattr(convfast, f"conv{rank}d")
    gemm, direct = _gemm_and_direct(monkeypatch, fn, xl, w, b, data_format="channels_last", **kw)
    np.testing.assert_array_equal(gemm, direct)
    channels_first, _ = _gemm_and_direct(monkeypatch, fn, np.ascontiguousarray(x), w, b, **kw)
    np.testing.assert_array_equal(np.moveaxis(gemm, -1, 1), channels_first)
    assert_close(gemm, getattr(ref, f"conv{rank}d")(xl, w, b, data_format="channels_last", **kw), dtype)
