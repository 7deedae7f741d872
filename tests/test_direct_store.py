"""The direct path's stores (cpp/conv/algorithms/direct.cpp, direct_tile): with several output-channel
tiles, a pixel tile whose outputs are consecutive in y is written by the micro-kernel straight into
y (then gets its bias); other tiles (a row's last, partial one; one that crosses a row end in plane
mode; the last, partial channel tile; any tile of a non-unit-stride y) go through the scratch tile.

Each output is one multiply-add chain over k in both cases, and the bias is added to the finished
sum, so the direct path must equal the GEMM bit for bit; both are checked against the NumPy oracle.
Plane mode (short rows, tiles across row ends) and row mode (CONVFAST_DIRECT=rows) are both run.
"""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close

# (rank, batch, C_in, C_out, spatial, kernel, kwargs). C_out over one channel tile of every ISA's
# variant (MRO 4 or 6), as a multiple of it and not; row lengths a multiple of the pixel tile and not;
# strides, dilation, padding modes, groups with several channel tiles each.
CASES = [
    (2, 2, 3, 16, (9, 32), (3, 3), dict(padding=1)),
    (2, 1, 3, 13, (7, 37), (3, 3), dict(padding=1, padding_mode="reflect")),
    (2, 2, 2, 24, (12, 20), (3, 5), dict(padding=(1, 2), dilation=(2, 1))),
    (2, 1, 3, 12, (20, 70), (7, 7), dict(stride=2, padding=3)),
    (1, 2, 4, 18, (100,), (5,), dict(padding=2, padding_mode="circular")),
    (3, 1, 1, 16, (6, 8, 16), (3, 3, 3), dict(padding=1)),
    (3, 2, 2, 10, (5, 9, 33), (2, 3, 3), dict(padding="same")),
    (2, 1, 8, 24, (10, 48), (3, 3), dict(padding=1, groups=2)),
]


def _run(monkeypatch, algo, direct_mode, rank, x, w, b, out=None, **kw):
    monkeypatch.setenv("CONVFAST_ALGO", algo)
    if direct_mode:
        monkeypatch.setenv("CONVFAST_DIRECT", direct_mode)
    else:
        monkeypatch.delenv("CONVFAST_DIRECT", raising=False)
    monkeypatch.setenv("CONVFAST_PIXEL_LANES", "0")
    y = getattr(convfast, f"conv{rank}d")(x, w, b, out=out, **kw)
    return y, _core.last_algorithm()


@pytest.mark.parametrize("direct_mode", [None, "rows"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_direct_equals_gemm_and_reference(case, dtype, direct_mode, monkeypatch):
    rank, batch, cin, cout, spatial, kernel, kw = CASES[case]
    groups = kw.get("groups", 1)
    rng = np.random.default_rng(case)
    x = rng.standard_normal((batch, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cout, cin // groups) + kernel).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    direct, algo = _run(monkeypatch, "direct", direct_mode, rank, x, w, b, **kw)
    assert algo.startswith("direct_"), algo
    if direct_mode == "rows":
        assert algo.startswith("direct_rows"), algo
    gemm, gemm_algo = _run(monkeypatch, "gemm", None, rank, x, w, b, **kw)
    assert gemm_algo.startswith("gather_gemm"), gemm_algo
    np.testing.assert_array_equal(direct, gemm)
    expected = getattr(ref, f"conv{rank}d")(x, w, b, **kw)
    assert_close(direct, expected, dtype, cin // groups * int(np.prod(kernel)))


@pytest.mark.parametrize("direct_mode", [None, "rows"])
def test_out_views(direct_mode, monkeypatch):
    # An `out=` whose rows are not consecutive (rows of 40 inside rows of 50): plane tiles that cross
    # a row end go through the scratch tile. A channels-strided `out=` (every other channel): the
    # direct stores use y's channel stride. Nothing outside the views is written.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 11, 40)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    expected = ref.conv2d(x, w, b, padding=1)
    for channels, make_view in ((16, lambda base: base[..., :40]), (32, lambda base: base[:, ::2, :, :40])):
        results = []
        for algo in ("direct", "gemm"):
            base = np.full((2, channels, 11, 50), np.nan, np.float32)
            view = make_view(base)
            y, used = _run(monkeypatch, algo, direct_mode if algo == "direct" else None, 2, x, w, b, out=view,
                           padding=1)
            assert used.startswith("direct_" if algo == "direct" else "gather_gemm"), used
            assert np.shares_memory(y, base)
            results.append(base)
        np.testing.assert_array_equal(results[0], results[1])
        written = ~np.isnan(results[0])
        assert written.sum() == expected.size
        assert_close(make_view(results[0]), expected, np.float32, 27)
