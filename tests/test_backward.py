"""Backward passes: convfast.conv*_backward / conv_transpose*_backward against PyTorch autograd, against
finite differences and the NumPy reference (for what PyTorch cannot express: symmetric padding,
strided "same", same_lower, pads wider than the input), and the adjoint of padding against np.pad.

A convolution is linear in x and in the weight, so a difference quotient of the reference along a
random direction v, ``<ref(x + v) - ref(x), gy>``, equals ``<grad_input, v>`` up to rounding: the
finite-difference checks below are exact identities, checked to 1e-10 in float64.
"""
import itertools
import math
import zlib

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import convfast
from convfast import backward as bw_module
from convfast._spec import conv_spec, conv_transpose_spec
from conftest import assert_torch_close, requires_torch

try:
    import torch
    import torch.nn.functional as F
except Exception:  # pragma: no cover
    torch = F = None

CONV = {r: getattr(convfast, f"conv{r}d") for r in (1, 2, 3)}
CONVT = {r: getattr(convfast, f"conv_transpose{r}d") for r in (1, 2, 3)}
BACK = {r: getattr(convfast, f"conv{r}d_backward") for r in (1, 2, 3)}
BACKT = {r: getattr(convfast, f"conv_transpose{r}d_backward") for r in (1, 2, 3)}
REF = {r: getattr(convfast.reference, f"conv{r}d") for r in (1, 2, 3)}
REFT = {r: getattr(convfast.reference, f"conv_transpose{r}d") for r in (1, 2, 3)}
MODES = ("zeros", "reflect", "replicate", "circular", "symmetric")
TORCH_MODES = ("zeros", "reflect", "replicate", "circular")


def _seed(obj):
    return zlib.crc32(repr(obj).encode())


def _close(actual, expected, dtype, reduction_size):
    assert_torch_close(actual, expected, dtype, reduction_size)


def _t(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a)).clone()
    return t.requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# PyTorch oracles (autograd through explicit padding / cropping, so any pads can be expressed)
# ----------------------------------------------------------------------------------------------

def _torch_conv_grads(r, x, w, b, stride, pads, dilation, groups, mode, gy):
    tx, tw = _t(x, True), _t(w, True)
    tb = None if b is None else _t(b, True)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last axis first
    xp = F.pad(tx, flat) if mode == "zeros" else F.pad(tx, flat, mode=mode)
    y = getattr(F, f"conv{r}d")(xp, tw, tb, stride=stride, dilation=dilation, groups=groups)
    y.backward(_t(gy))
    return tx.grad, tw.grad, None if tb is None else tb.grad, y.detach()


def _torch_conv_transpose_grads(r, x, w, b, stride, pads, out_spatial, dilation, groups, gy):
    tx, tw = _t(x, True), _t(w, True)
    tb = None if b is None else _t(b, True)
    full = getattr(F, f"conv_transpose{r}d")(tx, tw, None, stride=stride, groups=groups, dilation=dilation)
    # crop p_before, keep out_spatial pixels (zeros beyond the full output: the output_padding)
    extend = [max(0, p[0] + o - n) for p, o, n in zip(pads, out_spatial, full.shape[2:])]
    full = F.pad(full, [v for e in reversed(extend) for v in (0, e)])
    y = full[(slice(None), slice(None)) + tuple(slice(p[0], p[0] + o) for p, o in zip(pads, out_spatial))]
    if tb is not None:
        y = y + tb.reshape((1, -1) + (1,) * r)
    y.backward(_t(gy))
    return tx.grad, tw.grad, None if tb is None else tb.grad, y.detach()


# ----------------------------------------------------------------------------------------------
# Convolution against PyTorch autograd
# ----------------------------------------------------------------------------------------------

def _conv_cases():
    """A pairwise-style sweep: every (rank, mode, padding style, group kind) combination, with the
    remaining parameters (stride, dilation, dtype, layout, batching, bias) drawn at random."""
    rng = np.random.default_rng(7)
    cases = []
    for r, mode, style, groups in itertools.product((1, 2, 3), TORCH_MODES,
                                                    ("int", "per_axis", "pairs", "valid", "same", "same_lower"),
                                                    ("1", "2", "depthwise")):
        if (r == 3) and rng.random() < 0.5:  # keep 3-D to half the combinations (runtime)
            continue
        cases.append(dict(r=r, mode=mode, style=style, groups=groups, stride=int(rng.integers(1, 4)),
                          dilation=int(rng.integers(1, 3)), dtype=str(rng.choice(["float32", "float64"])),
                          layout=str(rng.choice(["channels_first", "channels_last"])),
                          batched=bool(rng.random() < 0.8), bias=bool(rng.random() < 0.7),
                          seed=int(rng.integers(1 << 30))))
    return cases


def _padding_arg(style, r, rng, sizes, mode):
    limit = min(sizes) - 1 if mode == "reflect" else 3  # reflect pads must be smaller than the input
    limit = max(0, min(limit, 3))
    if style == "int":
        return int(rng.integers(0, limit + 1))
    if style == "per_axis":
        return tuple(int(rng.integers(0, limit + 1)) for _ in range(r))
    if style == "pairs":
        return tuple((int(rng.integers(0, limit + 1)), int(rng.integers(0, limit + 1))) for _ in range(r))
    return style


@requires_torch
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", _conv_cases(), ids=lambda c: (
    "{r}d-{mode}-{style}-g{groups}-s{stride}-d{dilation}-{dtype}-{layout}".format(**c)))
def test_conv_backward_matches_torch_autograd(case):
    r, mode, dtype = case["r"], case["mode"], np.dtype(case["dtype"])
    rng = np.random.default_rng(case["seed"])
    if case["groups"] == "1":
        g, cin, cout = 1, int(rng.integers(1, 5)), int(rng.integers(1, 5))
    elif case["groups"] == "2":
        g, cin, cout = 2, 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 3))
    else:
        g = cin = int(rng.integers(2, 5))
        cout = cin * int(rng.integers(1, 3))
    k = tuple(int(rng.integers(1, 4)) for _ in range(r))
    sizes = tuple(int(rng.integers(max(3, (kk - 1) * case["dilation"] + 1), 9 if r < 3 else 7)) for kk in k)
    padding = _padding_arg(case["style"], r, rng, sizes, mode)
    stride, dilation = case["stride"], case["dilation"]
    n = int(rng.integers(1, 3))
    x = rng.standard_normal((n, cin) + sizes)
    w = rng.standard_normal((cout, cin // g) + k)
    b = rng.standard_normal(cout) if case["bias"] else None
    spec = conv_spec("t", r, x, w, b, stride, padding, dilation, g, mode, "channels_first")
    if mode == "reflect" and any(max(p) >= s for p, s in zip(spec.pads, sizes)):
        pytest.skip("reflect pads as large as the input")  # rejected by convfast and torch alike
    gy = rng.standard_normal(spec.output_shape())
    if not case["batched"]:
        x, gy, n = x[:1], gy[:1], 1
    tgx, tgw, tgb, _ = _torch_conv_grads(r, x, w, b, (stride,) * r, spec.pads, (dilation,) * r, g, mode, gy)

    # the caller's layout: channels_last and/or unbatched
    cl = case["layout"] == "channels_last"
    to_layout = (lambda a: np.moveaxis(a, 1, -1)) if cl else (lambda a: a)
    xl, gyl, expected_gx = to_layout(x).astype(dtype), to_layout(gy).astype(dtype), to_layout(tgx.numpy())
    if not case["batched"]:
        xl, gyl, expected_gx = xl[0], gyl[0], expected_gx[0]
    gx, gw, gb = BACK[r](gyl, xl, w.astype(dtype), None if b is None else b.astype(dtype), stride, padding, dilation,
                         g, padding_mode=mode, data_format=case["layout"])
    k_in = (cout // g) * math.prod(k)                                  # terms per grad_input element
    k_w = n * math.prod(spec.out_spatial)                              # terms per grad_weight element
    _close(gx, expected_gx, dtype, k_in * 4)
    _close(gw, tgw, dtype, k_w)
    if b is None:
        assert gb is None
    else:
        _close(gb, tgb, dtype, k_w)


# ----------------------------------------------------------------------------------------------
# Transposed convolution against PyTorch autograd
# ----------------------------------------------------------------------------------------------

def _convt_cases():
    rng = np.random.default_rng(11)
    cases = []
    for r, style, groups in itertools.product((1, 2, 3), ("int", "pairs", "valid", "same", "same_lower", "output_size"),
                                              ("1", "2", "depthwise")):
        cases.append(dict(r=r, style=style, groups=groups, stride=int(rng.integers(1, 4)),
                          dilation=int(rng.integers(1, 3)), dtype=str(rng.choice(["float32", "float64"])),
                          layout=str(rng.choice(["channels_first", "channels_last"])),
                          batched=bool(rng.random() < 0.8), bias=bool(rng.random() < 0.7),
                          seed=int(rng.integers(1 << 30))))
    return cases


@requires_torch
@pytest.mark.parametrize("case", _convt_cases(),
                         ids=lambda c: "{r}d-{style}-g{groups}-s{stride}-d{dilation}-{dtype}-{layout}".format(**c))
def test_conv_transpose_backward_matches_torch_autograd(case):
    r, dtype, style = case["r"], np.dtype(case["dtype"]), case["style"]
    rng = np.random.default_rng(case["seed"])
    if case["groups"] == "1":
        g, cin, cout = 1, int(rng.integers(1, 5)), int(rng.integers(1, 5))
    elif case["groups"] == "2":
        g, cin, cout = 2, 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 4))
    else:
        g = cin = int(rng.integers(2, 5))
        cout = cin * int(rng.integers(1, 3))
    stride, dilation = case["stride"], case["dilation"]
    k = tuple(int(rng.integers(1, 4)) for _ in range(r))
    sizes = tuple(int(rng.integers(1, 6 if r < 3 else 4)) for _ in range(r))
    output_padding, output_size = 0, None
    if style == "int":
        padding = int(rng.integers(0, 3))
        output_padding = int(rng.integers(0, max(stride, dilation)))
    elif style == "pairs":
        padding = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(r))
        output_padding = tuple(int(rng.integers(0, max(stride, dilation))) for _ in range(r))
    elif style == "output_size":
        padding = 1
        output_size = None  # chosen below from the reachable range
    else:
        padding = style
    n = int(rng.integers(1, 3))
    x = rng.standard_normal((n, cin) + sizes)
    w = rng.standard_normal((cin, cout // g) + k)
    b = rng.standard_normal(cout) if case["bias"] else None
    if style == "output_size":
        smallest = [(s_ - 1) * stride - 2 + (kk - 1) * dilation + 1 for s_, kk in zip(sizes, k)]
        output_size = tuple(max(1, v) + int(rng.integers(0, max(stride, dilation))) for v in smallest)
        if min(smallest) < 1:
            pytest.skip("padding crops the whole output")
    try:
        spec = conv_transpose_spec("t", r, x, w, b, stride, padding, output_padding, g, dilation, output_size,
                                   "channels_first")
    except ValueError:
        pytest.skip("padding crops more than the full output")
    gy = rng.standard_normal(spec.output_shape())
    cl = case["layout"] == "channels_last"
    to_layout = (lambda a: np.moveaxis(a, 1, -1)) if cl else (lambda a: a)
    if case["batched"]:
        xs, gys = x, gy
    else:
        xs, gys = x[:1], gy[:1]
    tgx, tgw, tgb, _ = _torch_conv_transpose_grads(r, xs, w, b, (stride,) * r, spec.pads, spec.out_spatial,
                                                   (dilation,) * r, g, gys)
    xl, gyl = to_layout(xs).astype(dtype), to_layout(gys).astype(dtype)
    expected_gx = tgx.numpy()
    if cl:
        expected_gx = np.moveaxis(expected_gx, 1, -1)
    if not case["batched"]:
        xl, gyl, expected_gx = xl[0], gyl[0], expected_gx[0]
    gx, gw, gb = BACKT[r](gyl, xl, w.astype(dtype), None if b is None else b.astype(dtype), stride, padding,
                          output_padding, g, dilation, output_size=output_size, data_format=case["layout"])
    k_in = (cout // g) * math.prod(k)
    k_w = xs.shape[0] * math.prod(sizes)
    _close(gx, expected_gx, dtype, k_in)
    _close(gw, tgw, dtype, k_w * 4)
    if b is None:
        assert gb is None
    else:
        _close(gb, tgb, dtype, xs.shape[0] * math.prod(spec.out_spatial))


@requires_torch
@pytest.mark.parametrize("r", [1, 2, 3])
def test_torch_convolution_backward_same_output_mask(r):
    """PyTorch's own entry point (torch.ops.aten.convolution_backward), symmetric padding."""
    rng = np.random.default_rng(r)
    x = rng.standard_normal((2, 6) + (7,) * r).astype(np.float32)
    w = rng.standard_normal((4, 3) + (3,) * r).astype(np.float32)
    y = CONV[r](x, w, None, 2, 1, 1, 2)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    for mask in itertools.product((True, False), repeat=3):
        tgx, tgw, tgb = torch.ops.aten.convolution_backward(_t(gy), _t(x), _t(w), [4], [2] * r, [1] * r, [1] * r,
                                                            False, [0] * r, 2, list(mask))
        gx, gw, gb = BACK[r](gy, x, w, None, 2, 1, 1, 2, needs=mask)
        for ours, theirs, flag, size in ((gx, tgx, mask[0], 2 * 27), (gw, tgw, mask[1], 2 * 4 ** r),
                                         (gb, tgb, mask[2], 2 * 4 ** r)):
            if flag:
                _close(ours, theirs, np.float32, size)
            else:
                assert ours is None


# ----------------------------------------------------------------------------------------------
# Finite differences and the NumPy reference: every padding mode and form
# ----------------------------------------------------------------------------------------------

def _directional_errors(f, x, w, b, gy, gx, gw, gb, rng):
    """|<f(x + v) - f(x), gy> - <gx, v>| / scale for random directions of x, w and b (exact for a
    bilinear f), and the adjoint identity <f(x) - b, gy> = <x, gx> = <w, gw>."""
    base = f(x, w, b)
    errors = []
    scale = float(np.abs(gy).sum() * max(1.0, np.abs(base).max()))
    for _ in range(2):
        v = rng.standard_normal(x.shape)
        errors.append(abs(np.vdot(f(x + v, w, b) - base, gy) - np.vdot(gx, v)) / scale)
        vw = rng.standard_normal(w.shape)
        errors.append(abs(np.vdot(f(x, w + vw, b) - base, gy) - np.vdot(gw, vw)) / scale)
    if b is not None:
        vb = rng.standard_normal(b.shape)
        errors.append(abs(np.vdot(f(x, w, b + vb) - base, gy) - np.vdot(gb, vb)) / scale)
    unbiased = f(x, w, None)
    errors.append(abs(np.vdot(unbiased, gy) - np.vdot(x, gx)) / scale)
    errors.append(abs(np.vdot(unbiased, gy) - np.vdot(w, gw)) / scale)
    return max(errors)


@st.composite
def conv_problems(draw):
    r = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(MODES))
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(r))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(r))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(r))
    sizes = tuple(draw(st.integers(max(1, (kk - 1) * d + 1 - 3), 7 if r < 3 else 5)) for kk, d in zip(k, dilation))
    style = draw(st.sampled_from(["same", "same_lower", "pairs", "wide_pairs", "valid"]))
    if style == "pairs":
        padding = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(r))
    elif style == "wide_pairs":  # wider than the input: circular / symmetric fold several periods
        padding = tuple((draw(st.integers(0, 12)), draw(st.integers(0, 12))) for _ in range(r))
    else:
        padding = style
    layout = draw(st.sampled_from(["channels_first", "channels_last"]))
    batched = draw(st.booleans())
    bias = draw(st.booleans())
    return dict(r=r, mode=mode, g=g, cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, sizes=sizes,
                padding=padding, layout=layout, batched=batched, bias=bias)


@given(conv_problems(), st.integers(0, 2 ** 32 - 1))
def test_conv_backward_against_reference_finite_differences(p, seed):
    note(repr(p))
    rng = np.random.default_rng(seed)
    r = p["r"]
    x_cf = rng.standard_normal((2, p["cin"]) + p["sizes"])
    x = np.moveaxis(x_cf, 1, -1) if p["layout"] == "channels_last" else x_cf
    if not p["batched"]:
        x = x[0]
    w = rng.standard_normal((p["cout"], p["cin"] // p["g"]) + p["k"])
    b = rng.standard_normal(p["cout"]) if p["bias"] else None
    kw = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["g"],
              padding_mode=p["mode"], data_format=p["layout"])
    try:
        y = REF[r](x, w, b, **kw)
    except ValueError:  # reflect pads too wide, kernel larger than the padded input
        return
    gy = rng.standard_normal(y.shape)
    gx, gw, gb = BACK[r](gy, x, w, b, **kw)
    assert gx.shape == x.shape and gw.shape == w.shape and (gb is None) == (b is None)

    def f(x_, w_, b_):
        return REF[r](x_, w_, b_, **kw)

    assert _directional_errors(f, x, w, b, gy, gx, gw, gb, rng) < 1e-10


@st.composite
def conv_transpose_problems(draw):
    r = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(r))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(r))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(r))
    sizes = tuple(draw(st.integers(1, 5 if r < 3 else 3)) for _ in range(r))
    style = draw(st.sampled_from(["same", "same_lower", "pairs", "valid"]))
    output_padding = 0
    if style == "pairs":
        padding = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(r))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    else:
        padding = style
    return dict(r=r, g=g, cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, sizes=sizes, padding=padding,
                output_padding=output_padding, layout=draw(st.sampled_from(["channels_first", "channels_last"])),
                bias=draw(st.booleans()))


@given(conv_transpose_problems(), st.integers(0, 2 ** 32 - 1))
def test_conv_transpose_backward_against_reference_finite_differences(p, seed):
    note(repr(p))
    rng = np.random.default_rng(seed)
    r = p["r"]
    x = rng.standard_normal((2, p["cin"]) + p["sizes"])
    if p["layout"] == "channels_last":
        x = np.moveaxis(x, 1, -1)
    w = rng.standard_normal((p["cin"], p["cout"] // p["g"]) + p["k"])
    b = rng.standard_normal(p["cout"]) if p["bias"] else None
    kw = dict(stride=p["stride"], padding=p["padding"], output_padding=p["output_padding"], groups=p["g"],
              dilation=p["dilation"], data_format=p["layout"])
    try:
        y = REFT[r](x, w, b, **kw)
    except ValueError:  # crops more than the full output
        return
    gy = rng.standard_normal(y.shape)
    gx, gw, gb = BACKT[r](gy, x, w, b, **kw)

    def f(x_, w_, b_):
        return REFT[r](x_, w_, b_, **kw)

    assert _directional_errors(f, x, w, b, gy, gx, gw, gb, rng) < 1e-10


@pytest.mark.parametrize("mode, transposed", [(m, False) for m in MODES] + [("zeros", True)])
def test_elementwise_central_differences(mode, transposed):
    """Every element of every gradient against a central difference of the loss <y, gy> (convfast's
    own forward, float64): the textbook finite-difference check, on a tiny problem."""
    rng = np.random.default_rng(_seed((mode, transposed)))
    x = rng.standard_normal((2, 2, 5, 4))
    if transposed:
        w = rng.standard_normal((2, 3, 3, 2))
        kw = dict(stride=(2, 1), padding="same_lower", dilation=(1, 2))
        fwd, back = convfast.conv_transpose2d, convfast.conv_transpose2d_backward
    else:
        w = rng.standard_normal((3, 2, 3, 2))
        kw = dict(stride=(2, 1), padding="same_lower" if mode != "reflect" else ((2, 1), (1, 0)), dilation=(1, 2),
                  padding_mode=mode)
        fwd, back = convfast.conv2d, convfast.conv2d_backward
    b = rng.standard_normal(3)
    gy = rng.standard_normal(fwd(x, w, b, **kw).shape)
    grads = back(gy, x, w, b, **kw)
    eps = 1e-3
    for which, arr in enumerate((x, w, b)):
        numeric = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            args = [x.copy(), w.copy(), b.copy()]
            args[which][idx] += eps
            plus = np.vdot(fwd(*args, **kw), gy)
            args[which][idx] -= 2 * eps
            minus = np.vdot(fwd(*args, **kw), gy)
            numeric[idx] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grads[which], numeric, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# The adjoint of padding
# ----------------------------------------------------------------------------------------------

@given(st.sampled_from(["constant", "reflect", "edge", "wrap", "symmetric", "replicate", "circular", "zeros"]),
       st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_pad_adjoint_is_the_adjoint_of_np_pad(mode, shape, seed, wide):
    rng = np.random.default_rng(seed)
    limit = 14 if wide else 3
    widths = []
    for n in shape:
        cap = n - 1 if mode == "reflect" else limit
        widths.append((int(rng.integers(0, cap + 1)), int(rng.integers(0, cap + 1))))
    x = rng.standard_normal(shape)
    np_mode = {"zeros": "constant", "replicate": "edge", "circular": "wrap"}.get(mode, mode)
    padded = np.pad(x, widths, mode=np_mode)
    g = rng.standard_normal(padded.shape)
    adj = convfast.pad_adjoint(g, widths, mode=mode)
    assert adj.shape == x.shape
    assert abs(np.vdot(padded, g) - np.vdot(x, adj)) <= 1e-12 * np.abs(g).sum() * np.abs(x).max()
    # and element by element: the adjoint of a 0/1 matrix sums the entries copied from each pixel
    basis = np.zeros(shape)
    index = tuple(int(rng.integers(0, n)) for n in shape)
    basis[index] = 1
    np.testing.assert_allclose(adj[index], np.vdot(np.pad(basis, widths, mode=np_mode), g), rtol=1e-12, atol=1e-12)


def test_pad_adjoint_errors():
    with pytest.raises(ValueError, match="pad_adjoint.*mode"):
        convfast.pad_adjoint(np.ones(5), 1, mode="mean")
    with pytest.raises(ValueError, match="pad_adjoint.*too few"):
        convfast.pad_adjoint(np.ones(4), (2, 2))
    with pytest.raises(TypeError, match="pad_adjoint.*mode"):
        convfast.pad_adjoint(np.ones(4), 1, mode=3)


# ----------------------------------------------------------------------------------------------
# dtypes, layouts, the needs mask, edge cases
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_dtypes_and_promotion(r, transposed):
    rng = np.random.default_rng(_seed((r, transposed)))
    x = rng.standard_normal((2, 4) + (5,) * r)
    w = rng.standard_normal((4, 2) + (3,) * r)
    fwd = (CONVT if transposed else CONV)[r]
    back = (BACKT if transposed else BACK)[r]
    gy = rng.standard_normal(fwd(x, w, None, 2, 1, groups=2).shape)
    ref = back(gy, x, w, np.zeros(4), 2, 1, groups=2)
    f32 = back(gy.astype(np.float32), x.astype(np.float32), w.astype(np.float32), np.zeros(4, np.float32), 2, 1,
               groups=2)
    for a, e, size in zip(f32, ref, (2 * 3 ** r, 2 * 3 ** r * 8, 2 * 3 ** r * 8)):
        assert a.dtype == np.float32
        _close(a, e, np.float32, size)
    # any float64 operand (here: the weight only) gives float64 gradients, computed in float64
    mixed = back(gy.astype(np.float32), x.astype(np.float32), w, np.zeros(4, np.float32), 2, 1, groups=2)
    for a, e in zip(mixed, ref):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * np.abs(e).max())
    # integers are computed as float64
    ints = back(np.ones_like(gy, dtype=np.int32), np.ones(x.shape, np.int64), np.ones(w.shape, np.int16), None, 2, 1,
                groups=2)
    assert ints.grad_input.dtype == ints.grad_weight.dtype == np.float64


def test_needs_mask_skips_work(monkeypatch):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    gy = rng.standard_normal((2, 4, 6, 6))
    calls = []
    real = bw_module._weight_grad
    monkeypatch.setattr(bw_module, "_weight_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = convfast.conv2d_backward(gy, x, w, np.zeros(4))
    assert calls and all(g is not None for g in full)
    calls.clear()
    only_x = convfast.conv2d_backward(gy, x, w, np.zeros(4), needs=(True, False, False))
    assert not calls and only_x.grad_weight is None and only_x.grad_bias is None
    np.testing.assert_array_equal(only_x.grad_input, full.grad_input)
    only_b = convfast.conv2d_backward(gy, x, w, needs=[False, False, True])
    np.testing.assert_allclose(only_b.grad_bias, gy.sum(axis=(0, 2, 3)))
    assert convfast.conv2d_backward(gy, x, w).grad_bias is None  # no bias: no grad_bias by default
    assert convfast.conv2d_backward(gy, x, w, needs=(False,) * 3) == (None, None, None)


def test_degenerate_geometries():
    # a convolution whose output reads only zero padding: y does not depend on x
    x = np.arange(2.0).reshape(1, 1, 2)
    w = np.ones((1, 1, 1))
    y = convfast.conv1d(x, w, padding=((6, 0),), stride=10)
    gx, gw, _ = convfast.conv1d_backward(np.ones_like(y), x, w, padding=((6, 0),), stride=10)
    assert y.shape == (1, 1, 1) and not gx.any() and not gw.any()
    # a transposed convolution whose every output pixel lies in the output_padding
    x = np.ones((1, 1, 1))
    y = convfast.conv_transpose1d(x, w, stride=2, padding=((1, 0),), output_padding=1)
    gx, gw, gb = convfast.conv_transpose1d_backward(np.ones_like(y), x, w, np.zeros(1), stride=2, padding=((1, 0),),
                                                    output_padding=1)
    assert y.shape == (1, 1, 1) and not gx.any() and not gw.any() and gb[0] == 1
    # an empty batch
    x = np.ones((0, 2, 5))
    w = np.ones((3, 2, 3))
    gx, gw, gb = convfast.conv1d_backward(np.ones((0, 3, 3)), x, w, np.zeros(3))
    assert gx.shape == (0, 2, 5) and gw.shape == (3, 2, 3) and not gw.any() and not gb.any()


@pytest.mark.parametrize("layout", ["strided", "negative", "fortran"])
def test_operand_memory_layouts(layout):
    rng = np.random.default_rng(_seed(layout))
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    gy = rng.standard_normal((2, 6, 4, 3))
    kw = dict(stride=2, padding="same", groups=2, padding_mode="reflect")
    expected = convfast.conv2d_backward(gy, x, w, np.zeros(6), **kw)

    def view(a):
        if layout == "strided":
            buf = np.zeros([2 * n for n in a.shape])
            v = buf[tuple(slice(0, 2 * n, 2) for n in a.shape)]
            v[...] = a
            return v
        if layout == "negative":
            return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
        return np.asfortranarray(a)

    got = convfast.conv2d_backward(view(gy), view(x), view(w), np.zeros(6), **kw)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-13)


@requires_torch
def test_torch_tensors_come_back_as_tensors():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    gx, gw, gb = convfast.conv2d_backward(gy, x, w, needs=(True, True, True))
    assert all(isinstance(g, torch.Tensor) for g in (gx, gw, gb))


# ----------------------------------------------------------------------------------------------
# Bad input, and inputs never mutated
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, words", [
    (lambda: convfast.conv2d_backward(np.ones((1, 4, 6, 5)), np.ones((1, 3, 7, 7)), np.ones((4, 3, 3, 3))),
     ValueError, ["conv2d_backward", "grad_output", "(1, 4, 6, 5)", "(1, 4, 5, 5)"]),
    (lambda: convfast.conv2d_backward(np.ones((1, 4, 4, 5)), np.ones((1, 3, 7, 7)), np.ones((4, 3, 3, 3)),
                                      stride=2, padding="same"),
     ValueError, ["conv2d_backward", "grad_output", "(1, 4, 4, 4)"]),
    (lambda: convfast.conv_transpose1d_backward(np.ones((1, 2, 3)), np.ones((1, 3, 4)), np.ones((3, 2, 3))),
     ValueError, ["conv_transpose1d_backward", "grad_output", "(1, 2, 6)"]),
    (lambda: convfast.conv1d_backward(np.array(["a"] * 3).reshape(1, 1, 3), np.ones((1, 1, 5)), np.ones((1, 1, 3))),
     TypeError, ["conv1d_backward", "grad_output"]),
    (lambda: convfast.conv1d_backward(np.ones((1, 1, 3)), np.ones((1, 1, 5)), np.ones((1, 1, 3)), needs=(True, 1, 0)),
     TypeError, ["conv1d_backward", "needs"]),
    (lambda: convfast.conv1d_backward(np.ones((1, 1, 3)), np.ones((1, 1, 5)), np.ones((1, 1, 3)), needs=(True,)),
     ValueError, ["conv1d_backward", "needs"]),
    (lambda: convfast.conv1d_backward(np.ones((1, 1, 3)), np.ones((1, 1, 5)), np.ones((1, 1, 3)), needs="all"),
     TypeError, ["conv1d_backward", "needs"]),
    (lambda: convfast.conv3d_backward(np.ones((1, 1, 3, 3, 3)), np.ones((5, 5)), np.ones((1, 1, 3, 3, 3))),
     ValueError, ["conv3d_backward", "x"]),
    (lambda: convfast.conv2d_backward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), stride=0),
     ValueError, ["conv2d_backward", "stride"]),
    (lambda: convfast.conv2d_backward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)),
                                      padding_mode="mirror"),
     ValueError, ["conv2d_backward", "padding_mode"]),
    (lambda: convfast.conv2d_backward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)),
                                      np.ones(2)),
     ValueError, ["conv2d_backward", "bias"]),
    (lambda: convfast.conv_transpose2d_backward(np.ones((1, 1, 9, 9)), np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)),
                                                stride=2, output_size=(20, 20)),
     ValueError, ["conv_transpose2d_backward", "output_size"]),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_inputs_never_mutated_and_read_only_accepted():
    rng = np.random.default_rng(3)
    cases = [
        (convfast.conv2d_backward, (2, 4, 6, 5), (6, 2, 3, 3), (2, 6, 3, 3),
         dict(stride=2, padding="same", groups=2, padding_mode="circular")),
        (convfast.conv2d_backward, (2, 4, 6, 5), (6, 4, 3, 3), (2, 6, 6, 5), dict(padding=1, padding_mode="symmetric")),
        (convfast.conv_transpose2d_backward, (2, 4, 3, 3), (4, 3, 3, 3), (2, 6, 6, 6),
         dict(stride=2, padding="same", groups=2)),
    ]
    for fn, xs, ws, ys, kw in cases:
        x, w, gy, b = (rng.standard_normal(s) for s in (xs, ws, ys, (6,)))
        copies = [a.copy() for a in (x, w, gy, b)]
        for a in (x, w, gy, b):
            a.flags.writeable = False
        grads = fn(gy, x, w, b, **kw)
        for a, c in zip((x, w, gy, b), copies):
            np.testing.assert_array_equal(a, c)
        for g in grads:
            assert g.flags.writeable and g.flags.c_contiguous
            assert not any(np.may_share_memory(g, a) for a in (x, w, gy, b))


# ----------------------------------------------------------------------------------------------
# The compiled weight-gradient kernel (_core.weight_grad): tile edges, K blocks, every padding mode,
# groups, layouts, thread counts
# ----------------------------------------------------------------------------------------------

from convfast._spec import NUMPY_PAD_MODE  # noqa: E402

# (rank, N, C_in, C_out, groups, spatial, kernel, stride, dilation, pads ((before, after) per axis))
# C_out / C_in per group not multiples of MR (6 / 12 / 4) or NR (16 / 8 / 32 / 4), one channel,
# K = N * prod(O) above and not a multiple of the 256-deep K block, 1x1 outputs, and few input
# channels (the swapped orientation with stacked taps).
_WG_CASES = [
    (2, 3, 17, 13, 1, (11, 13), (3, 3), (1, 1), (1, 1), ((1, 2), (0, 1))),
    (2, 2, 5, 7, 1, (9, 10), (3, 2), (2, 1), (1, 2), ((2, 0), (1, 1))),
    (2, 2, 3, 20, 1, (17, 15), (7, 5), (2, 2), (1, 1), ((3, 3), (2, 1))),       # stem-like: taps stacked
    (2, 2, 1, 19, 1, (8, 9), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),         # one input channel
    (2, 2, 20, 1, 1, (8, 9), (3, 3), (1, 1), (2, 1), ((2, 2), (0, 1))),         # one output channel
    (2, 3, 12, 18, 3, (7, 6), (2, 3), (1, 2), (1, 1), ((0, 1), (1, 1))),        # Ca_g 4 != Cb_g 6
    (2, 2, 34, 10, 2, (6, 7), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),        # Ca_g 17 != Cb_g 5
    (2, 1, 9, 8, 1, (3, 3), (3, 3), (1, 1), (1, 1), ((0, 0), (0, 0))),          # 1x1 output
    (1, 3, 18, 23, 1, (300,), (5,), (1,), (2,), ((3, 4),)),                     # K = 3 * 296: 4 blocks
    (1, 2, 33, 7, 1, (50,), (9,), (3,), (1,), ((4, 4),)),
    (3, 2, 7, 9, 1, (6, 5, 7), (3, 2, 3), (2, 1, 1), (1, 2, 1), ((1, 1), (0, 1), (1, 0))),
    (3, 1, 2, 24, 2, (5, 6, 5), (2, 3, 3), (1, 1, 2), (1, 1, 1), ((1, 0), (1, 1), (1, 1))),
    (2, 3, 40, 14, 1, (9, 11), (1, 1), (2, 3), (1, 1), ((1, 2), (2, 1))),      # 1x1: a read in place
    (1, 2, 21, 30, 3, (200,), (1,), (1,), (1,), ((0, 0),)),                   # 1x1, K = 400
    (2, 2, 20, 9, 1, (8, 11), (2, 2), (2, 3), (1, 1), ((0, 1), (1, 0))),       # disjoint taps: a in place
    (3, 2, 24, 13, 1, (6, 4, 6), (2, 1, 2), (2, 1, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 0))),
    (2, 2, 200, 20, 1, (9, 10), (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0))),      # 25 / 13 a tiles: uneven blocks
    # 16 input channels per group: two taps stacked in 32 lanes (float32 AVX-512), side by side in a's
    # channels-last view (one group), or not (two groups, dilation along the row)
    (2, 2, 16, 20, 1, (10, 12), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    (2, 2, 32, 24, 2, (9, 11), (3, 3), (1, 1), (1, 2), ((1, 1), (2, 2))),
    # contiguous images packed as one run each, K = 3 x 930 over two 2048-deep packing chunks
    (2, 3, 5, 40, 1, (30, 31), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    # a read in place with two blocks of b tiles (float64: 25 tiles of 6 rows; float32: 50)
    (2, 2, 12, 150, 1, (9, 10), (1, 1), (2, 2), (1, 1), ((0, 0), (1, 1))),
    (2, 2, 10, 300, 1, (8, 8), (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0))),
    # depthwise and channel multipliers (Ca_g = 1, Cb_g <= 4): the streaming path; rows longer than
    # its 8 lanes, strides (the scalar loop), dilation, edges in every padding mode
    (2, 2, 6, 6, 6, (9, 27), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    (2, 2, 4, 8, 4, (10, 21), (3, 3), (2, 2), (1, 2), ((1, 0), (2, 2))),
    (1, 3, 5, 5, 5, (40,), (5,), (1,), (3,), ((6, 6),)),
    (3, 2, 3, 9, 3, (5, 6, 19), (3, 3, 3), (1, 1, 1), (1, 1, 2), ((1, 1), (1, 1), (2, 2))),
    (2, 1, 4, 16, 4, (6, 13), (2, 3), (1, 3), (1, 1), ((0, 1), (2, 1))),
]
_DEPTHWISE_WG = list(range(len(_WG_CASES) - 5, len(_WG_CASES)))


def _torch_weight_grad_padded(r, x, w, gy, stride, dilation, groups, pads, mode):
    """grad_weight by autograd through a valid convolution of x padded by np.pad (every mode)."""
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(pads), mode=NUMPY_PAD_MODE[mode])
    tw = _t(w, True)
    y = getattr(F, f"conv{r}d")(_t(xp), tw, None, stride=stride, dilation=dilation, groups=groups)
    assert tuple(y.shape) == gy.shape
    y.backward(_t(gy))
    return tw.grad


def _wg_case_id(c):
    return "{}d-n{}-ci{}-co{}-g{}".format(c[0], c[1], c[2], c[3], c[4])


@requires_torch
@pytest.mark.parametrize("case", _WG_CASES, ids=_wg_case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_grad_kernel_matches_torch(case, mode, dtype):
    r, n, cin, cout, g, sizes, k, stride, dilation, pads = case
    if mode == "reflect" and any(max(p) >= s for p, s in zip(pads, sizes)):
        pytest.skip("reflect pads as large as the input")
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(_seed((case, mode, str(dtype))))
    x = rng.standard_normal((n, cin) + sizes).astype(dtype)
    w = rng.standard_normal((cout, cin // g) + k).astype(dtype)
    spec = conv_spec("t", r, x, w, None, stride, pads, dilation, g, mode, "channels_first")
    gy = rng.standard_normal(spec.output_shape()).astype(dtype)
    expected = _torch_weight_grad_padded(r, x.astype(np.float64), w.astype(np.float64), gy.astype(np.float64),
                                         stride, dilation, g, pads, mode)
    k_w = n * math.prod(spec.out_spatial)
    for layout in ("channels_first", "channels_last", "strided", "negative"):
        if layout == "channels_last":
            xl, gyl = np.moveaxis(x, 1, -1), np.moveaxis(gy, 1, -1)
        elif layout == "strided":  # non-contiguous views, one of them reversed along the batch
            xl = np.repeat(x, 2, axis=-1)[..., ::2]
            gyl = np.ascontiguousarray(gy[::-1])[::-1]
        elif layout == "negative":  # negative channel and spatial strides
            xl = np.ascontiguousarray(x[:, ::-1, ..., ::-1])[:, ::-1, ..., ::-1]
            gyl = np.ascontiguousarray(gy[:, ::-1])[:, ::-1]
        else:
            xl, gyl = x, gy
        fmt = "channels_last" if layout == "channels_last" else "channels_first"
        _, gw, _ = BACK[r](gyl, xl, w, None, stride, pads, dilation, g, padding_mode=mode, data_format=fmt,
                           needs=(False, True, False))
        _close(gw, expected, dtype, k_w)


@requires_torch
@pytest.mark.parametrize("case", _WG_CASES[:4] + _WG_CASES[6:9] + _WG_CASES[10:], ids=_wg_case_id)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_grad_kernel_transposed_matches_torch(case, dtype):
    """The transposed convolution's weight gradient (the kernel with x and grad_output exchanged)."""
    r, n, cin, cout, g, sizes, k, stride, dilation, pads = case
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(_seed((case, "t", str(dtype))))
    sizes = tuple(max(1, s // max(st_, 1)) for s, st_ in zip(sizes, stride))
    pads = tuple((p[0], p[0]) for p in pads)
    x = rng.standard_normal((n, cin) + sizes).astype(dtype)
    w = rng.standard_normal((cin, cout // g) + k).astype(dtype)
    try:
        spec = conv_transpose_spec("t", r, x, w, None, stride, pads, 0, g, dilation, None, "channels_first")
    except ValueError:
        pytest.skip("padding crops more than the full output")
    gy = rng.standard_normal(spec.output_shape()).astype(dtype)
    _, tgw, _, _ = _torch_conv_transpose_grads(r, x.astype(np.float64), w.astype(np.float64), None, stride,
                                               spec.pads, spec.out_spatial, dilation, g, gy.astype(np.float64))
    for fmt in ("channels_first", "channels_last"):
        to = (lambda a: np.moveaxis(a, 1, -1)) if fmt == "channels_last" else (lambda a: a)
        _, gw, _ = BACKT[r](to(gy), to(x), w, None, stride, pads, 0, g, dilation, data_format=fmt,
                            needs=(False, True, False))
        _close(gw, tgw, dtype, n * math.prod(sizes) * 4)


@pytest.mark.parametrize("case", [_WG_CASES[i] for i in (0, 2, 3, 6, 8, 10, 16, *_DEPTHWISE_WG)], ids=_wg_case_id)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_grad_kernel_bitwise_identical_across_thread_counts(case, dtype):
    r, n, cin, cout, g, sizes, k, stride, dilation, pads = case
    rng = np.random.default_rng(_seed((case, "threads")))
    x = rng.standard_normal((n, cin) + sizes).astype(dtype)
    w = rng.standard_normal((cout, cin // g) + k).astype(dtype)
    spec = conv_spec("t", r, x, w, None, stride, pads, dilation, g, "circular", "channels_first")
    gy = rng.standard_normal(spec.output_shape()).astype(dtype)
    before = convfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            convfast.set_num_threads(threads)
            _, gw, _ = BACK[r](gy, x, w, None, stride, pads, dilation, g, padding_mode="circular",
                               needs=(False, True, False))
            results.append(gw)
    finally:
        convfast.set_num_threads(before)
    for gw in results[1:]:
        np.testing.assert_array_equal(gw, results[0])


def test_weight_grad_slab_path_for_other_array_types():
    """ndarray subclasses (standing in for other array types, which the compiled kernel cannot read)
    take the slab path; it agrees with the compiled kernel."""
    class Other(np.ndarray):
        pass

    rng = np.random.default_rng(5)
    for ca, cb, groups in ((17, 13, 1), (3, 20, 1), (12, 18, 3)):
        a = rng.standard_normal((2, ca, 9, 8))
        b = rng.standard_normal((2, cb, 4, 10))  # (9 + 1 - 3) // 2 + 1, (8 + 3 - 2) + 1
        args = (groups, ((1, 0), (2, 1)), "reflect", (2, 1), (1, 1), (3, 2), np.dtype(np.float64))
        native = bw_module._weight_grad(a, b, *args)
        other = bw_module._weight_grad(a.view(Other), b.view(Other), *args)
        assert type(native) is np.ndarray
        np.testing.assert_allclose(np.asarray(other), native, rtol=1e-12, atol=1e-12)


def test_weight_grad_core_checks():
    core = convfast._core
    a = np.zeros((2, 4, 1, 5, 5), np.float32)
    b = np.zeros((2, 6, 1, 3, 3), np.float32)
    ok = dict(groups=2, kernel=(1, 3, 3), stride=(1, 1, 1), dilation=(1, 1, 1), pad_before=(0, 0, 0), mode=0)
    out = np.full((6, 2, 1, 3, 3), np.nan, np.float32)
    core.weight_grad(a, b, out, **ok)
    assert not out.any()
    with pytest.raises(ValueError, match="dtype"):
        core.weight_grad(a, b.astype(np.float64), out, **ok)
    with pytest.raises(ValueError, match="groups"):
        core.weight_grad(a, b, out, **dict(ok, groups=4))
    with pytest.raises(ValueError, match="out"):
        core.weight_grad(a, b, np.zeros((6, 2, 1, 3, 2), np.float32), **ok)
    with pytest.raises(ValueError, match="C-contiguous"):
        core.weight_grad(a, b, np.zeros((6, 2, 1, 3, 3), np.float32, order="F"), **ok)
    with pytest.raises(ValueError, match="stride"):
        core.weight_grad(a, b, out, **dict(ok, stride=(1, 0, 1)))
    with pytest.raises(TypeError):
        core.weight_grad(a.astype(np.int32), b.astype(np.int32), out.astype(np.int32), **ok)


# 1x1 (one-tap) axes with a stride: the weight gradient reads a[first + o * stride] there, and when
# those pixels all lie inside a the kernel runs on that strided view at stride 1 (the GEMM's
# channels-last copy then holds only the pixels read). Padding that reaches outside a (here with
# reflect), groups, 3-D, channels-last and the transposed layer's gradient (whose a is grad_output)
# are checked against the definition.
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rank, spatial, kernel, kw", [
    (2, (13, 17), (1, 1), dict(stride=2)),
    (2, (13, 17), (1, 1), dict(stride=(3, 2), padding=(0, 1))),
    (2, (12, 12), (1, 3), dict(stride=2, padding=(0, 1))),
    (3, (5, 7, 9), (1, 1, 1), dict(stride=(2, 1, 3))),
    (1, (40,), (1,), dict(stride=4)),
    (2, (10, 11), (1, 1), dict(stride=2, padding=1, padding_mode="reflect")),
    (2, (9, 9), (1, 1), dict(stride=2, groups=4)),
])
def test_one_tap_strided_weight_grad(rank, spatial, kernel, kw, dtype, layout):
    from conftest import assert_close, weight_grad_oracle
    rng = np.random.default_rng(len(spatial) * 10 + sum(spatial))
    groups = kw.get("groups", 1)
    x = rng.standard_normal((2, 8) + spatial).astype(dtype)
    w = rng.standard_normal((12, 8 // groups) + kernel).astype(dtype)
    conv, conv_backward = getattr(convfast, f"conv{rank}d"), getattr(convfast, f"conv{rank}d_backward")
    spec_kw = dict(kw)
    y = conv(x, w, None, **spec_kw)
    gy = rng.standard_normal(y.shape).astype(dtype)
    pad = kw.get("padding", 0)
    pads = [(p, p) for p in (pad if isinstance(pad, tuple) else (pad,) * rank)]
    stride = kw["stride"] if isinstance(kw["stride"], tuple) else (kw["stride"],) * rank
    expected = weight_grad_oracle(x, gy, kernel, pads, kw.get("padding_mode", "zeros"), groups, stride)
    xin, gyin = x, gy
    if layout == "channels_last":
        xin, gyin = np.moveaxis(x, 1, -1).copy(), np.moveaxis(gy, 1, -1).copy()
        spec_kw["data_format"] = layout
    gw = conv_backward(gyin, xin, w, None, needs=(False, True, False), **spec_kw).grad_weight
    assert_close(gw, expected, dtype, x.shape[0] * int(np.prod(y.shape[2:])))
    if "padding_mode" not in kw:  # the transposed layer's weight gradient: a = its grad_output
        kt = dict(spec_kw)
        wt = rng.standard_normal((8, 12 // groups) + kernel).astype(dtype)
        yt = getattr(convfast, f"conv_transpose{rank}d")(xin, wt, None, **kt)
        gyt = rng.standard_normal(yt.shape).astype(dtype)
        gwt = getattr(convfast, f"conv_transpose{rank}d_backward")(gyt, xin, wt, None, needs=(False, True, False),
                                                                    **kt).grad_weight
        gyt_cf = np.moveaxis(gyt, -1, 1) if layout == "channels_last" else gyt
        # d/dW of the transposed layer: its grad_output (a) correlated with its input (b), shaped
        # (C_in, C_out/G, k) like its weight.
        expected_t = weight_grad_oracle(gyt_cf, x, kernel, pads, "zeros", groups, stride)
        assert_close(gwt, expected_t, dtype, x.shape[0] * int(np.prod(x.shape[2:])))
