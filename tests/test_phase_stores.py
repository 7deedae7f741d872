"""The stores of fused stride phases (cpp/conv/algorithms/gemm.cpp, store_block): a transposed
convolution with stride 2 along the last axis has its residue-0 and residue-1 phases stored together
by the micro-kernel table's pair store (L pixels of each, zipped into 2L contiguous outputs per
channel); pixels that do not form such runs and channels beyond the last whole vector are
scattered one by one. Checked against the float64 NumPy oracle and, bit for bit, against the direct
path (the same multiply-add chain per output), for every ISA variant CI forces.
"""
import numpy as np
import pytest

import convfast
from convfast import _core
from convfast import reference as ref
from conftest import assert_close


@pytest.fixture(autouse=True)
def automatic_choice(monkeypatch):
    monkeypatch.delenv("CONVFAST_ALGO", raising=False)
    monkeypatch.delenv("CONVFAST_PIXEL_LANES", raising=False)


# (rank, C_in, C_out, spatial, kernel, kwargs): widths with and without whole runs of lanes, channel
# counts with leftovers, kernels 2-5 (one or two taps per phase), output padding, dilation, groups.
CASES = [
    (1, 8, 16, (37,), (2,), dict(stride=2)),
    (1, 5, 19, (9,), (4,), dict(stride=2, padding=1)),
    (2, 16, 24, (6, 20), (2, 2), dict(stride=2)),
    (2, 12, 17, (5, 33), (3, 3), dict(stride=2, padding=1, output_padding=1)),
    (2, 8, 32, (7, 16), (4, 4), dict(stride=(1, 2), padding=1, dilation=(2, 1))),
    (2, 10, 20, (4, 24), (5, 5), dict(stride=2, padding=2, output_padding=1, groups=2)),
    (3, 16, 16, (3, 4, 17), (2, 2, 2), dict(stride=2)),
    (3, 8, 9, (3, 3, 16), (3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paired_phase_stores(case, dtype, monkeypatch):
    rank, cin, cout, spatial, kernel, kwargs = CASES[case]
    groups = kwargs.get("groups", 1)
    rng = np.random.default_rng(case)
    x = rng.standard_normal((2, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cin, cout // groups) + kernel).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    fn = getattr(convfast, f"conv_transpose{rank}d")
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    got = fn(x, w, b, **kwargs)
    assert "fused paired" in _core.last_algorithm(), _core.last_algorithm()
    assert_close(got, getattr(ref, f"conv_transpose{rank}d")(x, w, b, **kwargs))
    monkeypatch.setenv("CONVFAST_ALGO", "direct")
    np.testing.assert_array_equal(got, fn(x, w, b, **kwargs))


def test_paired_phases_into_a_strided_out(monkeypatch):
    # y's rows not contiguous: the pair store cannot run and the scatter writes only the view.
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 8, 5, 12)).astype(np.float32)
    w = rng.standard_normal((8, 16, 2, 2)).astype(np.float32)
    base = np.full((1, 16, 10, 48), np.nan, np.float32)
    convfast.conv_transpose2d(x, w, stride=2, out=base[:, :, :, ::2])
    assert np.isnan(base[:, :, :, 1::2]).all()
    assert_close(base[:, :, :, ::2], ref.conv_transpose2d(x, w, stride=2))
