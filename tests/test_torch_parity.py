"""Parity with PyTorch: torch.nn.functional.conv*/conv_transpose* and the torch.nn.Conv* modules.

float64 comparisons are tight (both sides are exact up to summation order); float32 comparisons
allow twice the documented convfast bound, since torch's float32 result carries its own rounding.
"""
import itertools
import math
import zlib

import numpy as np
import pytest

import convfast
from conftest import assert_torch_close, requires_torch

pytestmark = [requires_torch,
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")]

try:
    import torch
    import torch.nn.functional as F
except Exception:  # pragma: no cover
    torch = F = None

CONV = {1: convfast.conv1d, 2: convfast.conv2d, 3: convfast.conv3d}
CONVT = {1: convfast.conv_transpose1d, 2: convfast.conv_transpose2d, 3: convfast.conv_transpose3d}
LAYERS = {1: convfast.Conv1d, 2: convfast.Conv2d, 3: convfast.Conv3d}
LAYERS_T = {1: convfast.ConvTranspose1d, 2: convfast.ConvTranspose2d, 3: convfast.ConvTranspose3d}
TORCH_MODES = ("zeros", "reflect", "replicate", "circular")
TORCH_PAD_MODE = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _seed(obj):
    return zlib.crc32(repr(obj).encode())


def _tf(r):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[r]


def _tft(r):
    return {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[r]


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))




def _explicit_pad(x, pads, mode):
    """torch F.pad of (before, after) pairs given in spatial-axis order (F.pad wants last axis first)."""
    flat = [p for pair in reversed(pads) for p in pair]
    if mode == "zeros":
        return F.pad(x, flat)
    return F.pad(x, flat, mode=TORCH_PAD_MODE[mode])


# ----------------------------------------------------------------------------------------------
# Forward convolution
# ----------------------------------------------------------------------------------------------

def _conv_cases():
    rng = np.random.default_rng(2024)
    cases = []
    for r, dtype, mode in itertools.product((1, 2, 3), ("float32", "float64"), TORCH_MODES):
        for _ in range(4):
            cases.append(dict(r=r, dtype=dtype, mode=mode, groups=int(rng.choice([1, 2, 3])),
                              stride=int(rng.integers(1, 4)), dilation=int(rng.integers(1, 3)),
                              padding=int(rng.integers(0, 3)), seed=int(rng.integers(1 << 30))))
    return cases


@pytest.mark.parametrize("case", _conv_cases(),
                         ids=lambda c: "{r}d-{dtype}-{mode}-g{groups}-s{stride}-d{dilation}-p{padding}".format(**c))
def test_conv_matches_torch_module(case):
    r, dtype, mode, g = case["r"], np.dtype(case["dtype"]), case["mode"], case["groups"]
    rng = np.random.default_rng(case["seed"])
    cin, cout = g * int(rng.integers(1, 4)), g * int(rng.integers(1, 4))
    k = tuple(int(rng.integers(1, 4)) for _ in range(r))
    eff = [(kk - 1) * case["dilation"] + 1 for kk in k]
    sp = tuple(max(e, case["padding"] + 1) + int(rng.integers(0, 5 if r < 3 else 3)) for e in eff)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    m = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[r](
        cin, cout, k, stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=g,
        bias=bool(rng.random() < 0.7), padding_mode=mode, dtype=tdt)
    x = rng.standard_normal((2, cin) + sp).astype(dtype)
    w = m.weight.detach().numpy()
    b = None if m.bias is None else m.bias.detach().numpy()
    with torch.no_grad():
        expected = m(_t(x))
    y = CONV[r](x, w, b, stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=g,
                padding_mode=mode)
    assert_torch_close(y, expected, dtype, (cin // g) * math.prod(k))
    # the convfast layer built around torch's weights agrees as well
    layer = LAYERS[r].from_weights(w, b, stride=case["stride"], padding=case["padding"],
                                   dilation=case["dilation"], groups=g, padding_mode=mode)
    assert_torch_close(layer(x), expected, dtype, (cin // g) * math.prod(k))
    # and channels_last gives the same numbers, transposed
    y_cl = CONV[r](np.moveaxis(x, 1, -1), w, b, stride=case["stride"], padding=case["padding"],
                   dilation=case["dilation"], groups=g, padding_mode=mode, data_format="channels_last")
    assert_torch_close(np.moveaxis(y_cl, -1, 1), expected, dtype, (cin // g) * math.prod(k))


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
def test_conv_functional_per_axis_params(r, dtype, groups):
    rng = np.random.default_rng(_seed((r, str(dtype), groups)))
    cin = 4 if groups != "depthwise" else 6
    g = cin if groups == "depthwise" else groups
    cout = 6 if groups != "depthwise" else 12
    k = (3, 2, 3)[:r]
    stride, dilation, padding = (2, 1, 3)[:r], (1, 2, 1)[:r], (1, 0, 2)[:r]
    x = rng.standard_normal((3, cin) + (9, 8, 7)[:r]).astype(dtype)
    w = rng.standard_normal((cout, cin // g) + k).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    expected = _tf(r)(_t(x), _t(w), _t(b), stride=stride, padding=padding, dilation=dilation, groups=g)
    y = CONV[r](x, w, b, stride, padding, dilation, g)
    assert_torch_close(y, expected, dtype, (cin // g) * math.prod(k))
    # unbatched input, as torch accepts it
    expected1 = _tf(r)(_t(x[0]), _t(w), _t(b), stride=stride, padding=padding, dilation=dilation, groups=g)
    assert_torch_close(CONV[r](x[0], w, b, stride, padding, dilation, g), expected1, dtype,
                       (cin // g) * math.prod(k))


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", TORCH_MODES)
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_same_padding_stride1_matches_torch(r, dtype, mode, dilation, k):
    rng = np.random.default_rng(_seed((r, str(dtype), mode, dilation, k)))
    x = rng.standard_normal((2, 3) + (7, 6, 5)[:r]).astype(dtype)
    w = rng.standard_normal((4, 3) + (k,) * r).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    m = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[r](
        3, 4, k, padding="same", dilation=dilation, padding_mode=mode, dtype=tdt)
    with torch.no_grad():
        m.weight.copy_(_t(w))
        m.bias.copy_(_t(b))
        expected = m(_t(x))
    y = CONV[r](x, w, b, padding="same", dilation=dilation, padding_mode=mode)
    assert y.shape == x.shape[:1] + (4,) + x.shape[2:]
    assert_torch_close(y, expected, dtype, 3 * k ** r)
    if mode == "zeros":
        expected_f = _tf(r)(_t(x), _t(w), _t(b), padding="same", dilation=dilation)
        assert_torch_close(y, expected_f, dtype, 3 * k ** r)
    layer = LAYERS[r].from_weights(w, b, padding="same", dilation=dilation, padding_mode=mode)
    assert_torch_close(layer(x), expected, dtype, 3 * k ** r)


def _same_pads(n, k, s, d, lower):
    out = -(-n // s)                                     # ceil(n / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    small = total // 2
    return (total - small, small) if lower else (small, total - small)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", TORCH_MODES)
@pytest.mark.parametrize("style", ["same", "same_lower"])
def test_strided_same_equals_explicit_pad_then_valid_conv(r, dtype, mode, style):
    rng = np.random.default_rng(_seed((r, str(dtype), mode, style)))
    for stride, dilation, k, sizes in [(2, 1, 3, (10, 9, 8)), (2, 1, 4, (7, 8, 5)), (3, 1, 3, (11, 12, 7)),
                                       (2, 2, 3, (9, 10, 6)), (3, 2, 2, (8, 7, 9)), (4, 1, 1, (9, 6, 5)),
                                       ((2, 3, 1), (1, 2, 1), 3, (12, 11, 10))]:
        st = stride if isinstance(stride, tuple) else (stride,) * 3
        di = dilation if isinstance(dilation, tuple) else (dilation,) * 3
        sp = sizes[:r]
        st, di = st[:r], di[:r]
        x = rng.standard_normal((2, 4) + sp).astype(dtype)
        w = rng.standard_normal((6, 2) + (k,) * r).astype(dtype)
        b = rng.standard_normal(6).astype(dtype)
        pads = [_same_pads(n, k, s, d, style == "same_lower") for n, s, d in zip(sp, st, di)]
        expected = _tf(r)(_explicit_pad(_t(x), pads, mode), _t(w), _t(b), stride=st, dilation=di, groups=2)
        y = CONV[r](x, w, b, stride=st, padding=style, dilation=di, groups=2, padding_mode=mode)
        assert y.shape[2:] == tuple(-(-n // s) for n, s in zip(sp, st))
        assert_torch_close(y, expected, dtype, 2 * k ** r)
        # the same pads passed explicitly as (before, after) pairs
        y2 = CONV[r](x, w, b, stride=st, padding=pads, dilation=di, groups=2, padding_mode=mode)
        np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", TORCH_MODES)
def test_asymmetric_pairs_match_torch_explicit_pad(r, mode):
    rng = np.random.default_rng(_seed((r, mode)))
    pads = ((2, 0), (0, 1), (1, 3))[:r]
    x = rng.standard_normal((2, 3) + (6, 5, 4)[:r])
    w = rng.standard_normal((5, 3) + (3, 2, 2)[:r])
    expected = _tf(r)(_explicit_pad(_t(x), pads, mode), _t(w), stride=2)
    assert_torch_close(CONV[r](x, w, stride=2, padding=pads, padding_mode=mode), expected, np.float64)


# ----------------------------------------------------------------------------------------------
# Transposed convolution
# ----------------------------------------------------------------------------------------------

def _convt_cases():
    rng = np.random.default_rng(77)
    cases = []
    for r, dtype in itertools.product((1, 2, 3), ("float32", "float64")):
        for _ in range(8):
            s, d = int(rng.integers(1, 4)), int(rng.integers(1, 3))
            cases.append(dict(r=r, dtype=dtype, groups=int(rng.choice([1, 2, 3])), stride=s, dilation=d,
                              padding=int(rng.integers(0, 3)), output_padding=int(rng.integers(0, max(s, d))),
                              seed=int(rng.integers(1 << 30))))
    return cases


@pytest.mark.parametrize("case", _convt_cases(),
                         ids=lambda c: "{r}d-{dtype}-g{groups}-s{stride}-d{dilation}-p{padding}-op{output_padding}"
                         .format(**c))
def test_conv_transpose_matches_torch(case):
    r, dtype, g = case["r"], np.dtype(case["dtype"]), case["groups"]
    rng = np.random.default_rng(case["seed"])
    cin, cout = g * int(rng.integers(1, 4)), g * int(rng.integers(1, 4))
    k = tuple(int(rng.integers(1, 4)) for _ in range(r))
    sp = []
    for kk in k:  # smallest input that leaves a non-empty output, plus a few pixels
        n = 1
        while (n - 1) * case["stride"] - 2 * case["padding"] + (kk - 1) * case["dilation"] + 1 < 1:
            n += 1
        sp.append(n + int(rng.integers(0, 4 if r < 3 else 2)))
    sp = tuple(sp)
    x = rng.standard_normal((2, cin) + sp).astype(dtype)
    w = rng.standard_normal((cin, cout // g) + k).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if rng.random() < 0.7 else None
    kw = dict(stride=case["stride"], padding=case["padding"], output_padding=case["output_padding"], groups=g,
              dilation=case["dilation"])
    expected = _tft(r)(_t(x), _t(w), _t(b), **kw)
    y = CONVT[r](x, w, b, **kw)
    assert_torch_close(y, expected, dtype, (cin // g) * math.prod(k))
    # the torch module with the same weights, and the convfast layer
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    m = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[r](
        cin, cout, k, bias=b is not None, dtype=tdt, **kw)
    with torch.no_grad():
        m.weight.copy_(_t(w))
        if b is not None:
            m.bias.copy_(_t(b))
        expected_m = m(_t(x))
    layer = LAYERS_T[r].from_weights(w, b, **kw)
    assert_torch_close(layer(x), expected_m, dtype, (cin // g) * math.prod(k))
    # unbatched
    assert_torch_close(CONVT[r](x[1], w, b, **kw), _tft(r)(_t(x[1]), _t(w), _t(b), **kw), dtype,
                       (cin // g) * math.prod(k))


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_transpose_per_axis_params_match_torch(r, dtype):
    rng = np.random.default_rng(r)
    stride, padding, op, dilation = (2, 3, 1)[:r], (1, 0, 1)[:r], (1, 2, 0)[:r], (1, 1, 2)[:r]
    x = rng.standard_normal((2, 4) + (4, 3, 3)[:r]).astype(dtype)
    w = rng.standard_normal((4, 3) + (3, 2, 3)[:r]).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    kw = dict(stride=stride, padding=padding, output_padding=op, groups=2, dilation=dilation)
    expected = _tft(r)(_t(x), _t(w), _t(b), **kw)
    assert_torch_close(CONVT[r](x, w, b, **kw), expected, dtype, 2 * 18)
    # channels_last
    y_cl = CONVT[r](np.moveaxis(x, 1, -1), w, b, data_format="channels_last", **kw)
    assert_torch_close(np.moveaxis(y_cl, -1, 1), expected, dtype, 2 * 18)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride,padding,dilation,k", [(2, 1, 1, 3), (3, 1, 1, 3), (2, 0, 1, 2), (3, 2, 2, 3),
                                                      (2, 1, 3, 2), (4, 0, 1, 1)])
def test_conv_transpose_output_size_matches_torch_module(r, dtype, stride, padding, dilation, k):
    rng = np.random.default_rng(_seed((r, str(dtype), stride, padding, dilation, k)))
    sp = (4, 3, 3)[:r]
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    m = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[r](
        4, 6, k, stride=stride, padding=padding, dilation=dilation, groups=2, dtype=tdt)
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    x = rng.standard_normal((2, 4) + sp).astype(dtype)
    layer = LAYERS_T[r].from_weights(w, b, stride=stride, padding=padding, dilation=dilation, groups=2)
    smallest = [(n - 1) * stride - 2 * padding + (k - 1) * dilation + 1 for n in sp]
    for extra in range(stride):
        # vary the extra pixel per axis (torch's output_size reaches smallest .. smallest + stride - 1)
        size = tuple(s + (extra + a) % stride for a, s in enumerate(smallest))
        with torch.no_grad():
            expected = m(_t(x), output_size=list(size))
        assert_torch_close(layer(x, output_size=size), expected, dtype, 2 * k ** r)
        assert_torch_close(CONVT[r](x, w, b, stride=stride, padding=padding, dilation=dilation, groups=2,
                                    output_size=size), expected, dtype, 2 * k ** r)
        # the full output shape is accepted too (as torch accepts it)
        full = (2, 6) + size
        assert_torch_close(CONVT[r](x, w, b, stride=stride, padding=padding, dilation=dilation, groups=2,
                                    output_size=full), expected, dtype, 2 * k ** r)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("style", ["same", "same_lower"])
@pytest.mark.parametrize("stride,k,dilation", [(1, 3, 1), (2, 3, 1), (2, 4, 1), (3, 2, 1), (2, 3, 2), (3, 5, 1)])
def test_conv_transpose_same_equals_torch_crop(r, style, stride, k, dilation):
    """'same' transposed = torch's full (uncropped) transposed conv, cropped by the Keras/ONNX split of
    eff - stride (odd pixel after for same, before for same_lower), padded at the end when negative."""
    rng = np.random.default_rng(_seed((r, style, stride, k, dilation)))
    sp = (4, 3, 5)[:r]
    x = rng.standard_normal((2, 3) + sp)
    w = rng.standard_normal((3, 2) + (k,) * r)
    full = _tft(r)(_t(x), _t(w), stride=stride, dilation=dilation).numpy()
    eff = (k - 1) * dilation + 1
    total = eff - stride
    sl = []
    for n in sp:
        if total >= 0:
            small = total // 2
            before = total - small if style == "same_lower" else small
        else:
            before = 0
        sl.append(slice(before, before + n * stride))
    if total < 0:
        full = np.pad(full, ((0, 0), (0, 0)) + ((0, -total),) * r)
    expected = full[(slice(None), slice(None)) + tuple(sl)]
    y = CONVT[r](x, w, stride=stride, padding=style, dilation=dilation)
    assert y.shape == (2, 2) + tuple(n * stride for n in sp)
    assert_torch_close(y, expected, np.float64)


# ----------------------------------------------------------------------------------------------
# Sizes that hit the micro-kernel tile edges and larger reductions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cout", [1, 5, 17, 33])
def test_tile_edge_channels_match_torch(dtype, cout):
    rng = np.random.default_rng(cout)
    x = rng.standard_normal((2, 13, 11, 9)).astype(dtype)
    w = rng.standard_normal((cout, 13, 3, 3)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    assert_torch_close(convfast.conv2d(x, w, b, padding=1, stride=(1, 2)),
                       F.conv2d(_t(x), _t(w), _t(b), padding=1, stride=(1, 2)), dtype, 13 * 9)
    wt = rng.standard_normal((13, cout, 3, 3)).astype(dtype)
    assert_torch_close(convfast.conv_transpose2d(x, wt, b, stride=2, padding=1, output_padding=1),
                       F.conv_transpose2d(_t(x), _t(wt), _t(b), stride=2, padding=1, output_padding=1), dtype,
                       13 * 9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_reduction_matches_torch(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 300, 10, 9)).astype(dtype)
    w = rng.standard_normal((24, 300, 3, 3)).astype(dtype)
    assert_torch_close(convfast.conv2d(x, w, padding=1), F.conv2d(_t(x), _t(w), padding=1), dtype, 2700)
    m = torch.nn.Conv2d(300, 24, 3, padding=1, padding_mode="reflect",
                        dtype=torch.float32 if dtype == np.float32 else torch.float64)
    with torch.no_grad():
        expected = m(_t(x))
    assert_torch_close(convfast.conv2d(x, m.weight.detach().numpy(), m.bias.detach().numpy(), padding=1,
                                       padding_mode="reflect"), expected, dtype, 2700)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv3d_network_block_matches_torch(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 9, 10, 11)).astype(dtype)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    torch.manual_seed(0)
    c1 = torch.nn.Conv3d(2, 8, 3, padding=1, dtype=tdt)
    c2 = torch.nn.Conv3d(8, 8, 3, stride=2, padding=1, groups=4, padding_mode="replicate", dtype=tdt)
    up = torch.nn.ConvTranspose3d(8, 4, 3, stride=2, padding=1, output_padding=1, dtype=tdt)
    with torch.no_grad():
        h = c2(c1(_t(x)))
        expected = up(h)
    f1 = convfast.Conv3d.from_weights(c1.weight.detach().numpy(), c1.bias.detach().numpy(), padding=1)
    f2 = convfast.Conv3d.from_weights(c2.weight.detach().numpy(), c2.bias.detach().numpy(), stride=2, padding=1,
                                      groups=4, padding_mode="replicate")
    fu = convfast.ConvTranspose3d.from_weights(up.weight.detach().numpy(), up.bias.detach().numpy(), stride=2,
                                               padding=1, output_padding=1)
    hf = f2(f1(x))
    assert_torch_close(hf, h, dtype, 2 * 54 * 27)
    assert_torch_close(fu(hf), expected, dtype, 4 * 54 * 27)
