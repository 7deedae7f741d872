"""Shape, SAME-padding and receptive-field arithmetic against closed forms written out here, the
seed tutorials' worked examples, and the shapes the operators actually produce."""
import math

import numpy as np
import pytest

import convfast
from convfast import conv_output_shape, conv_transpose_output_shape, receptive_field, same_padding

CONV = {1: convfast.conv1d, 2: convfast.conv2d, 3: convfast.conv3d}
CONVT = {1: convfast.conv_transpose1d, 2: convfast.conv_transpose2d, 3: convfast.conv_transpose3d}


# ----------------------------------------------------------------------------------------------
# Closed forms, written independently of convfast
# ----------------------------------------------------------------------------------------------

def f_conv_out(n, k, s, d, before, after):
    return math.floor((n + before + after - d * (k - 1) - 1) / s) + 1


def f_convt_out(n, k, s, d, before, after, op):
    return (n - 1) * s - before - after + d * (k - 1) + 1 + op


def f_same(n, k, s, d, lower=False):
    out = math.ceil(n / s)
    total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
    before = total // 2 if not lower else total - total // 2
    return before, total - before


def f_receptive_field(layers):
    """size_l = size_{l-1} + d(k-1) * jump_{l-1}; jump_l = jump_{l-1} * s;
    start_l = start_{l-1} + (d(k-1)/2 - before) * jump_{l-1}."""
    size, jump, start, out = 1, 1, 0.0, []
    for k, s, d, before in layers:
        size += d * (k - 1) * jump
        start += (d * (k - 1) / 2 - before) * jump
        jump *= s
        out.append((size, jump, start))
    return out


# ----------------------------------------------------------------------------------------------
# conv_output_shape / conv_transpose_output_shape / same_padding
# ----------------------------------------------------------------------------------------------

def _random_params(seed, count):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        r = int(rng.integers(1, 4))
        k = tuple(int(rng.integers(1, 8)) for _ in range(r))
        s = tuple(int(rng.integers(1, 5)) for _ in range(r))
        d = tuple(int(rng.integers(1, 4)) for _ in range(r))
        pads = tuple((int(rng.integers(0, 4)), int(rng.integers(0, 4))) for _ in range(r))
        n = tuple(d_ * (k_ - 1) + 1 + int(rng.integers(0, 30)) for k_, d_ in zip(k, d))
        yield r, n, k, s, d, pads


@pytest.mark.parametrize("params", list(_random_params(1, 200)), ids=str)
def test_conv_output_shape_closed_form(params):
    r, n, k, s, d, pads = params
    assert conv_output_shape(n, k, s, pads, d) == tuple(
        f_conv_out(*a, *p) for a, p in zip(zip(n, k, s, d), pads))
    sym = tuple(p[0] for p in pads)
    assert conv_output_shape(n, k, s, sym, d) == tuple(f_conv_out(nn, kk, ss, dd, p, p)
                                                       for nn, kk, ss, dd, p in zip(n, k, s, d, sym))
    assert conv_output_shape(n, k, s, "valid", d) == tuple(f_conv_out(nn, kk, ss, dd, 0, 0)
                                                           for nn, kk, ss, dd in zip(n, k, s, d))
    for style, lower in (("same", False), ("same_lower", True)):
        expected = tuple(math.ceil(nn / ss) for nn, ss in zip(n, s))
        assert conv_output_shape(n, k, s, style, d) == expected
        fp = tuple(f_same(nn, kk, ss, dd, lower) for nn, kk, ss, dd in zip(n, k, s, d))
        assert same_padding(n, k, s, d, lower=lower) == fp
        assert tuple(f_conv_out(nn, kk, ss, dd, *p) for nn, kk, ss, dd, p in zip(n, k, s, d, fp)) == expected


@pytest.mark.parametrize("params", list(_random_params(2, 150)), ids=str)
def test_conv_transpose_output_shape_closed_form(params):
    r, n, k, s, d, pads = params
    rng = np.random.default_rng(sum(n) + sum(k))
    op = tuple(int(rng.integers(0, max(ss, dd))) for ss, dd in zip(s, d))
    expected = tuple(f_convt_out(nn, kk, ss, dd, a, b, o) for nn, kk, ss, dd, (a, b), o in zip(n, k, s, d, pads, op))
    if min(expected) >= 1:
        assert conv_transpose_output_shape(n, k, s, pads, op, d) == expected
    else:  # the padding crops the whole output
        with pytest.raises(ValueError):
            conv_transpose_output_shape(n, k, s, pads, op, d)
    # "same": output = input * stride
    assert conv_transpose_output_shape(n, k, s, "same", 0, d) == tuple(nn * ss for nn, ss in zip(n, s))
    assert conv_transpose_output_shape(n, k, s, "same_lower", 0, d) == tuple(nn * ss for nn, ss in zip(n, s))
    assert conv_transpose_output_shape(n, k, s, "valid", 0, d) == tuple(
        f_convt_out(nn, kk, ss, dd, 0, 0, 0) for nn, kk, ss, dd in zip(n, k, s, d))


def test_impossible_shapes_raise():
    with pytest.raises(ValueError):
        conv_output_shape(4, 5)                      # kernel larger than the input
    with pytest.raises(ValueError):
        conv_output_shape(4, 3, dilation=2)          # dilated kernel 5 > 4
    assert conv_output_shape(4, 3, dilation=2, padding=((0, 1),)) == (1,)
    with pytest.raises(ValueError):
        conv_transpose_output_shape(4, 3, stride=2, output_padding=2)   # output_padding >= stride
    assert conv_transpose_output_shape(4, 3, stride=1, dilation=3, output_padding=2) == (4 - 1 + 2 * 3 + 1 + 2,)
    with pytest.raises(ValueError):
        receptive_field([{"kernel_size": 3, "stride": 2, "padding": "same"}])  # depends on the input size


def test_scalar_and_broadcast_arguments():
    assert conv_output_shape(10, 3) == (8,)
    assert conv_output_shape((10, 12), 3, stride=2, padding=1) == (5, 6)
    assert conv_output_shape((10, 12), (3, 5), stride=(1, 2), padding=((0, 1), (2, 2)), dilation=(2, 1)) == \
        (f_conv_out(10, 3, 1, 2, 0, 1), f_conv_out(12, 5, 2, 1, 2, 2))
    assert conv_transpose_output_shape(4, 3, 2, 1, 1) == (8,)
    assert same_padding(10, 3, 2) == ((0, 1),)
    assert same_padding((10, 11), 3, 2) == ((0, 1), (1, 1))


@pytest.mark.parametrize("n,k,s,d,expected_out,upper", [
    (10, 3, 2, 1, 5, (0, 1)),
    (11, 3, 2, 1, 6, (1, 1)),
    (224, 7, 2, 1, 112, (2, 3)),
    (225, 7, 2, 1, 113, (3, 3)),
    (7, 3, 3, 1, 3, (1, 1)),
    (8, 3, 3, 1, 3, (0, 1)),
    (9, 3, 3, 1, 3, (0, 0)),
    (10, 2, 1, 1, 10, (0, 1)),
    (10, 3, 1, 2, 10, (2, 2)),
    (10, 4, 1, 2, 10, (3, 3)),
    (10, 1, 4, 1, 3, (0, 0)),
    (5, 5, 2, 1, 3, (2, 2)),
    (6, 5, 2, 1, 3, (1, 2)),
])
def test_same_padding_worked_examples(n, k, s, d, expected_out, upper):
    # the literal values are worked by hand; the closed form must agree with them too
    assert math.ceil(n / s) == expected_out
    assert f_same(n, k, s, d) == upper
    assert same_padding(n, k, s, d) == (upper,)
    assert same_padding(n, k, s, d, lower=True) == (upper[::-1],)  # same_lower mirrors SAME_UPPER
    assert conv_output_shape(n, k, s, "same", d) == (expected_out,)
    assert conv_output_shape(n, k, s, "same_lower", d) == (expected_out,)
    x = np.arange(n, dtype=np.float64)[None, None]
    assert convfast.conv1d(x, np.ones((1, 1, k)), stride=s, dilation=d, padding="same").shape == (1, 1, expected_out)


@pytest.mark.parametrize("seed", range(60))
def test_operator_shapes_equal_helpers(seed):
    """Output shape of actual convfast ops == conv_output_shape / conv_transpose_output_shape == closed form."""
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 4))
    k = tuple(int(rng.integers(1, 4)) for _ in range(r))
    s = tuple(int(rng.integers(1, 4)) for _ in range(r))
    d = tuple(int(rng.integers(1, 3)) for _ in range(r))
    n = tuple(dd * (kk - 1) + 1 + int(rng.integers(0, 6)) for kk, dd in zip(k, d))
    style = ["int", "pairs", "valid", "same", "same_lower"][seed % 5]
    if style == "int":
        padding = int(rng.integers(0, 3))
        pads = ((padding, padding),) * r
    elif style == "pairs":
        padding = pads = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(r))
    elif style == "valid":
        padding, pads = "valid", ((0, 0),) * r
    else:
        padding = style
        pads = tuple(f_same(nn, kk, ss, dd, style == "same_lower") for nn, kk, ss, dd in zip(n, k, s, d))
    cin, cout = 2, 3
    x = np.zeros((1, cin) + n, np.float32)
    y = CONV[r](x, np.zeros((cout, cin) + k, np.float32), stride=s, padding=padding, dilation=d)
    closed = tuple(f_conv_out(nn, kk, ss, dd, *p) for nn, kk, ss, dd, p in zip(n, k, s, d, pads))
    assert y.shape == (1, cout) + closed
    assert conv_output_shape(n, k, s, padding, d) == closed
    # channels_last and unbatched give the same spatial shape
    assert CONV[r](np.zeros(n + (cin,), np.float32), np.zeros((cout, cin) + k, np.float32), stride=s,
                   padding=padding, dilation=d, data_format="channels_last").shape == closed + (cout,)
    # transposed
    op = tuple(int(rng.integers(0, max(ss, dd))) for ss, dd in zip(s, d)) if style not in ("same", "same_lower") \
        else (0,) * r
    if style in ("same", "same_lower"):
        closed_t = tuple(nn * ss for nn, ss in zip(n, s))
        tpad = style
    else:
        tp = tuple(min(p[0], (dd * (kk - 1)) // 2) for p, kk, dd in zip(pads, k, d))  # keep the output non-empty
        tpad = tp
        closed_t = tuple(f_convt_out(nn, kk, ss, dd, p, p, o) for nn, kk, ss, dd, p, o in zip(n, k, s, d, tp, op))
    yt = CONVT[r](x, np.zeros((cin, cout) + k, np.float32), stride=s, padding=tpad, output_padding=op, dilation=d)
    assert yt.shape == (1, cout) + closed_t
    assert conv_transpose_output_shape(n, k, s, tpad, op, d) == closed_t


# ----------------------------------------------------------------------------------------------
# The seed tutorials' worked examples
# ----------------------------------------------------------------------------------------------

def test_transposed_4x4_to_8x8():
    # nn.ConvTranspose2d(1, 1, kernel_size=3, stride=2, padding=1, output_padding=1): 4x4 -> 8x8
    assert (4 - 1) * 2 - 2 * 1 + 3 + 1 == 8
    assert conv_transpose_output_shape((4, 4), 3, stride=2, padding=1, output_padding=1) == (8, 8)
    layer = convfast.ConvTranspose2d(1, 1, kernel_size=3, stride=2, padding=1, output_padding=1, seed=0)
    x = np.random.default_rng(0).random((1, 1, 4, 4)).astype(np.float32)
    assert layer(x).shape == (1, 1, 8, 8)
    assert layer(x, output_size=(7, 7)).shape == (1, 1, 7, 7)
    assert convfast.conv_transpose2d(x, layer.weight, stride=2, padding=1).shape == (1, 1, 7, 7)


def test_resnet_stem_arithmetic():
    # 7x7 stride-2 conv with padding 3: 224 -> 112; 3x3 stride-2 max pool with padding 1: 112 -> 56
    assert (224 + 2 * 3 - 7) // 2 + 1 == 112
    assert (112 + 2 * 1 - 3) // 2 + 1 == 56
    assert conv_output_shape((224, 224), 7, stride=2, padding=3) == (112, 112)
    assert conv_output_shape((112, 112), 3, stride=2, padding=1) == (56, 56)
    # TF-style SAME gives the same 112 with pads (2, 3)
    assert conv_output_shape((224, 224), 7, stride=2, padding="same") == (112, 112)
    assert same_padding((224, 224), 7, stride=2) == ((2, 3), (2, 3))
    assert same_padding((224, 224), 7, stride=2, lower=True) == ((3, 2), (3, 2))
    x = np.random.default_rng(0).random((1, 3, 224, 224)).astype(np.float32)
    stem = convfast.Conv2d(3, 8, 7, stride=2, padding=3, seed=0)
    assert stem(x).shape == (1, 8, 112, 112)
    assert convfast.Conv2d(3, 8, 7, stride=2, padding="same", seed=0)(x).shape == (1, 8, 112, 112)
    # the pooling window arithmetic, checked by running a (linear) 3x3 stride-2 pad-1 window
    pooled = convfast.conv2d(stem(x)[:, :1], np.ones((1, 1, 3, 3), np.float32), stride=2, padding=1)
    assert pooled.shape == (1, 1, 56, 56)


@pytest.mark.parametrize("n", [32, 31, 224, 7])
def test_vgg_3x3_pad1_keeps_size(n):
    assert (n + 2 - 3) // 1 + 1 == n
    assert conv_output_shape((n, n), 3, padding=1) == (n, n)
    assert conv_output_shape((n, n), 3, padding="same") == (n, n)
    assert same_padding((n, n), 3) == ((1, 1), (1, 1))
    x = np.zeros((1, 4, n, n), np.float32)
    h = x
    for _ in range(3):
        h = convfast.Conv2d(h.shape[1], 6, 3, padding=1, seed=0)(h)
        assert h.shape == (1, 6, n, n)


def test_small_3d_cnn_stack():
    """Conv3d 1->8 k3 p1 keeps the volume; k3 s2 p1 halves it (rounding up); a transposed k3 s2 p1 op1
    brings it back."""
    x = np.random.default_rng(0).random((2, 1, 16, 15, 9)).astype(np.float32)
    c1 = convfast.Conv3d(1, 8, 3, padding=1, seed=0)
    c2 = convfast.Conv3d(8, 16, 3, stride=2, padding=1, seed=1)
    c3 = convfast.Conv3d(16, 16, 3, padding="same", stride=2, seed=2)
    h1 = c1(x)
    assert h1.shape == (2, 8, 16, 15, 9)
    assert conv_output_shape((16, 15, 9), 3, padding=1) == (16, 15, 9)
    h2 = c2(h1)
    expected = tuple((n + 2 - 3) // 2 + 1 for n in (16, 15, 9))
    assert expected == (8, 8, 5)
    assert h2.shape == (2, 16) + expected
    assert conv_output_shape((16, 15, 9), 3, stride=2, padding=1) == expected
    h3 = c3(h2)
    assert h3.shape == (2, 16) + tuple(math.ceil(n / 2) for n in expected) == (2, 16, 4, 4, 3)
    up = convfast.ConvTranspose3d(16, 8, 3, stride=2, padding=1, output_padding=1, seed=3)
    assert up(h2).shape == (2, 8, 16, 16, 10)
    assert conv_transpose_output_shape(expected, 3, stride=2, padding=1, output_padding=1) == (16, 16, 10)
    # channels_last (Keras layout) gives the same spatial shapes
    c1l = convfast.Conv3d(1, 8, 3, padding=1, seed=0, data_format="channels_last")
    assert c1l(np.moveaxis(x, 1, -1)).shape == (2, 16, 15, 9, 8)


def test_unet_like_down_up_round_trip():
    # "same" down by 2 then "same" transposed up by 2 returns to the input size for even sizes
    for n in (64, 48, 10):
        down = conv_output_shape((n, n), 3, stride=2, padding="same")
        assert down == (n // 2, n // 2)
        assert conv_transpose_output_shape(down, 3, stride=2, padding="same") == (n, n)
        assert conv_transpose_output_shape(down, 2, stride=2) == (n, n)


# ----------------------------------------------------------------------------------------------
# Receptive field
# ----------------------------------------------------------------------------------------------

def test_receptive_field_stacked_3x3():
    recs = receptive_field([{"kernel_size": 3}] * 4)
    assert [r.size for r in recs] == [3, 5, 7, 9]
    assert [r.jump for r in recs] == [1, 1, 1, 1]
    assert [r.start for r in recs] == [1, 2, 3, 4]
    # with "same" (padding 1) the first output's field is centred on pixel 0
    recs = receptive_field([{"kernel_size": 3, "padding": 1}] * 3)
    assert [r.size for r in recs] == [3, 5, 7]
    assert [r.start for r in recs] == [0, 0, 0]
    assert receptive_field([{"kernel_size": 3, "padding": "same"}] * 3) == recs


def test_receptive_field_dilated_stack():
    recs = receptive_field([{"kernel_size": 3, "dilation": d} for d in (1, 2, 4)])
    assert [r.size for r in recs] == [3, 7, 15]
    assert [r.jump for r in recs] == [1, 1, 1]
    assert receptive_field([{"kernel_size": 3, "dilation": 2}])[0].size == 5


def test_receptive_field_jump_multiplies_by_strides():
    strides = (2, 1, 3, 2)
    recs = receptive_field([{"kernel_size": 3, "stride": s} for s in strides])
    assert [r.jump for r in recs] == [2, 2, 6, 12]
    assert [r.size for r in recs] == [3, 3 + 2 * 2, 7 + 2 * 2, 11 + 2 * 6]
    # ResNet stem: 7x7/2 pad 3 then 3x3/2 pad 1 pooling -> size 11, jump 4
    stem = receptive_field([{"kernel_size": 7, "stride": 2, "padding": 3},
                            {"kernel_size": 3, "stride": 2, "padding": 1}])
    assert (stem[-1].size, stem[-1].jump) == (11, 4)
    assert stem[-1].start == 0 + (3 - 3) * 1 + (1 - 1) * 2 == 0


@pytest.mark.parametrize("seed", range(40))
def test_receptive_field_closed_form(seed):
    rng = np.random.default_rng(seed)
    layers, spec = [], []
    for _ in range(int(rng.integers(1, 6))):
        k, s, d = int(rng.integers(1, 8)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
        style = int(rng.integers(0, 3))
        if style == 0:
            p = int(rng.integers(0, 4))
            layers.append({"kernel_size": k, "stride": s, "dilation": d, "padding": p})
            before = p
        elif style == 1:
            pb, pa = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            layers.append({"kernel_size": k, "stride": s, "dilation": d, "padding": [(pb, pa)]})
            before = pb
        else:
            layers.append({"kernel_size": k, "stride": s, "dilation": d, "padding": "valid"})
            before = 0
        spec.append((k, s, d, before))
    got = receptive_field(layers)
    want = f_receptive_field(spec)
    assert len(got) == len(want)
    for g, (size, jump, start) in zip(got, want):
        gs = g.size if np.ndim(g.size) == 0 else g.size[0]
        gj = g.jump if np.ndim(g.jump) == 0 else g.jump[0]
        gst = g.start if np.ndim(g.start) == 0 else g.start[0]
        assert (gs, gj) == (size, jump)
        assert gst == pytest.approx(start, abs=0)


def test_receptive_field_per_axis():
    recs = receptive_field([{"kernel_size": (3, 5), "stride": (2, 1)}, {"kernel_size": 3, "dilation": (1, 2)}])
    assert recs[0].size == (3, 5) and recs[0].jump == (2, 1)
    assert recs[1].size == (3 + 2 * 2, 5 + 4 * 1) and recs[1].jump == (2, 1)


@pytest.mark.parametrize("layers", [
    [(3, 1, 1, 1), (3, 1, 1, 1), (3, 1, 1, 1)],
    [(3, 2, 1, 1), (3, 2, 1, 1), (3, 1, 1, 0)],
    [(3, 1, 1, 2), (3, 1, 2, 4), (3, 1, 4, 0)],
    [(5, 2, 1, 2), (3, 3, 2, 1), (2, 1, 1, 0)],
    [(4, 2, 1, 1), (1, 1, 1, 0), (3, 2, 1, 3)],
], ids=str)
def test_receptive_field_matches_actual_dependence(layers):
    """Push a delta at an interior output back through the stack with transposed all-ones kernels:
    the non-zero input pixels are exactly the field [centre - (size-1)/2, centre + (size-1)/2] with
    centre = start + j * jump."""
    n = 96
    sizes = [n]
    for k, s, d, p in layers:
        sizes.append(f_conv_out(sizes[-1], k, s, d, p, p))
    recs = receptive_field([{"kernel_size": k, "stride": s, "dilation": d, "padding": p} for k, s, d, p in layers])
    last = recs[-1]
    # forward check that the stack is what we think it is
    h = np.ones((1, 1, n))
    for k, s, d, p in layers:
        h = convfast.conv1d(h, np.ones((1, 1, k)), stride=s, dilation=d, padding=p)
    assert h.shape[-1] == sizes[-1]
    j = sizes[-1] // 2  # an interior output pixel
    g = np.zeros((1, 1, sizes[-1]))
    g[0, 0, j] = 1.0
    for (k, s, d, p), n_in in zip(reversed(layers), reversed(sizes[:-1])):
        g = convfast.conv_transpose1d(g, np.ones((1, 1, k)), stride=s, dilation=d, padding=p, output_size=(n_in,))
    nz = np.nonzero(g[0, 0])[0]
    centre = last.start + j * last.jump
    assert nz.min() >= 0 and nz.max() < n  # interior: not clipped by the image
    assert nz.max() - nz.min() + 1 == last.size
    assert (nz.min() + nz.max()) / 2 == centre
