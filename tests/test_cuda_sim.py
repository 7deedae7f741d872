"""The GPU backend (convfast.cuda) against the NumPy reference, under Numba's CUDA simulator.

The simulator runs the real kernels (the same Python source Numba compiles for a GPU), one Python
thread per CUDA thread, so the shapes here are tiny and the launch grids are capped to one block
per axis (CONVFAST_CUDA_GRID_CAP, which also exercises the kernels' grid-stride loops). Every
parameter family of the operators is covered, on the GEMM tiles and the direct (depthwise) kernel.

NUMBA_ENABLE_CUDASIM is read when numba is first imported. This module sets it at import unless the
environment sets it (pytest imports test modules at collection, before any test runs), so
``NUMBA_ENABLE_CUDASIM=0 python -m pytest tests/test_cuda_sim.py`` runs these tests on a GPU. If
numba was already imported without it and there is no GPU, the module's tests run in a subprocess
under the simulator instead.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cuda_sim_support import (import_numba_cuda, run_module_under_simulator,  # noqa: F401
                              small_grids, subprocess_env)

cuda, SIMULATED, RUNS_HERE = import_numba_cuda()  # before convfast can import numba

import convfast  # noqa: E402
from conftest import assert_close  # noqa: E402

R = convfast.reference
HERE = os.path.dirname(os.path.abspath(__file__))

gpu = pytest.mark.skipif(not RUNS_HERE, reason="numba was imported without the simulator and there is no GPU: "
                                              "see test_in_subprocess")


@pytest.mark.skipif(RUNS_HERE, reason="runs in this process")
def test_in_subprocess():
    run_module_under_simulator(__file__)


def _kernel(monkeypatch, kernel):
    if kernel:
        monkeypatch.setenv("CONVFAST_CUDA_KERNEL", kernel)


def _dev(a):
    return None if a is None else cuda.to_device(a)


def _k(name, w, groups):
    """Reduction size per output (for the float32 tolerance)."""
    w = np.asarray(w)
    return int(np.prod(w.shape[2:])) * (w.shape[1] if not name.startswith("conv_transpose") else w.shape[0] // groups)


def check(name, x, w, b=None, **kw):
    """Device arrays in -> device array out, equal to the reference."""
    y = getattr(convfast, name)(_dev(x), _dev(w), _dev(b), **kw)
    assert getattr(type(y), "__cuda_ndarray__", False), type(y)
    expected = getattr(R, name)(x, w, b, **kw)
    assert y.dtype == expected.dtype
    assert_close(y.copy_to_host(), expected, dtype=expected.dtype, reduction_size=_k(name, w, kw.get("groups", 1)))
    return y


def rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Forward convolution
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("mode,kernel", [("zeros", "wide"), ("reflect", "narrow"), ("replicate", "direct"),
                                         ("circular", "wide"), ("symmetric", "")])
def test_padding_modes_every_rank(rank, mode, kernel, monkeypatch):
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(rank)
    sp = (7, 5, 4)[:rank] if rank < 3 else (4, 3, 5)
    x = rand(rng, (2 if rank < 3 else 1, 3) + sp, np.float32)
    w = rand(rng, (4, 3) + (3, 2, 2)[:rank], np.float32)
    pads = ((2, 1), (0, 2), (1, 1))[:rank]  # asymmetric, larger than the kernel's reach on some sides
    check(f"conv{rank}d", x, w, rand(rng, 4, np.float32), padding=pads, padding_mode=mode, stride=(2, 1, 1)[:rank])


@gpu
def test_pads_larger_than_input_periodic_modes():
    rng = np.random.default_rng(1)
    x, w = rand(rng, (1, 2, 3)), rand(rng, (3, 2, 2))
    for mode in ("circular", "symmetric", "replicate", "zeros"):
        check("conv1d", x, w, padding=((7, 5),), padding_mode=mode)


@gpu
@pytest.mark.parametrize("padding", ["same", "same_lower", "valid", ((3, 0), (1, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_padding_styles_stride_dilation(padding, dtype):
    rng = np.random.default_rng(2)
    x, w = rand(rng, (1, 3, 9, 8), dtype), rand(rng, (5, 3, 3, 2), dtype)
    check("conv2d", x, w, padding=padding, stride=(2, 3), dilation=(2, 1))


@gpu
@pytest.mark.parametrize("groups,cout,kernel", [(2, 4, "wide"), (3, 3, ""), (3, 6, ""), (3, 3, "narrow")])
def test_groups_and_depthwise(groups, cout, kernel, monkeypatch):
    """groups=2 (GEMM per group); depthwise (the direct kernel); depthwise x2 multiplier; depthwise
    forced through the GEMM."""
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(3)
    x = rand(rng, (2, 6 if groups == 2 else 3, 5, 6), np.float32)
    w = rand(rng, (cout, x.shape[1] // groups, 3, 3), np.float32)
    check("conv2d", x, w, rand(rng, cout, np.float32), groups=groups, padding=1, dilation=(1, 2))


@gpu
def test_depthwise_3d_channels_last():
    rng = np.random.default_rng(4)
    x, w = rand(rng, (1, 3, 4, 5, 4)), rand(rng, (4, 1, 3, 2, 3))
    check("conv3d", x, w, groups=4, padding="same", padding_mode="reflect", data_format="channels_last")


@gpu
@pytest.mark.parametrize("kernel", ["wide", "large"])
def test_channels_last_gemm(kernel, monkeypatch):
    """Channels-innermost input: channel-fastest ktab and loads (k_fast), channel-fastest stores."""
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(5)
    x, w = rand(rng, (2, 5, 4, 6), np.float32), rand(rng, (9, 6, 2, 3), np.float32)
    check("conv2d", x, w, rand(rng, 9, np.float32), padding=(1, 0), padding_mode="circular", stride=(1, 2),
          data_format="channels_last")


@gpu
def test_unbatched_and_1d_long_kernel(monkeypatch):
    """An unbatched input, and a reduction longer than the direct kernel's shared-memory chunk."""
    rng = np.random.default_rng(6)
    check("conv1d", rand(rng, (3, 11)), rand(rng, (2, 3, 4)), padding="same", dilation=2)
    _kernel(monkeypatch, "direct")
    check("conv1d", rand(rng, (1, 1, 310), np.float32), rand(rng, (1, 1, 300), np.float32))


@gpu
@pytest.mark.parametrize("kernel,cout,spatial,cin", [("wide", 67, (8, 9), 3),    # M 72, N 67, K 27
                                                     ("narrow", 17, (10, 13), 2),  # M 130, N 17, K 18
                                                     ("large", 130, (4, 33), 1),  # M 132, N 130, K 9
                                                     ("direct", 2, (24, 25), 2)])  # 600 px > one 512 span
def test_tile_edges(kernel, cout, spatial, cin, monkeypatch):
    """M (pixels), N (output channels) and K (reduction) that are not multiples of the tile."""
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(7)
    groups = cin if kernel == "direct" else 1
    x = rand(rng, (1, cin) + spatial, np.float32)
    w = rand(rng, (cout, cin // groups, 3, 3), np.float32)
    check("conv2d", x, w, rand(rng, cout, np.float32), padding=1, groups=groups)


@gpu
@pytest.mark.parametrize("kernel", ["narrow", "direct"])
def test_uncapped_grid(kernel, monkeypatch):
    """Several blocks on the grid axes (the other tests run one block per axis): GEMM grid
    (1, 2, 2) = (M, N, groups x phases); direct grid (2, 2, 2) = (pixels, channels, phases)."""
    monkeypatch.delenv("CONVFAST_CUDA_GRID_CAP")
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(8)
    if kernel == "narrow":
        x, w = rand(rng, (1, 2, 3, 5)), rand(rng, (2, 17, 1, 3))
    else:
        x, w = rand(rng, (1, 2, 2, 150)), rand(rng, (2, 1, 1, 3))
    check("conv_transpose2d", x, w, stride=(2, 1), groups=1 if kernel == "narrow" else 2)


@gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular", "symmetric"])
def test_depthwise_tile_kernel(rank, mode, monkeypatch):
    """The forward depthwise kernel (shared-memory input tiles): every rank and padding mode, with
    stride, dilation, a channel multiplier of 2, bias; float32 at rank 2 (the others float64)."""
    from convfast.cuda import _engine
    kinds = []
    compute = _engine.compute
    monkeypatch.setattr(_engine, "compute", lambda *a, **k: kinds.append(compute(*a, **k)) or kinds[-1])
    rng = np.random.default_rng(50 + rank)
    dtype = np.float32 if rank == 2 else np.float64
    sp = ((19,), (7, 9), (4, 5, 6))[rank - 1]
    x = rand(rng, (2, 3) + sp, dtype)
    w = rand(rng, (6, 1) + ((3,), (3, 2), (2, 3, 2))[rank - 1], dtype)
    kw = dict(groups=3, padding=((2, 1), (1, 1), (0, 1))[:rank], padding_mode=mode,
              stride=(2, 1, 2)[:rank], dilation=(1, 2, 1)[:rank])
    check(f"conv{rank}d", x, w, rand(rng, 6, dtype), **kw)
    assert kinds == ["depthwise"], kinds


@gpu
def test_depthwise_tile_kernel_tiles_layouts_and_fallback(monkeypatch):
    """Several output tiles (uncapped grid too), channels_last, non-finite weights (0 * inf = NaN
    at the padded zeros, as the reference); a receptive field beyond the shared tile and a
    transposed depthwise layer take the direct kernel."""
    from convfast.cuda import _engine
    kinds = []
    compute = _engine.compute
    monkeypatch.setattr(_engine, "compute", lambda *a, **k: kinds.append(compute(*a, **k)) or kinds[-1])
    rng = np.random.default_rng(60)
    x, w = rand(rng, (1, 2, 20, 35), np.float32), rand(rng, (2, 1, 3, 3), np.float32)
    capped = check("conv2d", x, w, groups=2, padding=1).copy_to_host()
    monkeypatch.delenv("CONVFAST_CUDA_GRID_CAP")
    np.testing.assert_array_equal(capped, convfast.conv2d(_dev(x), _dev(w), groups=2, padding=1).copy_to_host())
    monkeypatch.setenv("CONVFAST_CUDA_GRID_CAP", "1")
    xl = np.moveaxis(rand(rng, (2, 4, 6, 5)), 1, -1).copy()
    check("conv2d", xl, rand(rng, (4, 1, 3, 3)), groups=4, padding="same", padding_mode="reflect",
          data_format="channels_last")
    wf = rand(rng, (2, 1, 3, 3))
    wf[1, 0, 0, 0] = np.inf
    x2 = rand(rng, (1, 2, 5, 5))
    y = convfast.conv2d(_dev(x2), wf, groups=2, padding=1).copy_to_host()
    ref = R.conv2d(x2, wf, groups=2, padding=1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    assert kinds == ["depthwise"] * 4, kinds
    # receptive field of a 16 x 16 tile: 26 x 216 > 4096 elements
    check("conv2d", rand(rng, (1, 2, 12, 205)), rand(rng, (2, 1, 3, 3)), groups=2, dilation=(5, 100))
    check("conv_transpose2d", rand(rng, (1, 2, 3, 3)), rand(rng, (2, 1, 3, 3)), groups=2, stride=2)
    assert kinds[4:] == ["direct", "direct"], kinds


@gpu
def test_split_k_equals_the_reference_and_ignores_the_grid(monkeypatch):
    """Split-K (grids under two waves on the GPU; the minimum chunk lowered so that these small
    problems split), float32 (float64 never splits): forward on each tile, transposed (phases of
    different K, one with none), a padding mode, channels_last; the chunks are added in a fixed
    order, so capped and uncapped grids give the same bits. A transposed split with a non-finite
    weight still takes the direct kernel (the finishing kernel is skipped with the GEMM)."""
    from convfast.cuda import _engine
    monkeypatch.setattr(_engine, "_SPLIT_MIN_K", 8)
    plans = []
    split_k = _engine.split_k
    monkeypatch.setattr(_engine, "split_k", lambda *a: plans.append(split_k(*a)) or plans[-1])
    rng = np.random.default_rng(40)
    cases = [("conv2d", "wide", (2, 5, 6, 5), (7, 5, 3, 3), dict(padding=1, padding_mode="reflect"), np.float32),
             ("conv2d", "narrow", (1, 6, 5, 4), (3, 6, 2, 3), dict(stride=(2, 1), padding=1), np.float32),
             ("conv2d", "large", (1, 4, 5, 5), (9, 4, 3, 3), dict(padding="same", data_format="channels_last"),
              np.float32),
             ("conv_transpose2d", "wide", (1, 16, 3, 4), (16, 5, 4, 3), dict(stride=(2, 4), padding=1), np.float32)]
    for name, kernel, xs, ws, kw, dtype in cases:
        monkeypatch.setenv("CONVFAST_CUDA_KERNEL", kernel)
        x, w = rand(rng, xs, dtype), rand(rng, ws, dtype)
        if kw.get("data_format") == "channels_last":
            x = np.moveaxis(x, 1, -1).copy()
        b = rand(rng, ws[0] if name == "conv2d" else ws[1], dtype)
        capped = check(name, x, w, b, **kw).copy_to_host()
        monkeypatch.delenv("CONVFAST_CUDA_GRID_CAP")
        uncapped = getattr(convfast, name)(_dev(x), _dev(w), _dev(b), **kw).copy_to_host()
        monkeypatch.setenv("CONVFAST_CUDA_GRID_CAP", "1")
        np.testing.assert_array_equal(capped, uncapped)
    assert len(plans) == 2 * len(cases) and min(s for s, _ in plans) >= 2, plans
    x, w = rand(rng, (1, 16, 3, 4), np.float32), rand(rng, (16, 5, 4, 3), np.float32)
    w[2, 1, 0, 1] = np.inf
    y = convfast.conv_transpose2d(_dev(x), w, stride=(2, 4), padding=1).copy_to_host()
    ref = R.conv_transpose2d(x, w, stride=(2, 4), padding=1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    finite = np.isfinite(ref)
    assert_close(y[finite], ref[finite])
    assert plans[-1][0] >= 2
    count = len(plans)
    check("conv2d", rand(rng, (2, 5, 6, 5)), rand(rng, (7, 5, 3, 3)), padding=1)  # float64: one chunk
    assert len(plans) == count


@gpu
def test_int64_offset_gemm_matches_the_int32_one_bitwise(monkeypatch):
    """The forward GEMM gathers with 32-bit element offsets when x and the packed weights span fewer
    than 2**31 elements, with 64-bit ones otherwise (_engine._INT32_SPAN, lowered here so that the
    64-bit variant runs): every tile, both dtypes, padding modes, channels_last, transposed and
    split-K give the same bits on both, equal to the reference."""
    from convfast.cuda import _engine, _kernels
    monkeypatch.setattr(_engine, "_SPLIT_MIN_K", 8)
    widths = []
    gemm_kernel = _kernels.gemm_kernel
    monkeypatch.setattr(_kernels, "gemm_kernel", lambda *a: widths.append(a[-1]) or gemm_kernel(*a))
    rng = np.random.default_rng(41)
    cases = [("conv2d", "wide", (2, 5, 6, 5), (7, 5, 3, 3), dict(padding=1), np.float32),
             ("conv2d", "narrow", (1, 6, 5, 4), (3, 6, 2, 3), dict(stride=(2, 1), padding=1,
                                                                   padding_mode="circular"), np.float32),
             ("conv2d", "large", (1, 4, 5, 5), (9, 4, 3, 3), dict(padding="same", data_format="channels_last"),
              np.float32),
             ("conv3d", "wide", (1, 3, 3, 4, 3), (5, 3, 2, 3, 2), dict(padding=1, padding_mode="reflect"),
              np.float64),
             ("conv1d", "narrow", (2, 4, 9), (5, 4, 3), dict(padding=2, dilation=2), np.float64),
             ("conv_transpose2d", "wide", (1, 6, 3, 4), (6, 5, 4, 3), dict(stride=(2, 3), padding=1), np.float32)]
    for name, kernel, xs, ws, kw, dtype in cases:
        monkeypatch.setenv("CONVFAST_CUDA_KERNEL", kernel)
        x, w = rand(rng, xs, dtype), rand(rng, ws, dtype)
        if kw.get("data_format") == "channels_last":
            x = np.moveaxis(x, 1, -1).copy()
        b = rand(rng, ws[0] if not name.startswith("conv_transpose") else ws[1], dtype)
        narrow = check(name, x, w, b, **kw).copy_to_host()
        monkeypatch.setattr(_engine, "_INT32_SPAN", 0)
        wide = check(name, x, w, b, **kw).copy_to_host()
        monkeypatch.setattr(_engine, "_INT32_SPAN", 2 ** 31)
        np.testing.assert_array_equal(narrow, wide)
        assert widths[-2:] == [True, False], widths  # the 32-bit variant, then the 64-bit one


def test_split_plan_depends_on_the_grid_size_only():
    from convfast.cuda import _engine
    assert _engine.split_k(8, 4608, 8, 2) == (18, 256)         # 512 3x3 on 7x7, batch 1: 8 blocks
    assert _engine.split_k(600, 4608, 8, 2) == (1, 4608)       # two waves already
    assert _engine.split_k(8, 300, 8, 2) == (1, 300)           # K too short to split
    splits, chunk = _engine.split_k(3, 10 ** 6, 16, 1)
    assert splits == 32 and chunk % 16 == 0 and (splits - 1) * chunk < 10 ** 6 <= splits * chunk


# ----------------------------------------------------------------------------------------------
# Transposed convolution
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kernel", ["wide", "direct"])
def test_transposed_every_rank(rank, kernel, monkeypatch):
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(10 + rank)
    sp = (5, 4, 3)[:rank] if rank < 3 else (3, 2, 3)
    x = rand(rng, (2, 4) + sp, np.float32)
    w = rand(rng, (4, 3) + (3, 2, 3)[:rank], np.float32)
    check(f"conv_transpose{rank}d", x, w, rand(rng, 6, np.float32), stride=(2, 3, 2)[:rank],
          padding=(1, 0, 2)[:rank], output_padding=(1, 2, 0)[:rank], groups=2, dilation=(1, 1, 2)[:rank])


@gpu
@pytest.mark.parametrize("kw", [dict(padding="same", stride=2),
                                dict(padding="same_lower", stride=3, dilation=2),
                                dict(padding=((2, 0), (0, 3)), stride=(3, 2), output_size=(11, 4)),
                                dict(stride=3),                      # kernel shorter than the stride:
                                dict(stride=(4, 1), padding=(0, 1))])  # phases with no taps (bias only)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_padding_and_output_size(kw, dtype):
    rng = np.random.default_rng(12)
    x, w = rand(rng, (1, 3, 4, 3), dtype), rand(rng, (3, 2, 2, 2), dtype)
    check("conv_transpose2d", x, w, rand(rng, 2, dtype), **kw)


@gpu
def test_transposed_3d_k2s2_channels_last_and_unbatched():
    rng = np.random.default_rng(13)
    x, w = rand(rng, (2, 3, 2, 3, 2), np.float32), rand(rng, (3, 4, 2, 2, 2), np.float32)
    check("conv_transpose3d", np.moveaxis(x, 1, -1).copy(), w, stride=2, data_format="channels_last")
    check("conv_transpose3d", x[0], w, stride=2, padding=1, output_padding=1)


@gpu
def test_transposed_depthwise():
    rng = np.random.default_rng(14)
    x, w = rand(rng, (1, 4, 5, 4)), rand(rng, (4, 1, 3, 3))
    check("conv_transpose2d", x, w, rand(rng, 4), stride=2, padding=1, groups=4)


@gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_weights_match_the_reference(monkeypatch):
    """Transposed: the implicit zeros beyond the input are never multiplied (a non-finite weight
    takes the direct kernel); forward with zeros padding: the padded zeros are (0 * inf = NaN),
    on the GEMM and on the direct kernel alike."""
    rng = np.random.default_rng(15)
    x = rand(rng, (1, 2, 3, 3))
    wt = rand(rng, (2, 2, 3, 3))
    wt[0, 1, 0, 0] = np.inf
    y = convfast.conv_transpose2d(_dev(x), wt, stride=2, padding=1).copy_to_host()
    ref = R.conv_transpose2d(x, wt, stride=2, padding=1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    finite = np.isfinite(ref)
    assert_close(y[finite], ref[finite])
    wf = rand(rng, (2, 2, 3, 3))
    wf[1, 0, 0, 0] = np.inf
    for kernel in ("wide", "direct"):
        monkeypatch.setenv("CONVFAST_CUDA_KERNEL", kernel)
        y = convfast.conv2d(_dev(x), wf, padding=1).copy_to_host()
        ref = R.conv2d(x, wf, padding=1)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))


@gpu
@pytest.mark.parametrize("seed", range(6))
def test_random_combinations(seed, monkeypatch):
    """Seeded random mixes of every parameter family (a few: the simulator is slow)."""
    rng = np.random.default_rng(100 + seed)
    rank = 1 + seed % 3
    transposed = seed % 2 == 1
    groups = int(rng.choice([1, 2]))
    cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 4))
    kernel = ("wide", "narrow", "direct", "")[seed % 4]
    _kernel(monkeypatch, kernel)
    k = tuple(int(v) for v in rng.integers(1, 4, rank))
    kw = dict(stride=tuple(int(v) for v in rng.integers(1, 3, rank)),
              dilation=tuple(int(v) for v in rng.integers(1, 3, rank)), groups=groups,
              padding=tuple((int(a), int(b)) for a, b in rng.integers(0, 3, (rank, 2))))
    cl = bool(rng.integers(0, 2))
    kw["data_format"] = "channels_last" if cl else "channels_first"
    sp = tuple(int(v) for v in rng.integers(3, 6, rank))
    shape = (2,) + (sp + (cin,) if cl else (cin,) + sp)
    dtype = (np.float32, np.float64)[seed % 2]
    x = rand(rng, shape, dtype)
    if transposed:
        w = rand(rng, (cin, cout // groups) + k, dtype)
        name = f"conv_transpose{rank}d"
    else:
        w = rand(rng, (cout, cin // groups) + k, dtype)
        kw["padding_mode"] = str(rng.choice(["zeros", "reflect", "replicate", "circular", "symmetric"]))
        kw["padding"] = tuple((min(a, n - 1), min(b, n - 1)) for (a, b), n in zip(kw["padding"], sp))
        name = f"conv{rank}d"
    try:
        getattr(R, name)(x, w, **kw)
    except ValueError:  # e.g. a transposed padding that crops the whole output
        kw["padding"] = 0
    check(name, x, w, rand(rng, cout, dtype) if seed % 3 else None, **kw)


# ----------------------------------------------------------------------------------------------
# Arrays in and out, dtypes, out=
# ----------------------------------------------------------------------------------------------

@gpu
def test_device_cuda_numpy_in_numpy_out():
    rng = np.random.default_rng(20)
    x, w, b = rand(rng, (2, 3, 6, 5), np.float32), rand(rng, (4, 3, 3, 3), np.float32), rand(rng, 4, np.float32)
    y = convfast.conv2d(x, w, b, padding=1, device="cuda")
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert_close(y, R.conv2d(x, w, b, padding=1), dtype=np.float32, reduction_size=27)
    out = np.empty_like(y)
    assert convfast.conv2d(x, w, b, padding=1, device="CUDA", out=out) is out
    np.testing.assert_array_equal(out, y)
    xt = rand(rng, (3, 4))  # unbatched 1-D transposed, lists for the weights
    yt = convfast.conv_transpose1d(xt, rand(rng, (3, 2, 3)).tolist(), stride=2, device="cuda")
    assert isinstance(yt, np.ndarray) and yt.shape == (2, 9)


@gpu
def test_strided_device_input():
    """Non-contiguous device views (a slice with a negative stride): read through their strides."""
    rng = np.random.default_rng(21)
    big = rand(rng, (2, 6, 9, 8))
    view = cuda.to_device(big)[:, ::2, 1::2, ::-1]
    w = rand(rng, (2, 3, 2, 2))
    y = convfast.conv2d(view, w, padding=1, padding_mode="reflect")
    assert_close(y.copy_to_host(), R.conv2d(big[:, ::2, 1::2, ::-1], w, padding=1, padding_mode="reflect"))


@gpu
@pytest.mark.parametrize("kernel", ["wide", "narrow"])
def test_negative_channel_stride_with_a_padding_mode(kernel, monkeypatch):
    """Channels read backwards (a negative channel stride) with a padding mode other than zeros:
    the GEMM's staged channel offsets are negative, and still read (rows beyond K are marked by
    their tap offset, not by the sign of the channel offset)."""
    _kernel(monkeypatch, kernel)
    rng = np.random.default_rng(22)
    big = rand(rng, (2, 6, 5, 4))
    w = rand(rng, (3, 3, 2, 3))
    for mode in ("reflect", "circular"):
        y = convfast.conv2d(cuda.to_device(big)[:, ::-2], w, padding=1, padding_mode=mode)
        assert_close(y.copy_to_host(), R.conv2d(big[:, ::-2], w, padding=1, padding_mode=mode))


@gpu
def test_mixed_dtypes():
    """float16 / int device inputs are cast on load; a float64 operand makes the call float64."""
    rng = np.random.default_rng(22)
    x, w = rand(rng, (1, 2, 5, 5)), rand(rng, (3, 2, 3, 3))
    y = convfast.conv2d(cuda.to_device(x.astype(np.float16)), w.astype(np.float32))
    assert y.dtype == np.float32
    assert_close(y.copy_to_host(), R.conv2d(x.astype(np.float16), w.astype(np.float32)), dtype=np.float32,
                 reduction_size=18)
    xi = rng.integers(-3, 4, (1, 2, 5, 5)).astype(np.int32)
    y = convfast.conv2d(cuda.to_device(xi), w.astype(np.float32))
    assert y.dtype == np.float64
    assert_close(y.copy_to_host(), R.conv2d(xi, w.astype(np.float32)))
    y = convfast.conv2d(cuda.to_device(x.astype(np.float32)), w)  # float64 host weights
    assert y.dtype == np.float64


@gpu
def test_out_argument():
    rng = np.random.default_rng(23)
    x, w = rand(rng, (1, 3, 4, 4)), rand(rng, (3, 3, 1, 1))
    expected = R.conv2d(x, w)
    xd = cuda.to_device(x)
    out = cuda.device_array((1, 3, 4, 4))
    assert convfast.conv2d(xd, w, out=out) is out
    assert_close(out.copy_to_host(), expected)
    # out aliasing x (an in-place 1x1 convolution): computed into a temporary, then copied
    assert convfast.conv2d(xd, w, out=xd) is xd
    assert_close(xd.copy_to_host(), expected)
    with pytest.raises(TypeError, match="conv2d: out has dtype float32"):
        convfast.conv2d(cuda.to_device(x), w, out=cuda.device_array((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="conv2d: out has shape"):
        convfast.conv2d(cuda.to_device(x), w, out=cuda.device_array((1, 3, 4, 5)))
    with pytest.raises(TypeError, match="conv2d: out must be a GPU array"):
        convfast.conv2d(cuda.to_device(x), w, out=np.empty((1, 3, 4, 4)))


@gpu
def test_empty_output():
    y = convfast.conv2d(cuda.to_device(np.zeros((0, 2, 4, 4))), np.ones((3, 2, 3, 3)))
    assert tuple(y.shape) == (0, 3, 2, 2)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

@gpu
def test_layer_to_cuda_keeps_weights_on_device():
    rng = np.random.default_rng(30)
    layer = convfast.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", seed=0)
    assert layer.to("cuda") is layer and layer.device == "cuda"
    x = rand(rng, (2, 3, 5, 6), np.float32)
    expected = R.conv2d(x, layer.weight, layer.bias, padding="same", padding_mode="reflect")
    y = layer(x)  # host in, host out, computed on the device
    assert isinstance(y, np.ndarray)
    assert_close(y, expected, dtype=np.float32, reduction_size=27)
    yd = layer(cuda.to_device(x))
    assert_close(yd.copy_to_host(), expected, dtype=np.float32, reduction_size=27)
    assert len(layer._gpu.packed) == 1  # packed once, reused by the second call
    layer.weight = 2 * layer.weight      # a new weight refreshes the device copy
    layer.bias = None
    assert_close(layer(cuda.to_device(x)).copy_to_host(), R.conv2d(x, layer.weight, padding="same",
                                                                   padding_mode="reflect"),
                 dtype=np.float32, reduction_size=27)
    layer.to("cpu")
    assert layer.device == "cpu" and layer._gpu is None
    with pytest.raises(ValueError, match="Conv2d: x is a GPU array"):
        layer(cuda.to_device(x))


@gpu
def test_transposed_layer_gpu_input_output_size():
    rng = np.random.default_rng(31)
    layer = convfast.ConvTranspose3d(2, 3, 2, stride=2, seed=1)
    x = rand(rng, (1, 2, 2, 2, 3), np.float32)
    y = layer(cuda.to_device(x), output_size=(5, 4, 7))  # auto: the GPU, weights copied and kept
    assert layer.device is None and layer._gpu is not None
    assert_close(y.copy_to_host(), layer(x, output_size=(5, 4, 7)), dtype=np.float32, reduction_size=16)


# ----------------------------------------------------------------------------------------------
# Errors, caching, dispatch rules
# ----------------------------------------------------------------------------------------------

@gpu
def test_bad_arguments_on_the_gpu_path():
    x = cuda.to_device(np.zeros((1, 2, 5, 5)))
    with pytest.raises(ValueError, match="conv2d: stride must be >= 1"):
        convfast.conv2d(x, np.ones((2, 2, 3, 3)), stride=0)
    with pytest.raises(ValueError, match="conv2d: x has 2 channels"):
        convfast.conv2d(x, np.ones((2, 3, 3, 3)))
    with pytest.raises(TypeError, match="conv_transpose2d: weight must be a real numeric array"):
        convfast.conv_transpose2d(x, cuda.to_device(np.ones((2, 2, 3, 3), np.complex64)))
    with pytest.raises(ValueError, match="conv2d: device must be None, 'cpu' or 'cuda'"):
        convfast.conv2d(x, np.ones((2, 2, 3, 3)), device="gpu")
    with pytest.raises(TypeError, match="conv2d: device must be"):
        convfast.conv2d(x, np.ones((2, 2, 3, 3)), device=0)
    with pytest.raises(ValueError, match="conv2d: x is a GPU array .* device='cpu'"):
        convfast.conv2d(x, np.ones((2, 2, 3, 3)), device="cpu")
    with pytest.raises(ValueError, match="conv2d: weight is a GPU array"):
        convfast.conv2d(np.zeros((1, 2, 5, 5)), cuda.to_device(np.ones((2, 2, 3, 3))))
    with pytest.raises(ValueError, match="Conv1d: device must be"):
        convfast.Conv1d(1, 1, 1).to("tpu")


@gpu
def test_kernels_and_plans_are_cached():
    from convfast.cuda import _engine, _kernels, _plan
    rng = np.random.default_rng(40)
    x, w = rand(rng, (1, 2, 4, 4), np.float32), rand(rng, (3, 2, 3, 3), np.float32)
    convfast.conv2d(cuda.to_device(x), w, padding=1)
    hits = _plan.build_plan.cache_info().hits
    compiled = _kernels.gemm_kernel.cache_info().currsize
    convfast.conv2d(cuda.to_device(x), w, padding=1)
    assert _plan.build_plan.cache_info().hits == hits + 1
    assert _kernels.gemm_kernel.cache_info().currsize == compiled  # the same dispatcher: no recompilation
    assert _kernels.gemm_kernel("float32", "wide", False, False) is _kernels.gemm_kernel("float32", "wide", False,
                                                                                         False)
    assert len(_engine._TABLES) <= _engine._TABLES_MAX


def test_plan_phases_partition_the_taps():
    """numba-free planning: a transposed convolution's phases use every tap that reaches an input
    exactly once, and q extents cover the output."""
    from convfast.cuda._plan import build_plan, choose_kernel
    plan = build_plan(True, (1, 4, 5), (1, 9, 11), (1, 3, 3), (1, 2, 2), (1, 1, 1), (0, 1, 1), 2, False)
    assert plan.num_phases == 4
    assert plan.k_total == 2 * 9
    taps = {tuple(r[[0, 4, 5, 6]]) for r in plan.ktab}
    assert len(taps) == plan.k_total
    assert sum(int(p[0] * p[1] * p[2]) for p in plan.phases) == 9 * 11
    assert choose_kernel(1, 1, np.float32, 100) == "depthwise"
    assert choose_kernel(64, 8, np.float32, 100) == "narrow"
    assert choose_kernel(64, 64, np.float64, 10 ** 6) == "wide"
    assert choose_kernel(256, 256, np.float32, 10 ** 6) == "large"


def test_gpu_array_detection_never_imports_numba():
    from convfast.cuda import is_gpu_array, select_device

    class CAI:
        __cuda_array_interface__ = {}

    class DLPackCuda:
        def __dlpack_device__(self):
            return (2, 0)

    assert is_gpu_array(CAI()) and is_gpu_array(DLPackCuda())
    assert not is_gpu_array(np.zeros(3)) and not is_gpu_array([1, 2]) and not is_gpu_array(None)
    assert select_device("f", None, np.zeros(2)) == "cpu"
    assert select_device("f", "cuda", np.zeros(2)) == "cuda"
    with pytest.raises(ValueError, match="f: x is a GPU array"):
        select_device("f", "cpu", DLPackCuda())


def test_numpy_25_trap_is_reported(monkeypatch):
    from convfast.cuda import _engine
    monkeypatch.setattr(_engine, "SIMULATED", False)
    monkeypatch.setattr(_engine.cuda, "is_available", lambda: True)
    monkeypatch.delattr(np, "row_stack", raising=False)
    import numba_cuda
    if tuple(int(v) for v in numba_cuda.__version__.split(".")[:2]) > (0, 30):
        pytest.skip("only numba-cuda <= 0.30 is known to need np.row_stack")
    with pytest.raises(RuntimeError, match="conv2d: .*numpy<2.5"):
        _engine.require_gpu("conv2d")


def test_import_convfast_does_not_import_numba():
    code = textwrap.dedent("""
        import sys, numpy as np, convfast
        convfast.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))
        convfast.Conv1d(1, 1, 1)(np.ones((1, 1, 4)))
        bad = [m for m in sys.modules if m == "numba" or m.startswith("numba.")]
        assert not bad, bad
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_clear_error_without_a_gpu():
    """No simulator, no GPU (this machine): device='cuda' is a RuntimeError naming the function."""
    code = textwrap.dedent("""
        import numpy as np, convfast
        from numba import cuda
        if cuda.is_available():
            print("has-gpu")
            raise SystemExit(0)
        for call in (lambda: convfast.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)), device="cuda"),
                     lambda: convfast.ConvTranspose1d(1, 1, 2).to("cuda")):
            try:
                call()
            except RuntimeError as exc:
                print("RuntimeError:", exc)
            else:
                raise SystemExit("no error")
        print("cuda.is_available:", convfast.cuda.is_available())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    if "has-gpu" in proc.stdout:
        pytest.skip("a GPU is available")
    assert "RuntimeError: conv2d: running on the GPU needs a CUDA GPU" in proc.stdout, proc.stdout
    assert "RuntimeError: ConvTranspose1d: running on the GPU" in proc.stdout, proc.stdout
    assert "is_available() is False" in proc.stdout
    assert "cuda.is_available: False" in proc.stdout


def test_benchmark_fails_clearly_without_a_device():
    """python -m convfast.cuda.bench without a GPU (this machine): exit status 2 and one line saying
    what is missing, for both passes; nothing is run."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is available: the benchmark would run")
    for extra in ([], ["--pass", "backward"]):
        proc = subprocess.run([sys.executable, "-m", "convfast.cuda.bench"] + extra, capture_output=True, text=True,
                              env=subprocess_env(), timeout=300)
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
        assert "convfast.cuda.bench: needs" in proc.stderr and "nothing was run" in proc.stderr, proc.stderr
        assert proc.stdout == "", proc.stdout
