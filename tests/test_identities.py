"""Algebraic identities every convolution must satisfy, checked on convfast alone (no oracle):
adjointness of conv / conv_transpose, linearity, bias, delta kernels, composition, groups,
batching, layouts, dilation as a zero-inserted kernel, stride as subsampling, the transposed conv
as a conv of the zero-upsampled input, and float32 against float64.
"""
import itertools
import math
import zlib

import numpy as np
import pytest

import convfast
from conftest import assert_close, tolerance

CONV = {1: convfast.conv1d, 2: convfast.conv2d, 3: convfast.conv3d}
CONVT = {1: convfast.conv_transpose1d, 2: convfast.conv_transpose2d, 3: convfast.conv_transpose3d}
REF_CONV = {1: convfast.reference.conv1d, 2: convfast.reference.conv2d, 3: convfast.reference.conv3d}
REF_CONVT = {1: convfast.reference.conv_transpose1d, 2: convfast.reference.conv_transpose2d,
             3: convfast.reference.conv_transpose3d}
MODES = ("zeros", "reflect", "replicate", "circular", "symmetric")


def _seed(obj):
    return zlib.crc32(repr(obj).encode())


def _same_pads(n, k, s, d, lower=False):
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    small = total // 2
    return (total - small, small) if lower else (small, total - small)


# ----------------------------------------------------------------------------------------------
# Adjointness: <conv(x, w), y> == <x, conv_transpose(y, w)>
# ----------------------------------------------------------------------------------------------

def _adjoint_cases():
    rng = np.random.default_rng(31337)
    styles = ("int", "per_axis", "pairs", "valid", "same", "same_lower")
    cases = []
    for r, style, groups in itertools.product((1, 2, 3), styles, ("1", "2", "depthwise")):
        for layout in ("channels_first", "channels_last"):
            cases.append(dict(r=r, style=style, groups=groups, layout=layout, stride=int(rng.integers(1, 4)),
                              dilation=int(rng.integers(1, 3)), seed=int(rng.integers(1 << 30))))
    return cases


@pytest.mark.parametrize("case", _adjoint_cases(),
                         ids=lambda c: "{r}d-{style}-g{groups}-{layout}-s{stride}-d{dilation}".format(**c))
def test_adjointness(case):
    r, style = case["r"], case["style"]
    rng = np.random.default_rng(case["seed"])
    if case["groups"] == "1":
        g, cin, cout = 1, int(rng.integers(1, 4)), int(rng.integers(1, 4))
    elif case["groups"] == "2":
        g, cin, cout = 2, 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3))
    else:
        g = cin = int(rng.integers(2, 5))
        cout = cin * int(rng.integers(1, 3))
    # per-axis stride/dilation variation on some axes
    stride = tuple(case["stride"] if rng.random() < 0.7 else 1 for _ in range(r))
    dil = tuple(case["dilation"] if rng.random() < 0.7 else 1 for _ in range(r))
    k = tuple(int(rng.integers(1, 4)) for _ in range(r))
    eff = [(kk - 1) * d + 1 for kk, d in zip(k, dil)]
    sp = tuple(e + int(rng.integers(0, 6 if r < 3 else 4)) for e in eff)
    if style == "int":
        p = int(rng.integers(0, 3))
        padding, pads = p, ((p, p),) * r
    elif style == "per_axis":
        ps = tuple(int(rng.integers(0, 3)) for _ in range(r))
        padding, pads = ps, tuple((p, p) for p in ps)
    elif style == "pairs":
        padding = pads = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(r))
    elif style == "valid":
        padding, pads = "valid", ((0, 0),) * r
    else:
        padding = style
        pads = tuple(_same_pads(n, kk, s, d, style == "same_lower") for n, kk, s, d in zip(sp, k, stride, dil))
    layout = case["layout"]
    n = 2
    xshape = (n, cin) + sp if layout == "channels_first" else (n,) + sp + (cin,)
    x = rng.standard_normal(xshape)
    w = rng.standard_normal((cout, cin // g) + k)
    y = CONV[r](x, w, stride=stride, padding=padding, dilation=dil, groups=g,
                                       data_format=layout)
    v = rng.standard_normal(y.shape)
    # The transposed conv takes the conv's weight (C_out, C_in/g, *k) as (C_in', C_out'/g, *k) with
    # C_in' = C_out: exactly the same array. The explicit pads reproduce the forward padding, and
    # output_size picks the output_padding that brings back x's spatial shape.
    xt = CONVT[r](v, w, stride=stride, padding=pads, dilation=dil, groups=g, output_size=sp, data_format=layout)
    assert xt.shape == x.shape
    lhs = float(np.vdot(y, v))
    rhs = float(np.vdot(x, xt))
    scale = float(np.abs(y).ravel() @ np.abs(v).ravel())
    assert abs(lhs - rhs) <= 1e-12 * max(scale, 1.0), (lhs, rhs)
    # "same" on both sides when the input size is a multiple of the stride (Keras/ONNX convention)
    if style in ("same", "same_lower") and all(nn % s == 0 for nn, s in zip(sp, stride)):
        xt2 = CONVT[r](v, w, stride=stride, padding=style, dilation=dil, groups=g, data_format=layout)
        assert xt2.shape == x.shape
        assert_close(xt2, xt, np.float64)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("style", ["same", "same_lower"])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_same_transposed_is_adjoint_of_same_conv(r, style, stride, k):
    """Input size a multiple of the stride: conv(same) and conv_transpose(same) are exact adjoints,
    including kernels shorter than the stride."""
    rng = np.random.default_rng(_seed((r, style, stride, k)))
    sp = tuple(stride * m for m in (3, 2, 2)[:r])
    x = rng.standard_normal((1, 2) + sp)
    w = rng.standard_normal((3, 2) + (k,) * r)
    y = CONV[r](x, w, stride=stride, padding=style)
    assert y.shape[2:] == tuple(n // stride for n in sp)
    v = rng.standard_normal(y.shape)
    xt = CONVT[r](v, w, stride=stride, padding=style)
    assert xt.shape == x.shape
    lhs, rhs = float(np.vdot(y, v)), float(np.vdot(x, xt))
    assert abs(lhs - rhs) <= 1e-12 * max(float(np.abs(y).ravel() @ np.abs(v).ravel()), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adjointness_larger_shapes(dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 40, 17, 15)).astype(dtype)
    w = rng.standard_normal((36, 20, 3, 3)).astype(dtype)
    y = convfast.conv2d(x, w, stride=2, padding="same", groups=2)
    v = rng.standard_normal(y.shape).astype(dtype)
    xt = convfast.conv_transpose2d(v, w, stride=2, padding=_pads2(x.shape[2:], 3, 2), groups=2,
                                   output_size=x.shape[2:])
    lhs = float(np.vdot(y.astype(np.float64), v.astype(np.float64)))
    rhs = float(np.vdot(x.astype(np.float64), xt.astype(np.float64)))
    scale = float(np.abs(x.astype(np.float64)).ravel() @ np.abs(xt.astype(np.float64)).ravel())
    bound = (1e-12 if dtype == np.float64 else 2e-6 * math.sqrt(180)) * scale
    assert abs(lhs - rhs) <= bound


def _pads2(sp, k, s):
    return tuple(_same_pads(n, k, s, 1) for n in sp)


# ----------------------------------------------------------------------------------------------
# Linearity and bias
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed,mode", [(False, m) for m in MODES] + [(True, "zeros")])
def test_linearity_in_x_and_w(r, transposed, mode):
    rng = np.random.default_rng(_seed((r, transposed, mode)))
    sp = (7, 6, 5)[:r]
    x1, x2 = rng.standard_normal((2, 2, 4) + sp)
    if transposed:
        w1, w2 = rng.standard_normal((2, 4, 3) + (3,) * r)
        kw = dict(stride=2, padding=1, output_padding=1, groups=1)
        f = CONVT[r]
    else:
        w1, w2 = rng.standard_normal((2, 6, 2) + (3,) * r)
        kw = dict(stride=2, padding="same", groups=2, padding_mode=mode)
        f = CONV[r]
    a, b = 1.7, -0.6
    assert_close(f(a * x1 + b * x2, w1, **kw), a * f(x1, w1, **kw) + b * f(x2, w1, **kw), np.float64)
    assert_close(f(x1, a * w1 + b * w2, **kw), a * f(x1, w1, **kw) + b * f(x1, w2, **kw), np.float64)
    assert_close(f(np.zeros_like(x1), w1, **kw), np.zeros_like(f(x1, w1, **kw)), np.float64)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_shifts_every_output(r, transposed, layout, dtype):
    rng = np.random.default_rng(_seed((r, transposed, layout)))
    sp = (6, 5, 4)[:r]
    x = rng.standard_normal((2, 3) + sp if layout == "channels_first" else (2,) + sp + (3,)).astype(dtype)
    if transposed:
        w = rng.standard_normal((3, 5) + (2,) * r).astype(dtype)
        f, kw = CONVT[r], dict(stride=3, padding=1)
    else:
        w = rng.standard_normal((5, 3) + (2,) * r).astype(dtype)
        f, kw = CONV[r], dict(stride=2, padding="same_lower", padding_mode="reflect")
    bias = rng.standard_normal(5).astype(dtype)
    y0 = f(x, w, None, data_format=layout, **kw)
    yb = f(x, w, bias, data_format=layout, **kw)
    shape = (1, 5) + (1,) * r if layout == "channels_first" else (1,) + (1,) * r + (5,)
    assert_close(yb - y0, np.broadcast_to(bias.reshape(shape), y0.shape), dtype, reduction_size=12)
    # with a zero input the output is exactly the bias everywhere
    yz = f(np.zeros_like(x), w, bias, data_format=layout, **kw)
    np.testing.assert_array_equal(yz, np.broadcast_to(bias.reshape(shape), y0.shape))


# ----------------------------------------------------------------------------------------------
# Delta kernels
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_centred_delta_with_same_padding_is_identity(r, dtype, k, layout):
    rng = np.random.default_rng(_seed((r, str(dtype), k, layout)))
    c = 5
    sp = (9, 7, 6)[:r]
    x = rng.standard_normal((2, c) + sp if layout == "channels_first" else (2,) + sp + (c,)).astype(dtype)
    w = np.zeros((c, c) + (k,) * r, dtype)
    for i in range(c):
        w[(i, i) + (k // 2,) * r] = 1
    for mode in MODES:
        np.testing.assert_array_equal(CONV[r](x, w, padding="same", padding_mode=mode, data_format=layout), x)
    # depthwise version
    wd = np.zeros((c, 1) + (k,) * r, dtype)
    wd[(slice(None), 0) + (k // 2,) * r] = 1
    np.testing.assert_array_equal(CONV[r](x, wd, padding="same", groups=c, data_format=layout), x)
    # transposed: a centred delta with padding k//2 is the identity too
    np.testing.assert_array_equal(CONVT[r](x, w, padding=k // 2, data_format=layout), x)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_delta_kernel_reads_the_padded_input(r, mode):
    """Delta at tap t, dilation d, stride s: y[o] = pad(x)[o*s + t*d] where pad is np.pad in the
    same mode, an oracle that shares nothing with convfast."""
    rng = np.random.default_rng(_seed((r, mode)))
    sp = (7, 6, 5)[:r]
    x = rng.standard_normal((2, 3) + sp)
    k, d, s = (3, 2, 3)[:r], (2, 1, 2)[:r], (1, 2, 2)[:r]
    pads = ((2, 3), (1, 4), (4, 0))[:r]
    np_mode = {"zeros": "constant", "replicate": "edge", "circular": "wrap"}.get(mode, mode)
    xp = np.pad(x, ((0, 0), (0, 0)) + pads, mode=np_mode)
    for tap in itertools.product(*(range(kk) for kk in k)):
        w = np.zeros((3, 3) + k)
        for i in range(3):
            w[(i, i) + tap] = 1
        y = CONV[r](x, w, stride=s, dilation=d, padding=pads, padding_mode=mode)
        out = y.shape[2:]
        sel = tuple(slice(t * dd, t * dd + (o - 1) * ss + 1, ss) for t, dd, ss, o in zip(tap, d, s, out))
        np.testing.assert_array_equal(y, xp[(slice(None), slice(None)) + sel])
        assert out == tuple((n + a + b - (kk - 1) * dd - 1) // ss + 1
                            for n, (a, b), kk, dd, ss in zip(sp, pads, k, d, s))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_transposed_delta_kernel_scatters(r):
    """Delta at tap t: y[i*s + t*d - pad_before] = x[i], zero elsewhere."""
    rng = np.random.default_rng(r)
    sp = (4, 3, 3)[:r]
    x = rng.standard_normal((1, 2) + sp)
    k, d, s, pads, op = (3, 2, 2)[:r], (1, 2, 1)[:r], (2, 3, 2)[:r], ((1, 0), (0, 2), (1, 1))[:r], (1, 0, 1)[:r]
    for tap in itertools.product(*(range(kk) for kk in k)):
        w = np.zeros((2, 2) + k)
        w[(0, 0) + tap] = 1
        w[(1, 1) + tap] = 1
        y = CONVT[r](x, w, stride=s, dilation=d, padding=pads, output_padding=op)
        out = tuple((n - 1) * ss - a - b + (kk - 1) * dd + 1 + o
                    for n, ss, (a, b), kk, dd, o in zip(sp, s, pads, k, d, op))
        assert y.shape == (1, 2) + out
        expected = np.zeros_like(y)
        for i in itertools.product(*(range(n) for n in sp)):
            o = tuple(ii * ss + t * dd - p[0] for ii, ss, t, dd, p in zip(i, s, tap, d, pads))
            if all(0 <= oo < nn for oo, nn in zip(o, out)):
                expected[(0, slice(None)) + o] = x[(0, slice(None)) + i]
        np.testing.assert_array_equal(y, expected)


# ----------------------------------------------------------------------------------------------
# Structural identities
# ----------------------------------------------------------------------------------------------

def _full_convolve(a, b):
    """Full N-D convolution (not correlation) of two kernels, with loops."""
    out = np.zeros(tuple(p + q - 1 for p, q in zip(a.shape, b.shape)))
    for i in itertools.product(*(range(n) for n in a.shape)):
        for j in itertools.product(*(range(n) for n in b.shape)):
            out[tuple(p + q for p, q in zip(i, j))] += a[i] * b[j]
    return out


@pytest.mark.parametrize("r", [1, 2, 3])
def test_composition_of_valid_convs(r):
    """corr(corr(x, a), b) == corr(x, a (*) b) for single-channel, stride-1, valid convs."""
    rng = np.random.default_rng(r)
    x = rng.standard_normal((2, 1) + (9, 8, 7)[:r])
    a = rng.standard_normal((3, 2, 2)[:r])
    b = rng.standard_normal((2, 3, 2)[:r])
    two = CONV[r](CONV[r](x, a[None, None]), b[None, None])
    one = CONV[r](x, _full_convolve(a, b)[None, None])
    assert_close(two, one, np.float64, reduction_size=12)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_groups_equal_concatenated_convs(r, transposed):
    rng = np.random.default_rng(_seed((r, transposed)))
    g, cin_g, cout_g = 3, 2, 3
    x = rng.standard_normal((2, g * cin_g) + (6, 5, 4)[:r])
    if transposed:
        w = rng.standard_normal((g * cin_g, cout_g) + (3,) * r)
        f, kw = CONVT[r], dict(stride=2, padding=1, output_padding=1, dilation=1)
        parts = [f(x[:, i * cin_g:(i + 1) * cin_g], w[i * cin_g:(i + 1) * cin_g], **kw) for i in range(g)]
    else:
        w = rng.standard_normal((g * cout_g, cin_g) + (3,) * r)
        f, kw = CONV[r], dict(stride=2, padding="same", dilation=2, padding_mode="symmetric")
        parts = [f(x[:, i * cin_g:(i + 1) * cin_g], w[i * cout_g:(i + 1) * cout_g], **kw) for i in range(g)]
    assert_close(f(x, w, groups=g, **kw), np.concatenate(parts, axis=1), np.float64)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_batch_elements_are_independent(r, transposed):
    rng = np.random.default_rng(_seed((r, transposed, "batch")))
    x = rng.standard_normal((5, 3) + (6, 5, 4)[:r]).astype(np.float32)
    if transposed:
        w = rng.standard_normal((3, 4) + (2,) * r).astype(np.float32)
        f, kw = CONVT[r], dict(stride=2)
    else:
        w = rng.standard_normal((4, 3) + (2,) * r).astype(np.float32)
        f, kw = CONV[r], dict(padding="same", padding_mode="circular")
    y = f(x, w, **kw)
    for i in range(5):
        assert_close(y[i], f(x[i], w, **kw), np.float32, reduction_size=24)
        assert_close(y[i:i + 1], f(x[i:i + 1], w, **kw), np.float32, reduction_size=24)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_is_a_transpose(r, transposed, dtype):
    rng = np.random.default_rng(_seed((r, transposed, str(dtype))))
    x = rng.standard_normal((2, 5) + (7, 6, 5)[:r]).astype(dtype)
    if transposed:
        w = rng.standard_normal((5, 3) + (3,) * r).astype(dtype)
        f, kw = CONVT[r], dict(stride=2, padding="same_lower")
    else:
        w = rng.standard_normal((6, 5) + (3,) * r).astype(dtype)
        f, kw = CONV[r], dict(stride=3, padding="same", dilation=2, padding_mode="replicate")
    y_cf = f(x, w, **kw)
    y_cl = f(np.ascontiguousarray(np.moveaxis(x, 1, -1)), w, data_format="channels_last", **kw)
    assert_close(y_cl, np.moveaxis(y_cf, 1, -1), dtype, reduction_size=5 * 27)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_dilation_equals_zero_inserted_kernel(r, mode):
    rng = np.random.default_rng(_seed((r, mode, "dil")))
    x = rng.standard_normal((2, 2) + (11, 10, 9)[:r])
    w = rng.standard_normal((3, 2) + (3, 2, 3)[:r])
    d = (2, 3, 2)[:r]
    wz = np.zeros(w.shape[:2] + tuple((kk - 1) * dd + 1 for kk, dd in zip(w.shape[2:], d)))
    wz[(slice(None), slice(None)) + tuple(slice(None, None, dd) for dd in d)] = w
    pads = ((2, 1), (3, 0), (1, 2))[:r]
    assert_close(CONV[r](x, w, dilation=d, padding=pads, padding_mode=mode),
                 CONV[r](x, wz, padding=pads, padding_mode=mode), np.float64, reduction_size=36)
    # transposed too
    assert_close(CONVT[r](x, w.swapaxes(0, 1).copy(), dilation=d, stride=2, padding=1),
                 CONVT[r](x, wz.swapaxes(0, 1).copy(), stride=2, padding=1), np.float64, reduction_size=36)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [2, 3])
def test_stride_equals_subsampled_stride_one(r, mode, stride):
    rng = np.random.default_rng(_seed((r, mode, stride)))
    x = rng.standard_normal((2, 3) + (10, 9, 8)[:r])
    w = rng.standard_normal((4, 3) + (3,) * r)
    pads = ((1, 2), (2, 0), (1, 1))[:r]
    full = CONV[r](x, w, padding=pads, padding_mode=mode)
    strided = CONV[r](x, w, stride=stride, padding=pads, padding_mode=mode)
    assert_close(strided, full[(slice(None), slice(None)) + (slice(None, None, stride),) * r], np.float64)
    # strided "same" = stride-1 conv with the SAME pads of the strided conv, subsampled
    pads_same = tuple(_same_pads(n, 3, stride, 1) for n in x.shape[2:])
    full_same = CONV[r](x, w, padding=pads_same, padding_mode=mode)
    assert_close(CONV[r](x, w, stride=stride, padding="same", padding_mode=mode),
                 full_same[(slice(None), slice(None)) + (slice(None, None, stride),) * r], np.float64)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("stride,dilation,padding,output_padding", [
    (1, 1, 0, 0), (2, 1, 1, 1), (3, 1, 0, 2), (2, 2, 2, 1), (3, 2, 1, 0), ((2, 3, 1), (1, 2, 1), 1, (1, 0, 0)),
])
def test_transpose_is_conv_of_upsampled_input(r, stride, dilation, padding, output_padding):
    """conv_transpose(x, w) == conv(zero-upsample(x), flip(w) with in/out swapped, padding d*(k-1) - p,
    extra output_padding after)."""
    rng = np.random.default_rng(_seed((r, stride, dilation, padding, output_padding)))
    st = stride if isinstance(stride, tuple) else (stride,) * 3
    di = dilation if isinstance(dilation, tuple) else (dilation,) * 3
    op = output_padding if isinstance(output_padding, tuple) else (output_padding,) * 3
    st, di, op = st[:r], di[:r], op[:r]
    k = (3, 3, 2)[:r]
    x = rng.standard_normal((2, 4) + (5, 4, 3)[:r])
    w = rng.standard_normal((4, 3) + k)
    y = CONVT[r](x, w, stride=st, dilation=di, padding=padding, output_padding=op)
    up = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], st)))
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in st)] = x
    wf = np.flip(w, axis=tuple(range(2, 2 + r))).swapaxes(0, 1).copy()
    pads = tuple((dd * (kk - 1) - padding, dd * (kk - 1) - padding + o) for dd, kk, o in zip(di, k, op))
    assert all(a >= 0 and b >= 0 for a, b in pads)
    assert_close(y, CONV[r](up, wf, dilation=di, padding=pads), np.float64, reduction_size=36)


# ----------------------------------------------------------------------------------------------
# Precision: float32 against the float64 oracle within the documented bound
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,k,cin,cout,kw", [
    ((31, 29), 3, 16, 20, dict(padding="same")),
    ((40, 36), 5, 32, 17, dict(stride=2, padding="same", padding_mode="reflect")),
    ((17, 13), 3, 300, 5, dict(padding=1, padding_mode="symmetric")),
    ((25,), 7, 64, 33, dict(dilation=3, padding="same_lower")),
    ((9, 8, 7), 3, 12, 10, dict(padding=1, stride=2, padding_mode="circular")),
], ids=["2d-same", "2d-k5-s2-reflect", "2d-cin300", "1d-dilated", "3d-circular"])
@pytest.mark.parametrize("transposed", [False, True])
def test_float32_within_documented_bound(shape, k, cin, cout, kw, transposed):
    r = len(shape)
    rng = np.random.default_rng(_seed((shape, k, cin, transposed)))
    x64 = rng.uniform(-1, 1, (2, cin) + shape)
    if transposed:
        w64 = rng.uniform(-1, 1, (cin, cout) + (k,) * r)
        kw = dict(stride=kw.get("stride", 1), padding=1)
        f, rf = CONVT[r], REF_CONVT[r]
    else:
        w64 = rng.uniform(-1, 1, (cout, cin) + (k,) * r)
        f, rf = CONV[r], REF_CONV[r]
    b64 = rng.uniform(-1, 1, cout)
    x32, w32, b32 = x64.astype(np.float32), w64.astype(np.float32), b64.astype(np.float32)
    y32 = f(x32, w32, b32, **kw)
    assert y32.dtype == np.float32
    # exact result for the float32-rounded operands
    expected = rf(x32.astype(np.float64), w32.astype(np.float64), b32.astype(np.float64), **kw)
    assert_close(y32, expected, np.float32, reduction_size=cin * k ** r)
    # float64 path is tight
    assert_close(f(x64, w64, b64, **kw), rf(x64, w64, b64, **kw), np.float64)
    assert tolerance(np.float64) <= 1e-12
