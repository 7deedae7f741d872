"""Semantics of every convfast operator against the NumPy oracle (convfast.reference).

The oracle itself is anchored first (hand-computed values and explicit Python loops that do not use
convfast or np.pad), then a pairwise-covering, seeded sweep over
op x dtype x data_format x padding style x padding_mode x groups x dilation x stride compares the
compiled operators with it, followed by targeted corner cases (unbatched, N=0, 1x1 kernels, kernel ==
input, outputs of size 1, micro-kernel tile edges, large reduction sizes, strided / misaligned /
byte-swapped inputs, ``out=``, dtype promotion and the layer objects).
"""
import itertools
import math
import zlib

import numpy as np
import pytest

import convfast
from convfast import reference as ref
from conftest import assert_close

CONV = {1: convfast.conv1d, 2: convfast.conv2d, 3: convfast.conv3d}
CONVT = {1: convfast.conv_transpose1d, 2: convfast.conv_transpose2d, 3: convfast.conv_transpose3d}
REF_CONV = {1: ref.conv1d, 2: ref.conv2d, 3: ref.conv3d}
REF_CONVT = {1: ref.conv_transpose1d, 2: ref.conv_transpose2d, 3: ref.conv_transpose3d}
LAYERS = {1: convfast.Conv1d, 2: convfast.Conv2d, 3: convfast.Conv3d}
LAYERS_T = {1: convfast.ConvTranspose1d, 2: convfast.ConvTranspose2d, 3: convfast.ConvTranspose3d}
MODES = ("zeros", "reflect", "replicate", "circular", "symmetric")


def _seed(obj):
    """A deterministic seed (Python's str hash is randomised per process)."""
    return zlib.crc32(repr(obj).encode())


# ----------------------------------------------------------------------------------------------
# Independent, loop-based oracles (no convfast, no np.pad) used to anchor the reference
# ----------------------------------------------------------------------------------------------

def _src(i, n, mode):
    """Index of the input pixel that padded coordinate i (relative to the unpadded input) reads."""
    if 0 <= i < n:
        return i
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(i, 0), n - 1)
    if mode == "circular":
        return i % n
    if mode == "reflect":  # mirror without repeating the edge: period 2n - 2
        if n == 1:
            return 0
        i %= 2 * n - 2
        return i if i < n else 2 * n - 2 - i
    if mode == "symmetric":  # mirror repeating the edge: period 2n
        i %= 2 * n
        return i if i < n else 2 * n - 1 - i
    raise AssertionError(mode)


def loop_conv(x, w, b=None, stride=None, pads=None, dilation=None, groups=1, mode="zeros"):
    """Channels-first (N, C, *spatial) cross-correlation with explicit Python loops."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    r = x.ndim - 2
    stride = stride or (1,) * r
    dilation = dilation or (1,) * r
    pads = pads or ((0, 0),) * r
    n, cin = x.shape[:2]
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    sp = x.shape[2:]
    out = tuple((sp[a] + pads[a][0] + pads[a][1] - (k[a] - 1) * dilation[a] - 1) // stride[a] + 1 for a in range(r))
    y = np.zeros((n, cout) + out)
    cout_g = cout // groups
    for bi in range(n):
        for co in range(cout):
            g = co // cout_g
            for o in itertools.product(*(range(v) for v in out)):
                acc = 0.0
                for ci in range(cin_g):
                    for t in itertools.product(*(range(v) for v in k)):
                        idx = []
                        for a in range(r):
                            j = _src(o[a] * stride[a] + t[a] * dilation[a] - pads[a][0], sp[a], mode)
                            if j is None:
                                break
                            idx.append(j)
                        else:
                            acc += w[(co, ci) + t] * x[(bi, g * cin_g + ci) + tuple(idx)]
                y[(bi, co) + o] = acc + (0.0 if b is None else b[co])
    return y


def loop_conv_transpose(x, w, b=None, stride=None, pads=None, dilation=None, groups=1, output_padding=None):
    """Channels-first transposed convolution in scatter form with explicit Python loops."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    r = x.ndim - 2
    stride = stride or (1,) * r
    dilation = dilation or (1,) * r
    pads = pads or ((0, 0),) * r
    output_padding = output_padding or (0,) * r
    n, cin = x.shape[:2]
    cout_g = w.shape[1]
    cin_g = cin // groups
    k = w.shape[2:]
    sp = x.shape[2:]
    out = tuple((sp[a] - 1) * stride[a] - pads[a][0] - pads[a][1] + (k[a] - 1) * dilation[a] + 1 + output_padding[a]
                for a in range(r))
    y = np.zeros((n, cout_g * groups) + out)
    for bi in range(n):
        for ci in range(cin):
            g = ci // cin_g
            for i in itertools.product(*(range(v) for v in sp)):
                for co in range(cout_g):
                    for t in itertools.product(*(range(v) for v in k)):
                        o = tuple(i[a] * stride[a] + t[a] * dilation[a] - pads[a][0] for a in range(r))
                        if all(0 <= o[a] < out[a] for a in range(r)):
                            y[(bi, g * cout_g + co) + o] += x[(bi, ci) + i] * w[(ci, co) + t]
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * r)
    return y


# ----------------------------------------------------------------------------------------------
# The oracle, anchored
# ----------------------------------------------------------------------------------------------

def test_reference_hand_computed_sum_kernel():
    x = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    w = np.ones((1, 1, 3))
    # Explicit loop: y[i] = x[i] + x[i+1] + x[i+2]
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    expected = [sum(xs[i + t] for t in range(3)) for i in range(len(xs) - 2)]
    assert expected == [6.0, 9.0, 12.0]
    np.testing.assert_array_equal(ref.conv1d(x, w)[0, 0], expected)
    np.testing.assert_array_equal(convfast.conv1d(x, w)[0, 0], expected)
    # zero padding 1: [0,1,2,3,4,5,0]
    np.testing.assert_array_equal(ref.conv1d(x, w, padding=1)[0, 0], [3.0, 6.0, 9.0, 12.0, 9.0])
    # stride 2
    np.testing.assert_array_equal(ref.conv1d(x, w, stride=2)[0, 0], [6.0, 12.0])
    # dilation 2: x[i] + x[i+2] + x[i+4]
    np.testing.assert_array_equal(ref.conv1d(x, w, dilation=2)[0, 0], [9.0])
    # bias
    np.testing.assert_array_equal(ref.conv1d(x, w, np.array([0.5]))[0, 0], [6.5, 9.5, 12.5])
    # padding modes with 2 pixels each side: reflect [3,2,|1..5|,4,3]; replicate [1,1,|..|,5,5]
    # circular [4,5,|..|,1,2]; symmetric [2,1,|..|,5,4]
    for mode, padded in {"reflect": [3, 2, 1, 2, 3, 4, 5, 4, 3], "replicate": [1, 1, 1, 2, 3, 4, 5, 5, 5],
                         "circular": [4, 5, 1, 2, 3, 4, 5, 1, 2], "symmetric": [2, 1, 1, 2, 3, 4, 5, 5, 4]}.items():
        exp = [sum(padded[i:i + 3]) for i in range(len(padded) - 2)]
        np.testing.assert_array_equal(ref.conv1d(x, w, padding=2, padding_mode=mode)[0, 0], exp)
        np.testing.assert_array_equal(convfast.conv1d(x, w, padding=2, padding_mode=mode)[0, 0], exp)


def test_reference_hand_computed_transposed():
    # Transposed conv, stride 2, kernel [1, 10]: each x[i] scatters x[i] at 2i and 10*x[i] at 2i+1.
    x = np.array([[[1.0, 2.0, 3.0]]])
    w = np.array([[[1.0, 10.0]]])
    expected = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]
    np.testing.assert_array_equal(ref.conv_transpose1d(x, w, stride=2)[0, 0], expected)
    np.testing.assert_array_equal(convfast.conv_transpose1d(x, w, stride=2)[0, 0], expected)
    # kernel [1, 1, 1], stride 2: overlap at the even positions; padding 1 crops one each side
    w3 = np.ones((1, 1, 3))
    full = [1.0, 1.0, 3.0, 2.0, 5.0, 3.0, 3.0]
    np.testing.assert_array_equal(ref.conv_transpose1d(x, w3, stride=2)[0, 0], full)
    np.testing.assert_array_equal(ref.conv_transpose1d(x, w3, stride=2, padding=1)[0, 0], full[1:-1])
    np.testing.assert_array_equal(ref.conv_transpose1d(x, w3, stride=2, padding=1, output_padding=1)[0, 0],
                                  full[1:])


def test_reference_hand_computed_2d():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    w = np.array([[[[1.0, 0.0], [0.0, -1.0]]]])  # x[i, j] - x[i+1, j+1] == -5 everywhere
    np.testing.assert_array_equal(ref.conv2d(x, w), np.full((1, 1, 3, 3), -5.0))
    np.testing.assert_array_equal(convfast.conv2d(x, w), np.full((1, 1, 3, 3), -5.0))


_LOOP_CASES = [
    # rank, cin, cout, groups, k, stride, dilation, pads, mode, spatial
    (1, 2, 3, 1, (3,), (1,), (1,), ((1, 1),), "zeros", (7,)),
    (1, 4, 4, 2, (2,), (2,), (2,), ((2, 0),), "reflect", (6,)),
    (1, 3, 6, 3, (3,), (3,), (1,), ((4, 5),), "circular", (3,)),
    (1, 1, 2, 1, (4,), (1,), (1,), ((6, 7),), "symmetric", (3,)),
    (1, 2, 2, 1, (2,), (1,), (3,), ((5, 1),), "replicate", (2,)),
    (2, 2, 3, 1, (3, 2), (2, 1), (1, 2), ((1, 0), (2, 1)), "reflect", (5, 4)),
    (2, 4, 2, 2, (2, 3), (1, 3), (2, 1), ((1, 2), (0, 3)), "symmetric", (4, 5)),
    (2, 2, 2, 2, (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), "circular", (4, 4)),
    (2, 3, 1, 1, (1, 2), (1, 1), (1, 1), ((2, 2), (0, 1)), "replicate", (3, 3)),
    (3, 2, 2, 1, (2, 2, 2), (1, 2, 1), (1, 1, 2), ((1, 0), (0, 1), (1, 1)), "reflect", (3, 4, 3)),
    (3, 2, 4, 2, (1, 2, 3), (2, 1, 1), (1, 1, 1), ((0, 0), (1, 1), (2, 1)), "zeros", (3, 3, 4)),
]


@pytest.mark.parametrize("case", _LOOP_CASES, ids=lambda c: f"{c[0]}d-{c[8]}-g{c[3]}")
@pytest.mark.parametrize("use_bias", [False, True])
def test_reference_and_convfast_match_python_loops(case, use_bias):
    r, cin, cout, g, k, s, d, pads, mode, sp = case
    rng = np.random.default_rng(_seed(case))
    x = rng.standard_normal((2, cin) + sp)
    w = rng.standard_normal((cout, cin // g) + k)
    b = rng.standard_normal(cout) if use_bias else None
    expected = loop_conv(x, w, b, s, pads, d, g, mode)
    kw = dict(stride=s, padding=pads, dilation=d, groups=g, padding_mode=mode)
    np.testing.assert_allclose(REF_CONV[r](x, w, b, **kw), expected, rtol=1e-12, atol=1e-12)
    assert_close(CONV[r](x, w, b, **kw), expected, np.float64)


_LOOP_T_CASES = [
    # rank, cin, cout, groups, k, stride, dilation, pads, output_padding, spatial
    (1, 2, 3, 1, (3,), (2,), (1,), ((1, 1),), (1,), (4,)),
    (1, 4, 2, 2, (2,), (3,), (2,), ((0, 2),), (2,), (3,)),
    (1, 3, 3, 3, (4,), (1,), (2,), ((3, 2),), (1,), (5,)),
    (1, 1, 1, 1, (1,), (4,), (1,), ((0, 0),), (3,), (3,)),
    (2, 2, 2, 1, (3, 2), (2, 3), (1, 1), ((1, 0), (0, 2)), (1, 2), (3, 2)),
    (2, 4, 6, 2, (2, 3), (1, 2), (3, 1), ((2, 1), (1, 1)), (2, 0), (3, 3)),
    (3, 2, 2, 2, (2, 1, 3), (2, 1, 2), (1, 1, 1), ((0, 1), (0, 0), (1, 2)), (1, 0, 1), (2, 3, 2)),
]


@pytest.mark.parametrize("case", _LOOP_T_CASES, ids=lambda c: f"{c[0]}d-g{c[3]}-s{c[5]}")
def test_reference_and_convfast_transposed_match_python_loops(case):
    r, cin, cout, g, k, s, d, pads, op, sp = case
    rng = np.random.default_rng(_seed(case))
    x = rng.standard_normal((2, cin) + sp)
    w = rng.standard_normal((cin, cout // g) + k)
    b = rng.standard_normal(cout)
    expected = loop_conv_transpose(x, w, b, s, pads, d, g, op)
    kw = dict(stride=s, padding=pads, output_padding=op, groups=g, dilation=d)
    np.testing.assert_allclose(REF_CONVT[r](x, w, b, **kw), expected, rtol=1e-12, atol=1e-12)
    assert_close(CONVT[r](x, w, b, **kw), expected, np.float64)


# ----------------------------------------------------------------------------------------------
# The sweep: all pairs of factor values covered, plus a seeded random subset of the product
# ----------------------------------------------------------------------------------------------

CONV_FACTORS = {
    "rank": (1, 2, 3),
    "dtype": ("float32", "float64"),
    "layout": ("channels_first", "channels_last"),
    "padding": ("int", "per_axis", "pairs", "valid", "same", "same_lower"),
    "mode": MODES,
    "groups": ("1", "2", "depthwise"),
    "dilation": (1, 2),
    "stride": (1, 2, 3),
    "bias": (True, False),
    "batched": (True, False),
}
CONVT_FACTORS = {k: v for k, v in CONV_FACTORS.items() if k != "mode"}
CONVT_FACTORS["size_by"] = ("output_padding", "output_size")


def _pairwise_cases(factors, n_random, seed):
    """Greedy all-pairs covering array over ``factors`` plus ``n_random`` random extra cases."""
    names = list(factors)
    rng = np.random.default_rng(seed)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    cases = []

    def random_case():
        return {n: factors[n][rng.integers(len(factors[n]))] for n in names}

    def gain(c):
        return sum(((a, c[a]), (b, c[b])) in uncovered for a, b in itertools.combinations(names, 2))

    while uncovered:
        # seed a candidate with one uncovered pair, fill the rest greedily-at-random
        (a, va), (b, vb) = min(uncovered, key=repr)
        best = None
        for _ in range(40):
            c = random_case()
            c[a], c[b] = va, vb
            if best is None or gain(c) > gain(best):
                best = c
        cases.append(best)
        uncovered -= {((x, best[x]), (y, best[y])) for x, y in itertools.combinations(names, 2)}
    cases += [random_case() for _ in range(n_random)]
    return cases


def _case_id(c):
    parts = [("convT" if "size_by" in c else "conv") + f"{c['rank']}d", c["dtype"][5:], c["layout"][9:],
             c["padding"], c.get("mode", c.get("size_by")), "g" + c["groups"], f"d{c['dilation']}",
             f"s{c['stride']}", "bias" if c["bias"] else "nobias", "batched" if c["batched"] else "unbatched"]
    return "-".join(map(str, parts))


CONV_CASES = _pairwise_cases(CONV_FACTORS, 110, seed=1234)
CONVT_CASES = _pairwise_cases(CONVT_FACTORS, 70, seed=4321)


def _per_axis_param(rng, value, r):
    """value as an int, or as a tuple where value is used on a random non-empty subset of axes."""
    if value == 1 or rng.random() < 0.5:
        return value, (value,) * r
    axes = tuple(int(v) for v in np.where(rng.random(r) < 0.6, value, 1))
    if all(a == 1 for a in axes):
        axes = (value,) + axes[1:]
    return axes, axes


def _channels(rng, kind):
    if kind == "1":
        return 1, int(rng.integers(1, 5)), int(rng.integers(1, 6))
    if kind == "2":
        return 2, 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))
    c = int(rng.integers(2, 6))
    return c, c, c * int(rng.integers(1, 3))


def _make_input(rng, batch, channels, spatial, layout, dtype, batched):
    shape = (batch,) + ((channels,) + spatial if layout == "channels_first" else spatial + (channels,))
    x = rng.standard_normal(shape).astype(dtype)
    return x if batched else x[0]


def _to_channels_first(x, layout, batched):
    x = np.asarray(x, np.float64)
    if not batched:
        x = x[None]
    if layout == "channels_last":
        x = np.moveaxis(x, -1, 1)
    return x


def _to_caller(y, layout, batched):
    if layout == "channels_last":
        y = np.moveaxis(y, 1, -1)
    return y if batched else y[0]


def _same_pads_inline(n, k, s, d, lower=False):
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_sweep(case):
    rng = np.random.default_rng(_seed(case))
    r, dtype, layout, mode = case["rank"], np.dtype(case["dtype"]), case["layout"], case["mode"]
    g, cin, cout = _channels(rng, case["groups"])
    stride_arg, stride = _per_axis_param(rng, case["stride"], r)
    dil_arg, dil = _per_axis_param(rng, case["dilation"], r)
    kmax = 4 if r < 3 else 3
    k = tuple(int(rng.integers(1, kmax)) for _ in range(r))
    eff = [(kk - 1) * dd + 1 for kk, dd in zip(k, dil)]
    sp = tuple(e + int(rng.integers(0, 6 if r < 3 else 3)) for e in eff)
    limit = [n - 1 if mode == "reflect" else 3 for n in sp]  # reflect: padding < input size
    style = case["padding"]
    if style == "int":
        p = int(rng.integers(0, min(limit) + 1))
        padding, pads = p, ((p, p),) * r
    elif style == "per_axis":
        ps = tuple(int(rng.integers(0, lim + 1)) for lim in limit)
        padding, pads = ps, tuple((p, p) for p in ps)
    elif style == "pairs":
        pads = tuple((int(rng.integers(0, lim + 1)), int(rng.integers(0, lim + 1))) for lim in limit)
        padding = pads
    elif style == "valid":
        padding, pads = "valid", ((0, 0),) * r
    else:
        padding = style
        pads = tuple(_same_pads_inline(n, kk, s, dd, lower=style == "same_lower")
                     for n, kk, s, dd in zip(sp, k, stride, dil))
    batched = case["batched"]
    batch = int(rng.integers(1, 4))
    x = _make_input(rng, batch, cin, sp, layout, dtype, batched)
    w = rng.standard_normal((cout, cin // g) + k).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if case["bias"] else None

    y = CONV[r](x, w, b, stride=stride_arg, padding=padding, dilation=dil_arg, groups=g, padding_mode=mode,
                data_format=layout)
    assert y.dtype == dtype
    assert y.flags.c_contiguous
    b64 = None if b is None else b.astype(np.float64)
    expected = REF_CONV[r](_to_channels_first(x, layout, batched), w.astype(np.float64), b64, stride=stride,
                           padding=pads, dilation=dil, groups=g, padding_mode=mode)
    # out = ceil(in / stride) for the SAME styles, the closed form otherwise
    out_sp = tuple((n + pb + pa - e) // s + 1 for n, (pb, pa), e, s in zip(sp, pads, eff, stride))
    if style in ("same", "same_lower"):
        assert out_sp == tuple(-(-n // s) for n, s in zip(sp, stride))
    assert expected.shape == (expected.shape[0], cout) + out_sp
    assert_close(y, _to_caller(expected, layout, batched), dtype, reduction_size=(cin // g) * math.prod(k))


@pytest.mark.parametrize("case", CONVT_CASES, ids=_case_id)
def test_conv_transpose_sweep(case):
    rng = np.random.default_rng(_seed(case))
    r, dtype, layout = case["rank"], np.dtype(case["dtype"]), case["layout"]
    g, cin, cout = _channels(rng, case["groups"])
    stride_arg, stride = _per_axis_param(rng, case["stride"], r)
    dil_arg, dil = _per_axis_param(rng, case["dilation"], r)
    kmax = 5 if r < 3 else 4
    k = tuple(int(rng.integers(1, kmax)) for _ in range(r))
    eff = [(kk - 1) * dd + 1 for kk, dd in zip(k, dil)]
    sp = tuple(int(rng.integers(1, 6 if r < 3 else 4)) for _ in range(r))
    full = [(n - 1) * s + e for n, s, e in zip(sp, stride, eff)]  # uncropped length, output_padding 0
    style = case["padding"]
    op = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dil))
    if style == "int":
        p = int(rng.integers(0, min((f - 1) // 2 for f in full) + 1))
        padding, pads = p, ((p, p),) * r
    elif style == "per_axis":
        ps = tuple(int(rng.integers(0, (f - 1) // 2 + 1)) for f in full)
        padding, pads = ps, tuple((p, p) for p in ps)
    elif style == "pairs":
        pads = []
        for f in full:
            pb = int(rng.integers(0, f))
            pads.append((pb, int(rng.integers(0, f - pb))))
        pads = padding = tuple(pads)
    elif style == "valid":
        padding, pads = "valid", ((0, 0),) * r
    else:  # output = input * stride; Keras/ONNX split of total = eff - stride
        padding, pads, op = style, [], []
        for e, s in zip(eff, stride):
            total = e - s
            if total >= 0:
                small, big = total // 2, total - total // 2
                pads.append((big, small) if style == "same_lower" else (small, big))
                op.append(0)
            else:
                pads.append((0, 0))
                op.append(-total)
        pads, op = tuple(pads), tuple(op)
    out_sp = tuple(f - pb - pa + o for f, (pb, pa), o in zip(full, pads, op))
    if style in ("same", "same_lower"):
        assert out_sp == tuple(n * s for n, s in zip(sp, stride))
    batched = case["batched"]
    batch = int(rng.integers(1, 4))
    x = _make_input(rng, batch, cin, sp, layout, dtype, batched)
    w = rng.standard_normal((cin, cout // g) + k).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if case["bias"] else None

    kw = dict(stride=stride_arg, padding=padding, groups=g, dilation=dil_arg, data_format=layout)
    if style in ("same", "same_lower"):
        if case["size_by"] == "output_size":
            kw["output_size"] = out_sp
    elif case["size_by"] == "output_size":
        kw["output_size"] = out_sp
    else:
        kw["output_padding"] = op
    y = CONVT[r](x, w, b, **kw)
    assert y.dtype == dtype
    assert y.flags.c_contiguous
    b64 = None if b is None else b.astype(np.float64)
    expected = REF_CONVT[r](_to_channels_first(x, layout, batched), w.astype(np.float64), b64, stride=stride,
                            padding=pads, output_padding=op, groups=g, dilation=dil)
    assert expected.shape[1:] == (cout,) + out_sp
    assert_close(y, _to_caller(expected, layout, batched), dtype, reduction_size=(cin // g) * math.prod(k))


def test_sweep_covers_all_pairs():
    for factors, cases in ((CONV_FACTORS, CONV_CASES), (CONVT_FACTORS, CONVT_CASES)):
        for a, b in itertools.combinations(factors, 2):
            seen = {(c[a], c[b]) for c in cases}
            assert seen == set(itertools.product(factors[a], factors[b])), (a, b)
        assert len({_case_id(c) for c in cases}) > 0.9 * len(cases)


# ----------------------------------------------------------------------------------------------
# Targeted corners
# ----------------------------------------------------------------------------------------------

def _rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_unbatched_equals_batched(r, transposed, layout):
    rng = np.random.default_rng(r)
    sp = (5, 4, 3)[:r]
    x = _rand(rng, (3,) + sp if layout == "channels_first" else sp + (3,), np.float32)
    if transposed:
        w = _rand(rng, (3, 2) + (2,) * r, np.float32)
        f, kw = CONVT[r], dict(stride=2, padding=1, output_padding=1)
    else:
        w = _rand(rng, (4, 3) + (2,) * r, np.float32)
        f, kw = CONV[r], dict(stride=2, padding="same", padding_mode="reflect")
    b = _rand(rng, (w.shape[1] if transposed else w.shape[0],), np.float32)
    y1 = f(x, w, b, data_format=layout, **kw)
    yb = f(x[None], w, b, data_format=layout, **kw)
    assert y1.ndim == r + 1
    np.testing.assert_array_equal(y1, yb[0])


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_batch(r, transposed, layout, dtype):
    sp = (6, 5, 4)[:r]
    x = np.zeros((0, 3) + sp if layout == "channels_first" else (0,) + sp + (3,), dtype)
    if transposed:
        w = np.ones((3, 4) + (3,) * r, dtype)
        y = CONVT[r](x, w, np.ones(4, dtype), stride=2, padding=1, data_format=layout)
        out = tuple((n - 1) * 2 - 2 + 3 for n in sp)
    else:
        w = np.ones((4, 3) + (3,) * r, dtype)
        y = CONV[r](x, w, np.ones(4, dtype), stride=2, padding="same", data_format=layout)
        out = tuple(-(-n // 2) for n in sp)
    expected_shape = (0, 4) + out if layout == "channels_first" else (0,) + out + (4,)
    assert y.shape == expected_shape
    assert y.dtype == dtype
    # out= with an empty array
    out_arr = np.empty(expected_shape, dtype)
    f = CONVT[r] if transposed else CONV[r]
    kw = dict(stride=2, padding=1) if transposed else dict(stride=2, padding="same")
    assert f(x, w, None, data_format=layout, out=out_arr, **kw) is out_arr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_single_channel_1x1_scales(dtype, r):
    rng = np.random.default_rng(0)
    x = _rand(rng, (1, 1) + (4,) * r, dtype)
    w = _rand(rng, (1, 1) + (1,) * r, dtype)
    y = CONV[r](x, w)
    assert_close(y, x.astype(np.float64) * float(w.ravel()[0]), dtype)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_kernel(r, dtype, stride):
    rng = np.random.default_rng(r * 10 + stride)
    x = _rand(rng, (2, 7) + (5, 4, 3)[:r], dtype)
    w = _rand(rng, (9, 7) + (1,) * r, dtype)
    b = _rand(rng, (9,), dtype)
    y = CONV[r](x, w, b, stride=stride)
    # 1x1 conv is a channel matmul on the strided pixels
    xs = x[(slice(None), slice(None)) + (slice(None, None, stride),) * r].astype(np.float64)
    expected = np.einsum("oc,nc...->no...", w.reshape(9, 7).astype(np.float64), xs) \
        + b.astype(np.float64).reshape((1, 9) + (1,) * r)
    assert_close(y, expected, dtype, reduction_size=7)
    yt = CONVT[r](x, _rand(rng, (7, 3) + (1,) * r, dtype), stride=1)
    assert yt.shape == (2, 3) + x.shape[2:]


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_equals_input_size(r, dtype):
    rng = np.random.default_rng(r)
    sp = (5, 4, 3)[:r]
    x = _rand(rng, (3, 6) + sp, dtype)
    w = _rand(rng, (17, 6) + sp, dtype)
    y = CONV[r](x, w)
    assert y.shape == (3, 17) + (1,) * r
    # fully-connected layer: y[n, o] = sum(x[n] * w[o])
    expected = x.reshape(3, -1).astype(np.float64) @ w.reshape(17, -1).astype(np.float64).T
    assert_close(y.reshape(3, 17), expected, dtype, reduction_size=6 * math.prod(sp))
    # the transposed op on a single pixel pastes the kernel
    xt = _rand(rng, (2, 6) + (1,) * r, dtype)
    yt = CONVT[r](xt, w.swapaxes(0, 1).copy())
    expected_t = np.einsum("nc,co...->no...", xt.reshape(2, 6).astype(np.float64),
                           w.swapaxes(0, 1).astype(np.float64))
    assert_close(yt, expected_t, dtype, reduction_size=6)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_output_of_size_one(r, mode):
    rng = np.random.default_rng(7)
    sp = (3, 4, 2)[:r]
    x = _rand(rng, (2, 3) + sp)
    w = _rand(rng, (5, 3) + (3,) * r)
    # stride larger than the padded input: exactly one output per axis
    y = CONV[r](x, w, stride=9, padding=1, padding_mode=mode)
    assert y.shape == (2, 5) + (1,) * r
    expected = REF_CONV[r](x, w, stride=9, padding=1, padding_mode=mode)
    assert_close(y, expected, np.float64)
    # "same" with a large stride: ceil(n / s) == 1
    y = CONV[r](x, w, stride=5, padding="same", padding_mode=mode)
    assert y.shape == (2, 5) + (1,) * r
    assert_close(y, REF_CONV[r](x, w, stride=5, padding="same", padding_mode=mode), np.float64)


@pytest.mark.parametrize("cout", [1, 5, 8, 15, 16, 17, 20, 32, 33])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_tile_edges_conv2d(cout, dtype, layout):
    # micro-kernel tiles are 6x16 (float32) and 6x8 (float64): C_out and M = output pixels off the grid
    rng = np.random.default_rng(cout)
    x = _rand(rng, (2, 3, 9, 7), dtype)       # 3x3 valid -> 7x5 = 35 output pixels
    w = _rand(rng, (cout, 3, 3, 3), dtype)
    b = _rand(rng, (cout,), dtype)
    xl = x if layout == "channels_first" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y = convfast.conv2d(xl, w, b, data_format=layout)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    if layout == "channels_last":
        expected = np.moveaxis(expected, 1, -1)
    assert_close(y, expected, dtype, reduction_size=27)
    # transposed: the same C_out edges
    wt = _rand(rng, (3, cout, 3, 3), dtype)
    yt = convfast.conv_transpose2d(xl, wt, b, stride=2, data_format=layout)
    expected = ref.conv_transpose2d(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64), stride=2)
    if layout == "channels_last":
        expected = np.moveaxis(expected, 1, -1)
    assert_close(yt, expected, dtype, reduction_size=27)


@pytest.mark.parametrize("width", [7, 8, 9, 16, 17, 23])
@pytest.mark.parametrize("cout", [8, 9, 16, 31])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposing_store_rows_and_channels(width, cout, dtype, monkeypatch):
    # The GEMM output is stored channels-first through an SIMD L x L transpose (L = 4..16 lanes)
    # for runs of L pixels contiguous in y, and scalar elsewhere: rows shorter than, equal to and
    # longer than L, C_out off the lane grid, a bias, and an out= whose rows are not adjacent.
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    rng = np.random.default_rng(width * 100 + cout)
    x = _rand(rng, (2, 5, 11, width + 2), dtype)
    w = _rand(rng, (cout, 5, 3, 3), dtype)
    b = _rand(rng, (cout,), dtype)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=(1, 0))
    assert_close(convfast.conv2d(x, w, b, padding=(1, 0)), expected, dtype, reduction_size=45)
    big = np.full((2, cout, 11, width + 5), 7.0, dtype)
    out = big[..., 2:width + 2]
    convfast.conv2d(x, w, b, padding=(1, 0), out=out)
    assert_close(out, expected, dtype, reduction_size=45)
    assert (big[..., :2] == 7).all() and (big[..., width + 2:] == 7).all()


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stride_two_rows_read_in_place(rank, dilation, dtype, monkeypatch):
    # Interior GEMM tiles of a stride-2 convolution are read in place with a step of 2 (the
    # micro-kernel's second in-place variant): rows long enough for several such tiles, padding
    # on both sides (tiles at the row ends are packed), an odd width, a bias.
    monkeypatch.setenv("CONVFAST_ALGO", "gemm")
    rng = np.random.default_rng(rank * 10 + dilation)
    spatial = {1: (61,), 2: (9, 47), 3: (5, 6, 41)}[rank]
    x = _rand(rng, (2, 3) + spatial, dtype)
    w = _rand(rng, (10, 3) + (3,) * rank, dtype)
    b = _rand(rng, (10,), dtype)
    conv, reference = getattr(convfast, f"conv{rank}d"), getattr(ref, f"conv{rank}d")
    y = conv(x, w, b, stride=2, padding=1, dilation=dilation)
    expected = reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride=2, padding=1,
                         dilation=dilation)
    assert_close(y, expected, dtype, reduction_size=3 ** (rank + 1))


@pytest.mark.parametrize("m", [1, 5, 6, 7, 11, 13, 37])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_edges_output_pixels_1d(m, dtype):
    rng = np.random.default_rng(m)
    x = _rand(rng, (3, 4, m + 2), dtype)
    w = _rand(rng, (17, 4, 3), dtype)
    assert_close(convfast.conv1d(x, w), ref.conv1d(x.astype(np.float64), w.astype(np.float64)), dtype,
                 reduction_size=12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_large_reduction(dtype, layout):
    rng = np.random.default_rng(300)
    x = _rand(rng, (1, 300, 8, 7), dtype)
    w = _rand(rng, (20, 300, 3, 3), dtype)
    b = _rand(rng, (20,), dtype)
    xl = x if layout == "channels_first" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y = convfast.conv2d(xl, w, b, padding=1, data_format=layout)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1)
    if layout == "channels_last":
        expected = np.moveaxis(expected, 1, -1)
    assert_close(y, expected, dtype, reduction_size=2700)
    wt = _rand(rng, (300, 7, 3, 3), dtype)
    yt = convfast.conv_transpose2d(xl, wt, None, stride=2, padding=1, data_format=layout)
    expected = ref.conv_transpose2d(x.astype(np.float64), wt.astype(np.float64), stride=2, padding=1)
    if layout == "channels_last":
        expected = np.moveaxis(expected, 1, -1)
    assert_close(yt, expected, dtype, reduction_size=2700)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_medium_sizes_grouped_and_depthwise(dtype):
    rng = np.random.default_rng(5)
    x = _rand(rng, (2, 24, 19, 13), dtype)
    for g, cout in ((1, 40), (4, 20), (24, 24), (24, 48)):
        w = _rand(rng, (cout, 24 // g, 3, 3), dtype)
        for kw in (dict(padding="same"), dict(stride=2, padding="same_lower", padding_mode="reflect"),
                   dict(dilation=2, padding=(2, 1), padding_mode="circular")):
            y = convfast.conv2d(x, w, groups=g, **kw)
            expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), groups=g, **kw)
            assert_close(y, expected, dtype, reduction_size=9 * 24 // g)


@pytest.mark.parametrize("mode", ["replicate", "circular", "symmetric", "zeros"])
@pytest.mark.parametrize("r", [1, 2])
def test_padding_wider_than_input(mode, r):
    # only reflect is documented to need padding < input size
    rng = np.random.default_rng(11)
    x = _rand(rng, (2, 2) + (3, 2)[:r])
    w = _rand(rng, (3, 2) + (2,) * r)
    pads = ((5, 7), (4, 3))[:r]
    y = CONV[r](x, w, padding=pads, padding_mode=mode)
    assert_close(y, loop_conv(x, w, pads=pads, mode=mode), np.float64)


@pytest.mark.parametrize("alias,mode", [("constant", "zeros"), ("edge", "replicate"), ("wrap", "circular"),
                                        ("REFLECT", "reflect"), ("Symmetric", "symmetric")])
def test_padding_mode_aliases(alias, mode):
    rng = np.random.default_rng(3)
    x = _rand(rng, (1, 2, 6, 5))
    w = _rand(rng, (3, 2, 3, 3))
    np.testing.assert_array_equal(convfast.conv2d(x, w, padding=2, padding_mode=alias),
                                  convfast.conv2d(x, w, padding=2, padding_mode=mode))


# ----------------------------------------------------------------------------------------------
# Memory layouts of the operands
# ----------------------------------------------------------------------------------------------

def _views(rng, shape, dtype):
    """The same values as several non-contiguous / unusual arrays."""
    base = _rand(rng, shape, dtype)
    yield "contiguous", base
    yield "fortran", np.asfortranarray(base)
    big = np.zeros(tuple(2 * n for n in shape), dtype)
    big[tuple(slice(None, None, 2) for _ in shape)] = base
    yield "strided", big[tuple(slice(None, None, 2) for _ in shape)]
    rev = np.ascontiguousarray(base[..., ::-1])
    yield "negative", rev[..., ::-1]
    swapped = base.astype(base.dtype.newbyteorder(">" if np.little_endian else "<"))
    yield "byteswapped", swapped
    raw = bytearray(base.nbytes + 1)
    mis = np.frombuffer(raw, dtype=dtype, count=base.size, offset=1).reshape(shape)
    np.copyto(mis, base)
    yield "misaligned", mis


VIEW_KINDS = ("contiguous", "fortran", "strided", "negative", "byteswapped", "misaligned")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("xkind", VIEW_KINDS)
def test_unusual_operand_layouts(dtype, transposed, xkind):
    """x given as xkind, combined with every kind of weight and bias array."""
    rng = np.random.default_rng(21)
    xshape, wshape = (2, 4, 7, 6), ((4, 3, 3, 2) if transposed else (5, 4, 3, 2))
    xs = dict(_views(rng, xshape, dtype))
    ws = dict(_views(rng, wshape, dtype))
    bs = dict(_views(rng, (6,), dtype))
    assert tuple(xs) == VIEW_KINDS
    for views in (xs, ws, bs):
        for name in views:
            np.testing.assert_array_equal(views[name], views["contiguous"])
    f = convfast.conv_transpose2d if transposed else convfast.conv2d
    rf = ref.conv_transpose2d if transposed else ref.conv2d
    kw = dict(stride=2, padding=1) if transposed else dict(stride=2, padding="same", padding_mode="symmetric")
    x0, w0 = xs["contiguous"].astype(np.float64), ws["contiguous"].astype(np.float64)
    cout = wshape[1] if transposed else wshape[0]
    b0 = bs["contiguous"][:cout].astype(np.float64)
    expected = rf(x0, w0, b0, **kw)
    for wn, bn in itertools.product(ws, bs):
        y = f(xs[xkind], ws[wn], bs[bn][:cout], **kw)
        assert y.dtype == dtype, (wn, bn)
        assert_close(y, expected, dtype, reduction_size=24)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cout", [1, 5, 17])
def test_flipped_input_view(r, transposed, dtype, cout):
    """np.flip gives negative strides on the spatial axes; the result must not depend on that."""
    rng = np.random.default_rng(r * 100 + cout)
    x = _rand(rng, (2, 3) + (7, 5, 4)[:r], dtype)
    flipped = np.flip(x, axis=tuple(range(2, 2 + r)))
    w = _rand(rng, (3, cout) + (2,) * r, dtype) if transposed else _rand(rng, (cout, 3) + (2,) * r, dtype)
    f = CONVT[r] if transposed else CONV[r]
    rf = REF_CONVT[r] if transposed else REF_CONV[r]
    kw = dict(stride=2, padding=1) if transposed else dict(padding="same")
    expected = rf(flipped.astype(np.float64), w.astype(np.float64), **kw)
    assert_close(f(flipped, w, **kw), expected, dtype, reduction_size=3 * 2 ** r)
    # a flip of only the last axis, and of the channels_last view
    last = x[..., ::-1]
    assert_close(f(last, w, **kw), rf(last.astype(np.float64), w.astype(np.float64), **kw), dtype,
                 reduction_size=3 * 2 ** r)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_channels_last_given_as_transposed_view(r):
    rng = np.random.default_rng(r)
    x_cf = _rand(rng, (2, 5) + (6, 5, 4)[:r], np.float32)
    x_cl_view = np.moveaxis(x_cf, 1, -1)  # non-contiguous channels_last view
    w = _rand(rng, (7, 5) + (3,) * r, np.float32)
    y_cl = CONV[r](x_cl_view, w, padding="same", data_format="channels_last")
    y_cf = CONV[r](x_cf, w, padding="same")
    np.testing.assert_allclose(y_cl, np.moveaxis(y_cf, 1, -1), rtol=0, atol=1e-5)
    assert y_cl.flags.c_contiguous


@pytest.mark.parametrize("layout_name,last", [("NHWC", True), ("nhwc", True), ("NCHW", False),
                                              ("nchw", False)])
def test_data_format_aliases(layout_name, last):
    rng = np.random.default_rng(0)
    x = _rand(rng, (1, 4, 5, 3))  # NHWC with C=3, or NCHW with C=4
    w = _rand(rng, (2, 3 if last else 4, 3, 3))
    if last:
        expected = np.moveaxis(ref.conv2d(np.moveaxis(x, -1, 1), w), 1, -1)
    else:
        expected = ref.conv2d(x, w)
    assert_close(convfast.conv2d(x, w, data_format=layout_name), expected, np.float64)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xdt,wdt,bdt,result", [
    (np.float32, np.float32, np.float32, np.float32),
    (np.float32, np.float32, None, np.float32),
    (np.float16, np.float32, None, np.float32),
    (np.float16, np.float16, np.float16, np.float32),
    (np.float32, np.float64, None, np.float64),
    (np.float64, np.float32, np.float32, np.float64),
    (np.float32, np.float32, np.float64, np.float64),
    (np.int32, np.int64, None, np.float64),
    (np.int8, np.float32, None, np.float64),
    (np.uint8, np.uint8, np.int16, np.float64),
    (np.bool_, np.int64, None, np.float64),
    (np.bool_, np.bool_, np.bool_, np.float64),
])
@pytest.mark.parametrize("transposed", [False, True])
def test_dtype_promotion(xdt, wdt, bdt, result, transposed):
    rng = np.random.default_rng(1)

    def make(shape, dt):
        if np.dtype(dt).kind == "b":
            return rng.random(shape) < 0.5
        if np.dtype(dt).kind in "iu":
            return rng.integers(0, 5, shape).astype(dt)
        return rng.standard_normal(shape).astype(dt)

    x = make((2, 3, 6, 5), xdt)
    w = make((3, 4, 3, 3) if transposed else (4, 3, 3, 3), wdt)
    b = None if bdt is None else make((4,), bdt)
    f, rf = (convfast.conv_transpose2d, ref.conv_transpose2d) if transposed else (convfast.conv2d, ref.conv2d)
    y = f(x, w, b, stride=2, padding=1)
    assert y.dtype == result
    expected = rf(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                  stride=2, padding=1)
    if result == np.float64 and all(np.dtype(d).kind in "iub" for d in (xdt, wdt) + ((bdt,) if bdt else ())):
        np.testing.assert_array_equal(y, expected)  # small integers: exact in float64
    else:
        assert_close(y, expected, result, reduction_size=27)


def test_list_inputs():
    y = convfast.conv1d([[[1, 2, 3, 4]]], [[[1, -1]]])
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, [[[-1.0, -1.0, -1.0]]])


# ----------------------------------------------------------------------------------------------
# out=
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_argument(r, transposed, dtype):
    rng = np.random.default_rng(r)
    x = _rand(rng, (2, 4) + (6, 5, 4)[:r], dtype)
    if transposed:
        w, f, kw = _rand(rng, (4, 3) + (3,) * r, dtype), CONVT[r], dict(stride=2, padding=1, output_padding=1)
    else:
        w, f, kw = _rand(rng, (3, 4) + (3,) * r, dtype), CONV[r], dict(stride=2, padding="same")
    b = _rand(rng, (3,), dtype)
    expected = f(x, w, b, **kw)
    # contiguous out: the same object comes back, filled
    out = np.full(expected.shape, np.nan, dtype)
    assert f(x, w, b, out=out, **kw) is out
    np.testing.assert_array_equal(out, expected)
    # strided out: a view into a larger array; only the view is written
    big = np.full((expected.shape[0], expected.shape[1] * 2) + tuple(n * 2 + 1 for n in expected.shape[2:]),
                  -7.0, dtype)
    view = big[(slice(None), slice(None, None, 2)) + tuple(slice(1, None, 2) for _ in expected.shape[2:])]
    assert view.shape == expected.shape
    res = f(x, w, b, out=view, **kw)
    assert np.shares_memory(res, big)
    np.testing.assert_array_equal(view, expected)
    mask = np.ones(big.shape, bool)
    mask[(slice(None), slice(None, None, 2)) + tuple(slice(1, None, 2) for _ in expected.shape[2:])] = False
    assert np.all(big[mask] == -7.0)
    # channels_last result written into a channels_first buffer's transposed view
    buf = np.empty(expected.shape, dtype)
    view_cl = np.moveaxis(buf, 1, -1)
    x_cl = np.moveaxis(x, 1, -1)
    f(x_cl, w, b, data_format="channels_last", out=view_cl, **kw)
    np.testing.assert_allclose(buf, expected, rtol=1e-6 if dtype == np.float32 else 1e-13,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


def test_out_errors():
    x = np.ones((1, 2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(TypeError):
        convfast.conv2d(x, w, out=np.empty((1, 3, 3, 3), np.float64))
    with pytest.raises(ValueError):
        convfast.conv2d(x, w, out=np.empty((1, 3, 3, 4), np.float32))
    ro = np.empty((1, 3, 3, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        convfast.conv2d(x, w, out=ro)
    with pytest.raises(TypeError):
        convfast.conv2d(x, w, out=[[0.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_aliasing_input(dtype):
    rng = np.random.default_rng(2)
    x = _rand(rng, (2, 4, 7, 6), dtype)
    w = _rand(rng, (4, 4, 3, 3), dtype)
    b = _rand(rng, (4,), dtype)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding="same",
                          padding_mode="reflect")
    xc = x.copy()
    res = convfast.conv2d(xc, w, b, padding="same", padding_mode="reflect", out=xc)  # in place
    assert res is xc
    assert_close(xc, expected, dtype, reduction_size=36)
    # out overlapping the weight
    w1 = _rand(rng, (4, 4, 1, 1), dtype)
    xs = _rand(rng, (1, 4, 4, 1), dtype)
    expected = ref.conv2d(xs.astype(np.float64), w1.astype(np.float64))
    w1c = w1.copy()
    convfast.conv2d(xs, w1c, out=w1c.reshape(1, 4, 4, 1))
    assert_close(w1c.reshape(1, 4, 4, 1), expected, dtype, reduction_size=4)


# ----------------------------------------------------------------------------------------------
# Threads and ISA variants give the same answers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_isa_and_threads_agree_with_reference(dtype):
    rng = np.random.default_rng(99)
    x = _rand(rng, (3, 19, 17, 11), dtype)
    w = _rand(rng, (21, 19, 3, 3), dtype)
    wt = _rand(rng, (19, 13, 3, 3), dtype)
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), stride=2, padding="same")
    expected_t = ref.conv_transpose2d(x.astype(np.float64), wt.astype(np.float64), stride=2, padding=1)
    isa0, threads0 = convfast.get_isa(), convfast.get_num_threads()
    try:
        for isa in convfast.supported_isas():
            convfast.set_isa(isa)
            for threads in (1, 2, 3):
                convfast.set_num_threads(threads)
                assert_close(convfast.conv2d(x, w, stride=2, padding="same"), expected, dtype, reduction_size=171)
                assert_close(convfast.conv_transpose2d(x, wt, stride=2, padding=1), expected_t, dtype,
                             reduction_size=171)
    finally:
        convfast.set_isa(isa0)
        convfast.set_num_threads(threads0)


# ----------------------------------------------------------------------------------------------
# Layer objects
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(stride=2, padding="same", padding_mode="reflect"),
    dict(padding=1, dilation=2, groups=2, bias=False, padding_mode="circular"),
    dict(stride=3, padding="same_lower", groups=4, padding_mode="symmetric", data_format="channels_last"),
    dict(padding="valid", padding_mode="replicate", data_format="channels_last"),
], ids=["default", "same-s2-reflect", "d2-g2-nobias", "samelower-s3-depthwise-cl", "valid-cl"])
def test_conv_layers_match_functional(r, dtype, kw):
    rng = np.random.default_rng(r)
    kw = dict(kw)
    layout = kw.pop("data_format", "channels_first")
    layer = LAYERS[r](4, 8, 3, data_format=layout, dtype=dtype, seed=5, **kw)
    assert layer.weight.shape == (8, 4 // kw.get("groups", 1)) + (3,) * r
    assert layer.weight.dtype == dtype
    fan_in = (4 // kw.get("groups", 1)) * 3 ** r
    assert np.abs(layer.weight).max() <= 1 / math.sqrt(fan_in)
    if kw.get("bias", True):
        assert layer.bias.shape == (8,) and layer.bias.dtype == dtype
    else:
        assert layer.bias is None
    sp = (7, 6, 5)[:r]
    x = _rand(rng, (2, 4) + sp if layout == "channels_first" else (2,) + sp + (4,), dtype)
    fkw = {k: v for k, v in kw.items() if k != "bias"}
    expected = CONV[r](x, layer.weight, layer.bias, data_format=layout, **fkw)
    np.testing.assert_array_equal(layer(x), expected)
    np.testing.assert_array_equal(layer.forward(x), expected)
    out = np.empty_like(expected)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    # the same seed gives the same weights; from_weights reproduces the layer
    again = LAYERS[r](4, 8, 3, data_format=layout, dtype=dtype, seed=5, **kw)
    np.testing.assert_array_equal(again.weight, layer.weight)
    clone = LAYERS[r].from_weights(layer.weight, layer.bias, data_format=layout,
                                   **{k: v for k, v in kw.items() if k != "bias"})
    np.testing.assert_array_equal(clone(x), expected)
    # assigning new weights changes the output accordingly
    w2 = _rand(rng, layer.weight.shape, dtype)
    layer.weight = w2
    b64 = None if layer.bias is None else layer.bias.astype(np.float64)
    expected = REF_CONV[r](_to_channels_first(x, layout, True), w2.astype(np.float64), b64, **fkw)
    assert_close(layer(x), _to_caller(expected, layout, True), dtype, reduction_size=fan_in)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_transpose_layers_match_functional(r, dtype):
    rng = np.random.default_rng(r)
    layer = LAYERS_T[r](4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1, dtype=dtype, seed=1)
    assert layer.weight.shape == (4, 3) + (3,) * r
    assert layer.bias.shape == (6,)
    x = _rand(rng, (2, 4) + (4, 3, 2)[:r], dtype)
    expected = CONVT[r](x, layer.weight, layer.bias, stride=2, padding=1, output_padding=1, groups=2)
    y = layer(x)
    np.testing.assert_array_equal(y, expected)
    assert y.shape[2:] == tuple(2 * n for n in x.shape[2:])
    assert_close(y, REF_CONVT[r](x.astype(np.float64), layer.weight.astype(np.float64),
                                 layer.bias.astype(np.float64), stride=2, padding=1, output_padding=1, groups=2),
                 dtype, reduction_size=2 * 3 ** r)
    # output_size overrides the layer's output_padding
    small = tuple(2 * n - 1 for n in x.shape[2:])
    y2 = layer(x, output_size=small)
    assert y2.shape[2:] == small
    np.testing.assert_array_equal(y2, CONVT[r](x, layer.weight, layer.bias, stride=2, padding=1, groups=2))
    # "same" layer: output = input * stride
    same = LAYERS_T[r](4, 2, 4, stride=3, padding="same", bias=False, dtype=dtype, seed=2)
    ys = same(x)
    assert ys.shape == (2, 2) + tuple(3 * n for n in x.shape[2:])
    np.testing.assert_array_equal(ys, CONVT[r](x, same.weight, None, stride=3, padding="same"))
    clone = LAYERS_T[r].from_weights(layer.weight, layer.bias, stride=2, padding=1, output_padding=1, groups=2)
    np.testing.assert_array_equal(clone(x), expected)
    # channels_last layer
    cl = LAYERS_T[r](4, 6, 2, stride=2, data_format="channels_last", dtype=dtype, seed=3)
    xl = np.moveaxis(x, 1, -1)
    np.testing.assert_array_equal(cl(xl), CONVT[r](xl, cl.weight, cl.bias, stride=2, data_format="channels_last"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_layer_repeated_calls_with_varied_inputs(dtype, transposed):
    """A layer may cache per-geometry work between calls; results must not depend on the call history
    (memory layout, batch size, batchedness, weight/bias replacement, thread count)."""
    rng = np.random.default_rng(8)
    if transposed:
        layer = convfast.ConvTranspose2d(4, 6, 3, stride=2, padding=1, dtype=dtype, seed=0)
        rf, kw = ref.conv_transpose2d, dict(stride=2, padding=1)
    else:
        layer = convfast.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", dtype=dtype, seed=0)
        rf, kw = ref.conv2d, dict(padding=1, padding_mode="reflect")
    x = _rand(rng, (2, 4, 9, 8), dtype)
    inputs = [x, np.asfortranarray(x), np.repeat(x, 2, axis=-1)[..., ::2], x[:1], np.concatenate([x, x, x[:1]]),
              x[0], np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2), x]

    def check():
        for a in inputs:
            b64 = None if layer.bias is None else layer.bias.astype(np.float64)
            expected = rf(np.asarray(a, np.float64), layer.weight.astype(np.float64), b64, **kw)
            assert_close(layer(a), expected, dtype, reduction_size=36)

    check()
    layer.weight = _rand(rng, layer.weight.shape, dtype)
    check()
    layer.bias = _rand(rng, (6,), dtype)
    check()
    layer.bias = None
    check()
    # in-place edits of the weights must either be refused or be honoured, never silently ignored
    try:
        layer.weight[...] = 0.5
    except ValueError:
        pass
    check()
    threads = convfast.get_num_threads()
    try:
        convfast.set_num_threads(1)
        check()
    finally:
        convfast.set_num_threads(threads)
