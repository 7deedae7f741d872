"""The GPU backward passes (convfast.cuda._backward) against the CPU backward passes, which
tests/test_backward.py checks against PyTorch autograd, finite differences and the reference, and
against adjoint identities of convfast.reference; under Numba's CUDA simulator.

Set-up as tests/test_cuda_sim.py: the simulator runs the real kernels as Python, one thread per CUDA
thread, so the shapes are tiny and every grid axis is capped to one block (CONVFAST_CUDA_GRID_CAP,
which also exercises the grid-stride loops); ``NUMBA_ENABLE_CUDASIM=0 python -m pytest
tests/test_cuda_backward.py`` runs the same tests on a GPU. If numba was already imported without
the simulator and there is no GPU, the module runs in a subprocess under the simulator.
"""
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
MODES = ("zeros", "reflect", "replicate", "circular", "symmetric")

gpu = pytest.mark.skipif(not RUNS_HERE, reason="numba was imported without the simulator and there is no GPU: "
                                              "see test_in_subprocess")


@pytest.mark.skipif(RUNS_HERE, reason="runs in this process")
def test_in_subprocess():
    run_module_under_simulator(__file__)


def rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def _is_device(a):
    return getattr(type(a), "__cuda_ndarray__", False)


def _forward(name, x, w, kw):
    fwd = {k: v for k, v in kw.items() if k != "needs"}
    return getattr(convfast, name)(x, w, **fwd)


def check(name, x, w, b=None, gy=None, seed=0, **kw):
    """Device arrays in -> device arrays out, equal to the CPU backward (same dtype, None where the
    CPU gives None). Returns the GPU gradients as host arrays."""
    if gy is None:
        y = _forward(name, x, w, kw)
        gy = rand(np.random.default_rng(seed), y.shape, y.dtype)
    expected = getattr(convfast, f"{name}_backward")(gy, x, w, b, **kw)
    dev = [None if a is None else cuda.to_device(a) for a in (gy, x, w, b)]
    got = getattr(convfast, f"{name}_backward")(*dev, **kw)
    assert isinstance(got, convfast.ConvGrads)
    host = []
    k = gy.size // max(1, gy.shape[0])  # a generous reduction size for the float32 bound
    for label, g, e in zip(got._fields, got, expected):
        if e is None:
            assert g is None, label
            host.append(None)
            continue
        assert _is_device(g), (label, type(g))
        assert g.dtype == e.dtype and tuple(g.shape) == e.shape, (label, g.dtype, e.dtype, g.shape, e.shape)
        h = g.copy_to_host()
        assert_close(h, e, dtype=e.dtype, reduction_size=max(k, x.size))
        host.append(h)
    return host


# ----------------------------------------------------------------------------------------------
# Convolution: padding modes, ranks, geometry
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_padding_modes_every_rank(rank, mode):
    """Asymmetric pads, a stride that drops trailing pixels (output_padding in the adjoint), the
    padding's adjoint (fold kernel) for every mode; grad_weight reads x through the mode."""
    rng = np.random.default_rng(rank * 10 + MODES.index(mode))
    sp = ((7,), (5, 4), (3, 4, 3))[rank - 1]
    x = rand(rng, (2 if rank < 3 else 1, 2) + sp)
    w = rand(rng, (3, 2) + ((3,), (3, 2), (2, 2, 2))[rank - 1])
    pads = ((2, 1), (1, 2), (0, 1))[:rank]
    check(f"conv{rank}d", x, w, rand(rng, 3), padding=pads, padding_mode=mode, stride=(2, 1, 1)[:rank])


@gpu
def test_pads_wider_than_the_input():
    """Circular / symmetric / replicate pads several times the input: every border position folds
    back through the mode's period."""
    rng = np.random.default_rng(1)
    x, w = rand(rng, (1, 2, 3)), rand(rng, (2, 2, 2))
    for mode in ("circular", "symmetric", "replicate"):
        check("conv1d", x, w, padding=((7, 5),), padding_mode=mode, stride=2)
    x2 = rand(rng, (1, 1, 2, 3))
    check("conv2d", x2, rand(rng, (1, 1, 2, 2)), padding=((3, 4), (5, 2)), padding_mode="symmetric")


@gpu
@pytest.mark.parametrize("padding,dtype", [("same", np.float32), ("same_lower", np.float64),
                                           ("valid", np.float32), (((3, 0), (1, 2)), np.float64)])
def test_padding_styles_stride_dilation(padding, dtype):
    rng = np.random.default_rng(2)
    x, w = rand(rng, (1, 2, 7, 6), dtype), rand(rng, (3, 2, 3, 2), dtype)
    check("conv2d", x, w, rand(rng, 3, dtype), padding=padding, stride=(2, 3), dilation=(2, 1),
          padding_mode="reflect" if padding == "same" else "zeros")


@gpu
@pytest.mark.parametrize("groups,cin,cout", [(2, 10, 8),   # 5 x 4 weights per group: the GEMM (narrow tile)
                                             (3, 3, 3),    # depthwise: the reduction kernel
                                             (3, 3, 6),    # depthwise x2 multiplier
                                             (2, 8, 4)])   # 4 x 2 per group (ResNeXt-like)
def test_groups_and_depthwise(groups, cin, cout):
    rng = np.random.default_rng(3 + cin + cout)
    x = rand(rng, (1, cin, 5, 4), np.float32)
    w = rand(rng, (cout, cin // groups, 3, 2), np.float32)
    check("conv2d", x, w, rand(rng, cout, np.float32), groups=groups, padding=1, dilation=(1, 2),
          padding_mode="circular")


@gpu
def test_wide_tile_and_tile_edges():
    """Ca/G and Cb/G >= 32: the 64 x 64 tile, with channels (33, 35) and K (1 x 6 = 6) not
    multiples of it."""
    rng = np.random.default_rng(4)
    x, w = rand(rng, (1, 35, 6), np.float32), rand(rng, (33, 35, 2), np.float32)
    check("conv1d", x, w, rand(rng, 33, np.float32), padding=((1, 0),), padding_mode="replicate")


@gpu
@pytest.mark.parametrize("groups", [1, 4])
def test_channels_last(groups):
    """Channels innermost: the GEMM's channel-fast loads (groups=1: 4 x 6 per group) and the
    reduction kernel (depthwise); the fold kernel writes through the channels-last view."""
    rng = np.random.default_rng(5 + groups)
    x = rand(rng, (2, 4, 5, 4), np.float32)
    w = rand(rng, (6 if groups == 1 else 4, 4 // groups, 2, 3), np.float32)
    check("conv2d", x, w, rand(rng, w.shape[0], np.float32), padding=(1, 1), padding_mode="symmetric",
          stride=(1, 2), groups=groups, data_format="channels_last")


@gpu
def test_unbatched_and_3d_channels_last():
    rng = np.random.default_rng(6)
    check("conv1d", rand(rng, (3, 9)), rand(rng, (2, 3, 4)), padding="same", dilation=2, padding_mode="reflect")
    x = rand(rng, (3, 2, 3, 4))  # unbatched 3-D, channels last
    check("conv3d", x, rand(rng, (2, 4, 2, 1, 2)), padding=1, padding_mode="circular", data_format="channels_last")


@gpu
def test_strided_and_negative_stride_device_views():
    """Non-contiguous device operands are read through their strides."""
    rng = np.random.default_rng(7)
    big = rand(rng, (2, 6, 9, 8))
    w = rand(rng, (2, 3, 2, 2))
    kw = dict(padding=1, padding_mode="reflect")
    x = big[:, ::2, 1::2, ::-1]
    y = convfast.conv2d(x, w, **kw)
    gy_big = rand(rng, (2, 2) + (y.shape[2], 2 * y.shape[3]))
    gy = gy_big[:, :, :, ::-2]
    expected = convfast.conv2d_backward(gy, x, w, **kw)
    got = convfast.conv2d_backward(cuda.to_device(gy_big)[:, :, :, ::-2], cuda.to_device(big)[:, ::2, 1::2, ::-1],
                                   w, **kw)
    for g, e in zip(got[:2], expected[:2]):
        assert_close(g.copy_to_host(), e)


# ----------------------------------------------------------------------------------------------
# Transposed convolution
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_transposed_every_rank(rank):
    rng = np.random.default_rng(10 + rank)
    sp = ((5,), (4, 3), (2, 3, 2))[rank - 1]
    x = rand(rng, (2, 4) + sp, np.float32)
    w = rand(rng, (4, 3) + ((3,), (3, 2), (2, 2, 3))[rank - 1], np.float32)
    check(f"conv_transpose{rank}d", x, w, rand(rng, 6, np.float32), stride=(2, 3, 2)[:rank],
          padding=(1, 0, 2)[:rank], output_padding=(1, 2, 0)[:rank], groups=2, dilation=(1, 1, 2)[:rank])


@gpu
@pytest.mark.parametrize("kw", [dict(padding="same", stride=2),
                                dict(padding=((2, 0), (0, 3)), stride=(3, 2), output_size=(11, 4)),
                                dict(stride=(3, 2), padding=((0, 1), (1, 0)), output_padding=(2, 1))])
def test_transposed_padding_output_size(kw):
    """"same", output_size, and output_padding larger than the pad after (grad_output's last
    pixels lie beyond the full output and are cropped)."""
    rng = np.random.default_rng(12)
    x, w = rand(rng, (1, 3, 4, 3)), rand(rng, (3, 2, 2, 2))
    check("conv_transpose2d", x, w, rand(rng, 2), **kw)


@gpu
def test_transposed_channels_last_unbatched_depthwise():
    rng = np.random.default_rng(13)
    x, w = rand(rng, (2, 3, 2, 3), np.float32), rand(rng, (3, 4, 2, 2), np.float32)
    check("conv_transpose2d", np.moveaxis(x, 1, -1).copy(), w, stride=2, data_format="channels_last")
    check("conv_transpose1d", rand(rng, (3, 4)), rand(rng, (3, 2, 3)), stride=2, padding=1, output_padding=1)
    check("conv_transpose2d", rand(rng, (1, 4, 3, 3)), rand(rng, (4, 1, 3, 3)), rand(rng, 4), stride=2,
          padding=1, groups=4)


@gpu
def test_degenerate_geometries():
    """Outputs that read only padding / only the output_padding: zero gradients, as on the CPU."""
    x, w = np.arange(2.0).reshape(1, 1, 2), np.ones((1, 1, 1))
    gx, gw, _ = check("conv1d", x, w, gy=np.ones((1, 1, 1)), padding=((6, 0),), stride=10)
    assert not gx.any() and not gw.any()
    gx, gw, gb = check("conv_transpose1d", np.ones((1, 1, 1)), w, np.zeros(1), gy=np.ones((1, 1, 1)), stride=2,
                       padding=((1, 0),), output_padding=1)
    assert not gx.any() and not gw.any() and gb[0] == 1


# ----------------------------------------------------------------------------------------------
# needs, dtypes, empty sizes
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_needs_masks(transposed):
    rng = np.random.default_rng(20)
    name = "conv_transpose1d" if transposed else "conv1d"
    x, w, b = rand(rng, (2, 2, 5)), rand(rng, (2, 2, 3)), rand(rng, 2)
    kw = dict(stride=2, padding=1) if transposed else dict(stride=2, padding=1, padding_mode="reflect")
    for needs in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        got = check(name, x, w, b, needs=needs, **kw)
        assert [g is not None for g in got] == list(needs)
    got = check(name, x, w, **kw)  # default: no bias, no grad_bias
    assert got[2] is None


@gpu
def test_dtypes_and_promotion():
    """float32 stays float32; a float64 operand (grad_output included) makes the gradients float64;
    float16 device inputs are cast on load."""
    rng = np.random.default_rng(21)
    x, w = rand(rng, (1, 2, 5, 4), np.float32), rand(rng, (3, 2, 2, 2), np.float32)
    gy = rand(rng, (1, 3, 4, 3), np.float32)
    got = convfast.conv2d_backward(cuda.to_device(gy), cuda.to_device(x), cuda.to_device(w), padding=0)
    assert got.grad_input.dtype == np.float32 and got.grad_weight.dtype == np.float32
    got = check("conv2d", x, w, gy=rand(rng, (1, 3, 6, 3)), padding=1, padding_mode="replicate", stride=(1, 2))
    assert got[0].dtype == np.float64
    got = convfast.conv2d_backward(cuda.to_device(gy.astype(np.float16)), cuda.to_device(x.astype(np.float16)),
                                   w, padding=0)
    assert got.grad_weight.dtype == np.float32
    expected = convfast.conv2d_backward(gy.astype(np.float16), x.astype(np.float16), w, padding=0)
    assert_close(got.grad_weight.copy_to_host(), expected.grad_weight, dtype=np.float32, reduction_size=12)
    assert_close(got.grad_input.copy_to_host(), expected.grad_input, dtype=np.float32, reduction_size=12)


@gpu
def test_empty_batch():
    x, w = np.ones((0, 2, 5)), np.ones((3, 2, 3))
    gx, gw, gb = check("conv1d", x, w, np.zeros(3), gy=np.ones((0, 3, 5)), padding=1, padding_mode="circular")
    assert gx.shape == (0, 2, 5) and not gw.any() and not gb.any()
    x, w = np.ones((0, 3, 4)), np.ones((3, 2, 3))
    gx, gw, gb = check("conv_transpose1d", x, w, np.zeros(2), gy=np.ones((0, 2, 9)), stride=2)
    assert gx.shape == (0, 3, 4) and not gw.any() and not gb.any()


# ----------------------------------------------------------------------------------------------
# Determinism: split-K and the launch grid
# ----------------------------------------------------------------------------------------------

def _grads(name, args, kw):
    dev = [cuda.to_device(a) for a in args]
    return [g.copy_to_host() for g in getattr(convfast, f"{name}_backward")(*dev, **kw)]


@gpu
def test_split_k_and_grid_independence(monkeypatch):
    """Several K chunks per reduction (the minimum chunk lowered so that tiny problems split) summed
    in a fixed order: the results equal the CPU's, and are bitwise identical whether every grid
    axis runs one block (grid-stride loops) or as many as the problem asks for."""
    from convfast.cuda import _backward
    monkeypatch.setattr(_backward, "_MIN_CHUNK", {"gemm": 16, "small": 16, "bias": 16})
    monkeypatch.setattr(_backward, "_TARGET_BLOCKS", 32)  # 2-3 chunks here (the simulator is slow)
    splits = []
    split = _backward._split
    monkeypatch.setattr(_backward, "_split", lambda *args: splits.append(split(*args)) or splits[-1])
    rng = np.random.default_rng(30)
    # (the GEMM's chunks are whole K tiles of 64 rows: its reductions here are 2 x 13 x 11 and 2 x 80 long)
    cases = [("conv2d", (2, 6, 12, 10), (5, 6, 2, 2), dict(groups=1, padding=1, padding_mode="reflect")),  # GEMM
             ("conv2d", (2, 3, 6, 5), (3, 1, 2, 2), dict(groups=3, padding=((2, 0), (1, 1)),               # small
                                                         padding_mode="symmetric")),
             ("conv_transpose1d", (2, 5, 80), (5, 4, 3), dict(stride=2, padding=1))]                        # GEMM
    for name, xs, ws, kw in cases:
        x, w = rand(rng, xs, np.float32), rand(rng, ws, np.float32)
        b = rand(rng, ws[0] if name.startswith("conv2") else ws[1], np.float32)
        gy = rand(rng, _forward(name, x, w, kw).shape, np.float32)
        kw = dict(kw, needs=(True, True, True))
        capped = check(name, x, w, b, gy=gy, **kw)
        monkeypatch.delenv("CONVFAST_CUDA_GRID_CAP")
        uncapped = _grads(name, (gy, x, w, b), kw)
        monkeypatch.setenv("CONVFAST_CUDA_GRID_CAP", "1")
        for c, u in zip(capped, uncapped):
            np.testing.assert_array_equal(c, u)
    # every weight-gradient and bias reduction above ran in more than one chunk
    assert len(splits) == 12 and min(n for n, _ in splits) >= 2, splits


@gpu
def test_split_plan_depends_on_the_shape_only(monkeypatch):
    from convfast.cuda import _backward
    splits, chunk = _backward._split(10 ** 6, 4, "gemm", 16)
    assert splits > 1 and chunk % 16 == 0 and (splits - 1) * chunk < 10 ** 6 <= splits * chunk
    monkeypatch.setenv("CONVFAST_CUDA_GRID_CAP", "3")
    assert _backward._split(10 ** 6, 4, "gemm", 16) == (splits, chunk)
    assert _backward._split(0, 4, "small", 1)[0] == 1


# ----------------------------------------------------------------------------------------------
# Against the reference: adjoint identities
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("seed", range(4))
def test_random_combinations_against_reference(seed):
    """Seeded random mixes of every parameter family. A convolution is linear in x and in w, so
    <grad_input, v> = <ref(v, w), gy> and <grad_weight, u> = <ref(x, u), gy> exactly (up to
    rounding), with convfast.reference as the forward; plus equality with the CPU backward."""
    rng = np.random.default_rng(200 + seed)
    rank = 1 + seed % 3
    transposed = seed % 2 == 1
    groups = int(rng.choice([1, 2]))
    cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 4))
    k = tuple(int(v) for v in rng.integers(1, 4 if rank < 3 else 3, rank))
    kw = dict(stride=tuple(int(v) for v in rng.integers(1, 3, rank)),
              dilation=tuple(int(v) for v in rng.integers(1, 3, rank)), groups=groups,
              padding=tuple((int(a), int(b)) for a, b in rng.integers(0, 3, (rank, 2))))
    cl = bool(rng.integers(0, 2))
    kw["data_format"] = "channels_last" if cl else "channels_first"
    sp = tuple(int(v) for v in rng.integers(3, 6 if rank < 3 else 4, rank))
    shape = (2,) + (sp + (cin,) if cl else (cin,) + sp)
    x = rand(rng, shape)
    if transposed:
        w = rand(rng, (cin, cout // groups) + k)
        name = f"conv_transpose{rank}d"
    else:
        w = rand(rng, (cout, cin // groups) + k)
        kw["padding_mode"] = MODES[seed % 5]
        kw["padding"] = tuple((min(a, n - 1), min(b, n - 1)) for (a, b), n in zip(kw["padding"], sp))
        name = f"conv{rank}d"
    try:
        getattr(R, name)(x, w, **kw)
    except ValueError:  # e.g. a transposed padding that crops the whole output
        kw["padding"] = 0
    ref = getattr(R, name)
    gy = rand(rng, ref(x, w, **kw).shape)
    gx, gw, _ = check(name, x, w, gy=gy, **kw)
    v, u = rand(rng, x.shape), rand(rng, w.shape)
    np.testing.assert_allclose(np.vdot(gx, v), np.vdot(ref(v, w, **kw), gy), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.vdot(gw, u), np.vdot(ref(x, u, **kw), gy), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Where a call runs
# ----------------------------------------------------------------------------------------------

@gpu
def test_device_cuda_host_in_host_out():
    rng = np.random.default_rng(40)
    x, w, b = rand(rng, (2, 3, 5, 4), np.float32), rand(rng, (4, 3, 2, 2), np.float32), rand(rng, 4, np.float32)
    kw = dict(padding=1, padding_mode="circular", stride=2)
    gy = rand(rng, convfast.conv2d(x, w, b, **kw).shape, np.float32)
    expected = convfast.conv2d_backward(gy, x, w, b, **kw)
    got = convfast.conv2d_backward(gy, x, w, b, device="cuda", **kw)
    for g, e in zip(got, expected):
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        assert_close(g, e, dtype=np.float32, reduction_size=gy.size)
    # unbatched transposed, lists for the weight; mixed host weight with a device x
    xt, wt = rand(rng, (3, 4)), rand(rng, (3, 2, 3))
    gyt = rand(rng, (2, 9))
    got = convfast.conv_transpose1d_backward(gyt, xt, wt.tolist(), stride=2, device="CUDA")
    expected = convfast.conv_transpose1d_backward(gyt, xt, wt, stride=2)
    for g, e in zip(got[:2], expected[:2]):
        assert isinstance(g, np.ndarray)
        assert_close(g, e)
    got = convfast.conv_transpose1d_backward(cuda.to_device(gyt), cuda.to_device(xt), wt, stride=2)
    assert _is_device(got.grad_input) and _is_device(got.grad_weight)
    assert_close(got.grad_weight.copy_to_host(), expected.grad_weight)


@gpu
def test_torch_cpu_tensors_with_device_cuda():
    """A torch CPU x with device="cuda": computed on the GPU, tensors come back (x's kind)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(41)
    x, w = rand(rng, (1, 2, 5)), rand(rng, (3, 2, 2))
    gy = rand(rng, (1, 3, 4))
    got = convfast.conv1d_backward(torch.from_numpy(gy), torch.from_numpy(x), torch.from_numpy(w), device="cuda")
    expected = convfast.conv1d_backward(gy, x, w)
    for g, e in zip(got[:2], expected[:2]):
        assert isinstance(g, torch.Tensor)
        assert_close(g.numpy(), e)


@gpu
def test_dispatch_errors():
    xd = cuda.to_device(np.zeros((1, 2, 5)))
    w = np.ones((3, 2, 2))
    gy = np.ones((1, 3, 4))
    with pytest.raises(ValueError, match="conv1d_backward: x is a GPU array .* device='cpu'"):
        convfast.conv1d_backward(gy, xd, w, device="cpu")
    with pytest.raises(ValueError, match="conv1d_backward: grad_output is a GPU array"):
        convfast.conv1d_backward(cuda.to_device(gy), np.zeros((1, 2, 5)), w)
    with pytest.raises(ValueError, match="conv_transpose1d_backward: weight is a GPU array"):
        convfast.conv_transpose1d_backward(np.ones((1, 3, 6)), np.zeros((1, 2, 5)), cuda.to_device(np.ones((2, 3, 2))))
    with pytest.raises(ValueError, match="conv1d_backward: device must be None, 'cpu' or 'cuda'"):
        convfast.conv1d_backward(gy, xd, w, device="gpu")
    # the spec's validation, unchanged on the GPU path
    with pytest.raises(ValueError, match="conv1d_backward: grad_output has shape"):
        convfast.conv1d_backward(cuda.to_device(np.ones((1, 3, 5))), xd, w)
    with pytest.raises(ValueError, match="conv1d_backward: x has 2 channels"):
        convfast.conv1d_backward(gy, xd, np.ones((3, 3, 2)))
    with pytest.raises(ValueError, match="conv1d_backward: needs must have three entries"):
        convfast.conv1d_backward(gy, xd, w, needs=(True, True))


def test_import_convfast_does_not_import_numba():
    code = textwrap.dedent("""
        import sys, numpy as np, convfast
        y = convfast.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))
        convfast.conv2d_backward(np.ones_like(y), np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)), device="cpu")
        convfast.conv_transpose1d_backward(np.ones((1, 1, 5)), np.ones((1, 1, 4)), np.ones((1, 1, 2)))
        bad = [m for m in sys.modules if m == "numba" or m.startswith("numba.")]
        assert not bad, bad
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
