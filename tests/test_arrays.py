"""Array handling: every memory layout, byte order, alignment and dtype convfast accepts gives the
reference result, writes only what it should, and never mutates its inputs."""
import hashlib

import numpy as np
import pytest

import convfast
from convfast import reference

from conftest import assert_close

# name -> (rank, transposed, x shape, weight shape, kwargs)
CONFIGS = {
    "conv1d": (1, False, (2, 4, 13), (6, 2, 3), dict(stride=2, padding=[(1, 2)], dilation=2, groups=2)),
    "conv2d": (2, False, (2, 4, 9, 8), (6, 4, 3, 2), dict(stride=(2, 1), padding="same")),
    "conv2d_reflect": (2, False, (2, 3, 7, 6), (5, 3, 3, 3), dict(padding=2, padding_mode="reflect")),
    "conv3d": (3, False, (1, 2, 5, 6, 4), (4, 1, 2, 3, 2), dict(stride=(1, 2, 1), padding=1, groups=2)),
    # wide: more output channels than one micro-kernel tile (NR) in either dtype
    "conv1d_wide": (1, False, (2, 3, 10), (19, 3, 3), dict(padding=1)),
    "conv2d_wide": (2, False, (1, 5, 6, 5), (33, 5, 2, 2), dict(padding="same_lower", padding_mode="symmetric")),
    "conv_transpose1d": (1, True, (2, 4, 7), (4, 3, 3), dict(stride=3, padding=1, output_padding=2, groups=2)),
    "conv_transpose2d": (2, True, (2, 3, 5, 4), (3, 4, 3, 2), dict(stride=2, padding=(1, 0), dilation=(1, 2))),
    "conv_transpose3d": (3, True, (1, 2, 3, 4, 3), (2, 3, 2, 2, 3), dict(stride=(2, 1, 2), padding="same")),
    "conv_transpose2d_wide": (2, True, (1, 3, 5, 4), (3, 21, 2, 3), dict(stride=2, output_size=(10, 10))),
}


def op_name(cfg):
    rank, transposed = CONFIGS[cfg][:2]
    return f"conv_transpose{rank}d" if transposed else f"conv{rank}d"


def make(cfg, dtype=np.float64, seed=0):
    rank, transposed, xs, ws, kwargs = CONFIGS[cfg]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    cout = ws[1] * kwargs.get("groups", 1) if transposed else ws[0]
    b = rng.standard_normal(cout).astype(dtype)
    return x, w, b, dict(kwargs)


def K(cfg):
    """reduction size, for the float32 tolerance"""
    _, transposed, xs, ws, kw = CONFIGS[cfg]
    return int(np.prod(ws[1:])) if not transposed else int(ws[0] // kw.get("groups", 1) * np.prod(ws[2:]))


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a)
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(str((a.shape, a.dtype.str, a.strides, a.flags.writeable)).encode())
    return h.hexdigest()


def relayout(a, kind, seed=0):
    """An array equal to `a` with a different memory layout (or byte order / alignment / flags)."""
    a = np.asarray(a)
    if kind == "c":
        return a.copy()
    if kind == "strided":  # every axis stepped by 2 inside a NaN-filled buffer
        buf = np.full([2 * n + 1 for n in a.shape], np.nan if a.dtype.kind == "f" else 77, dtype=a.dtype)
        v = buf[tuple(slice(1, 2 * n + 1, 2) for n in a.shape)]
        v[...] = a
        return v
    if kind == "negative":  # every axis reversed
        buf = np.empty_like(a)
        v = buf[(slice(None, None, -1),) * a.ndim]
        v[...] = a
        return v
    if kind == "last-reversed":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "permuted":  # memory order is a random permutation of the axes
        perm = np.random.default_rng(seed).permutation(a.ndim)
        buf = np.empty([a.shape[p] for p in perm], dtype=a.dtype)
        v = np.transpose(buf, np.argsort(perm))
        v[...] = a
        return v
    if kind == "readonly":
        v = a.copy()
        v.setflags(write=False)
        return v
    if kind == "bigendian":
        return a.astype(a.dtype.newbyteorder(">"))
    if kind == "unaligned":
        raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
        v = raw[1:].view(a.dtype).reshape(a.shape)
        v[...] = a
        assert not v.flags.aligned or a.dtype.itemsize == 1
        return v
    raise ValueError(kind)


LAYOUTS = ["c", "strided", "negative", "last-reversed", "fortran", "permuted", "readonly", "bigendian",
           "unaligned"]


def check(cfg, x, w, b, kwargs, *, dtype, data_format="channels_first", out=None):
    """Run convfast and the reference on the same arrays; check value, dtype, layout, no mutation."""
    name = op_name(cfg)
    before = digest(x, w, b)
    y = getattr(convfast, name)(x, w, b, data_format=data_format, out=out, **kwargs)
    assert digest(x, w, b) == before, "inputs were mutated"
    expected = getattr(reference, name)(x, w, b, data_format=data_format, **kwargs)
    assert y.dtype == np.dtype(dtype)
    assert expected.dtype == np.dtype(dtype)
    assert_close(y, expected, dtype=dtype, reduction_size=K(cfg))
    if out is None:
        assert y.flags.c_contiguous and y.flags.writeable and y.flags.owndata
        for a in (x, w, b):
            if isinstance(a, np.ndarray):
                assert not np.shares_memory(y, a)
    else:
        assert y is out
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_input_layouts(cfg, layout, dtype):
    x, w, b, kw = make(cfg, dtype)
    check(cfg, relayout(x, layout), w, b, kw, dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_weight_and_bias_layouts(cfg, layout):
    x, w, b, kw = make(cfg, np.float32, seed=1)
    check(cfg, x, relayout(w, layout, seed=3), relayout(b, layout), kw, dtype=np.float32)


@pytest.mark.parametrize("lx, lw, lb", [("negative", "strided", "negative"), ("strided", "negative", "strided"),
                                        ("bigendian", "unaligned", "bigendian"), ("permuted", "fortran", "unaligned")])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_everything_non_contiguous_at_once(cfg, lx, lw, lb):
    x, w, b, kw = make(cfg, np.float64, seed=2)
    check(cfg, relayout(x, lx), relayout(w, lw, seed=5), relayout(b, lb), kw, dtype=np.float64)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_broadcast_zero_stride_inputs(cfg):
    x, w, b, kw = make(cfg, np.float64, seed=4)
    xb = np.broadcast_to(x[:1], x.shape)            # every batch item the same memory
    wb = np.broadcast_to(w[..., :1], w.shape)       # constant along the last kernel axis
    y = check(cfg, xb, wb, b, kw, dtype=np.float64)
    assert np.array_equal(y[0], y[-1])


@pytest.mark.parametrize("src_dtype, result", [
    (np.int32, np.float64), (np.int64, np.float64), (np.uint8, np.float64), (np.int8, np.float64),
    (np.bool_, np.float64), (np.float16, np.float32),
])
@pytest.mark.parametrize("cfg", ["conv1d", "conv2d_reflect", "conv3d", "conv_transpose2d"])
def test_integer_bool_float16_inputs(cfg, src_dtype, result):
    rank, transposed, xs, ws, kw = CONFIGS[cfg]
    rng = np.random.default_rng(5)
    if src_dtype == np.bool_:
        x, w = rng.random(xs) > 0.5, rng.random(ws) > 0.5
    elif src_dtype == np.float16:
        x, w = rng.standard_normal(xs).astype(np.float16), rng.standard_normal(ws).astype(np.float16)
    else:
        x, w = rng.integers(0, 7, xs).astype(src_dtype), rng.integers(-3 if src_dtype != np.uint8 else 0, 4,
                                                                       ws).astype(src_dtype)
    y = check(cfg, x, w, None, kw, dtype=result)
    # integers are computed exactly in float64
    if result == np.float64:
        exact = getattr(reference, op_name(cfg))(x.astype(np.int64), w.astype(np.int64), **kw)
        assert np.array_equal(y, exact)


@pytest.mark.parametrize("dx, dw, db, result", [
    (np.float32, np.float32, np.float32, np.float32),
    (np.float32, np.float32, None, np.float32),
    (np.float32, np.float64, None, np.float64),
    (np.float64, np.float32, np.float32, np.float64),
    (np.float32, np.float32, np.float64, np.float64),
    (np.float16, np.float32, np.float16, np.float32),
    (np.int32, np.float32, None, np.float64),
    (np.float32, np.bool_, None, np.float64),
])
@pytest.mark.parametrize("cfg", ["conv2d", "conv_transpose1d"])
def test_mixed_dtypes(cfg, dx, dw, db, result):
    x, w, b, kw = make(cfg, np.float64, seed=6)
    x = x.astype(dx) if dx != np.int32 else (x * 3).astype(dx)
    w = (w > 0) if dw == np.bool_ else w.astype(dw)
    b = None if db is None else b.astype(db)
    check(cfg, x, w, b, kw, dtype=result)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_python_lists(cfg):
    x, w, b, kw = make(cfg, np.float64, seed=7)
    y = getattr(convfast, op_name(cfg))(x.tolist(), w.tolist(), b.tolist(), **kw)
    assert y.dtype == np.float64
    assert_close(y, getattr(reference, op_name(cfg))(x, w, b, **kw), dtype=np.float64)


@pytest.mark.parametrize("view", ["moveaxis", "moveaxis-strided", "moveaxis-negative", "contiguous-cl",
                                  "fortran-cl"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_channels_last_views(cfg, dtype, view):
    x, w, b, kw = make(cfg, dtype, seed=8)
    expected_cf = getattr(reference, op_name(cfg))(x, w, b, **kw)
    if view == "moveaxis":
        xl = np.moveaxis(x, 1, -1)                                  # not contiguous
    elif view == "moveaxis-strided":
        xl = np.moveaxis(relayout(x, "strided"), 1, -1)
    elif view == "moveaxis-negative":
        xl = np.moveaxis(relayout(x, "negative"), 1, -1)
    elif view == "contiguous-cl":
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    else:
        xl = np.asfortranarray(np.moveaxis(x, 1, -1))
    y = check(cfg, xl, w, b, kw, dtype=dtype, data_format="channels_last")
    assert_close(np.moveaxis(y, -1, 1), expected_cf, dtype=dtype, reduction_size=K(cfg))


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_unbatched(cfg, data_format):
    x, w, b, kw = make(cfg, np.float32, seed=9)
    x1 = x[1] if x.shape[0] > 1 else x[0]
    if data_format == "channels_last":
        x1 = np.moveaxis(x1, 0, -1)
    y = check(cfg, x1, w, b, kw, dtype=np.float32, data_format=data_format)
    batched = getattr(convfast, op_name(cfg))(x1[None], w, b, data_format=data_format, **kw)
    assert y.shape == batched.shape[1:]
    assert np.array_equal(y, batched[0])


@pytest.mark.parametrize("out_kind", ["c", "strided", "negative", "fortran", "permuted", "channels_last_view"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_out_layouts(cfg, out_kind):
    x, w, b, kw = make(cfg, np.float64, seed=10)
    name = op_name(cfg)
    shape = getattr(reference, name)(x, w, b, **kw).shape
    if out_kind == "strided":
        buf = np.full([2 * n + 1 for n in shape], -123.0)
        out = buf[tuple(slice(1, 2 * n + 1, 2) for n in shape)]
    elif out_kind == "negative":
        buf = np.full(shape, -123.0)
        out = buf[(slice(None, None, -1),) * len(shape)]
    elif out_kind == "fortran":
        buf = out = np.asfortranarray(np.full(shape, -123.0))
    elif out_kind == "permuted":
        buf = np.full(shape[::-1], -123.0)
        out = buf.T
    elif out_kind == "channels_last_view":
        buf = np.full((shape[0],) + shape[2:] + (shape[1],), -123.0)
        out = np.moveaxis(buf, -1, 1)
    else:
        buf = out = np.full(shape, -123.0)
    outside = None
    if out_kind == "strided":
        mask = np.ones(buf.shape, bool)
        mask[tuple(slice(1, 2 * n + 1, 2) for n in shape)] = False
        outside = mask
    y = check(cfg, x, w, b, kw, dtype=np.float64, out=out)
    assert y is out
    if outside is not None:
        assert np.all(buf[outside] == -123.0), "wrote outside the out view"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, rank, transposed", [
    ("conv1d", 1, False), ("conv2d", 2, False), ("conv3d", 3, False),
    ("conv_transpose1d", 1, True), ("conv_transpose2d", 2, True), ("conv_transpose3d", 3, True),
])
def test_out_aliases_input(name, rank, transposed, dtype):
    rng = np.random.default_rng(11)
    c = 3
    x = rng.standard_normal((2, c) + (5,) * rank).astype(dtype)
    w = rng.standard_normal((c, c) + (3,) * rank).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    kw = dict(padding="same") if not transposed else dict(padding=1)
    expected = getattr(reference, name)(x, w, b, **kw)
    assert expected.shape == x.shape
    op = getattr(convfast, name)
    # out is x itself
    xx = x.copy()
    y = op(xx, w, b, out=xx, **kw)
    assert y is xx
    assert_close(xx, expected, dtype=dtype, reduction_size=c * 3 ** rank)
    # out is x seen through a different view (reversed channels): partial, shifted overlap
    xx = x.copy()
    out = xx[:, ::-1]
    op(xx, w, b, out=out, **kw)
    assert_close(out, expected, dtype=dtype, reduction_size=c * 3 ** rank)
    # out overlaps x with an offset inside a shared buffer
    buf = np.zeros((2 * x.size + 7,), dtype)
    xin = buf[3:3 + x.size].reshape(x.shape)
    xin[...] = x
    out = buf[5:5 + x.size].reshape(x.shape)
    op(xin, w, b, out=out, **kw)
    assert_close(out, expected, dtype=dtype, reduction_size=c * 3 ** rank)


def test_out_aliases_weight_and_bias():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 1, 4))
    w = rng.standard_normal((1, 1, 2))
    expected = reference.conv1d(x, w, dilation=2)  # shape (1, 1, 2), the weight's shape
    wcopy = w.copy()
    y = convfast.conv1d(x, wcopy, out=wcopy, dilation=2)
    assert y is wcopy
    assert_close(wcopy, expected, dtype=np.float64)
    bias = rng.standard_normal(3)
    x3 = rng.standard_normal((3, 1))
    w3 = rng.standard_normal((3, 3, 1))
    expected = reference.conv1d(x3, w3, bias)  # unbatched -> (3, 1), the bias seen as a column
    bb = bias.copy()
    convfast.conv1d(x3, w3, bb, out=bb[:, None])
    assert_close(bb[:, None], expected, dtype=np.float64)


@pytest.mark.parametrize("cfg", ["conv2d", "conv_transpose3d"])
def test_results_are_independent_arrays(cfg):
    x, w, b, kw = make(cfg, np.float32, seed=13)
    op = getattr(convfast, op_name(cfg))
    y1 = op(x, w, b, **kw)
    y2 = op(x, w, b, **kw)
    assert not np.shares_memory(y1, y2)
    assert np.array_equal(y1, y2)
    y1[...] = 0  # the result is writeable and owned
    assert np.array_equal(y2, op(x, w, b, **kw))


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_empty_batch_and_zero_channels(cfg):
    rank, transposed, xs, ws, kw = CONFIGS[cfg]
    kw = {k: v for k, v in kw.items() if k != "groups"}
    op = getattr(convfast, op_name(cfg))
    rng = np.random.default_rng(14)
    w = rng.standard_normal((ws[0], ws[1]) + ws[2:])
    cin = w.shape[0] if transposed else w.shape[1]
    cout = w.shape[1] if transposed else w.shape[0]
    x0 = np.zeros((0, cin) + xs[2:])
    y0 = op(x0, w, **kw)
    full = op(rng.standard_normal((1, cin) + xs[2:]), w, **kw)
    assert y0.shape == (0,) + full.shape[1:] and y0.dtype == np.float64
    # zero input channels: the sum over nothing is 0, plus the bias
    if transposed:
        wz = np.zeros((0, cout) + ws[2:])
    else:
        wz = np.zeros((cout, 0) + ws[2:])
    b = rng.standard_normal(cout)
    yz = op(np.zeros((2, 0) + xs[2:]), wz, b, **kw)
    expected = getattr(reference, op_name(cfg))(np.zeros((2, 0) + xs[2:]), wz, b, **kw)
    assert yz.shape == expected.shape
    assert np.array_equal(yz, np.broadcast_to(b.reshape((1, -1) + (1,) * rank), yz.shape))


@pytest.mark.parametrize("layer_cls, rank, transposed", [
    (convfast.Conv2d, 2, False), (convfast.ConvTranspose1d, 1, True), (convfast.Conv3d, 3, False),
])
@pytest.mark.parametrize("layout", ["strided", "negative", "bigendian", "readonly", "fortran"])
def test_layers_accept_any_layout(layer_cls, rank, transposed, layout):
    layer = layer_cls(4, 6, 3, stride=2, padding=1, seed=0)
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 4) + (7,) * rank).astype(np.float32)
    xl = relayout(x, layout)
    before = digest(xl)
    y = layer(xl)
    assert digest(xl) == before
    name = f"conv_transpose{rank}d" if transposed else f"conv{rank}d"
    expected = getattr(reference, name)(x, layer.weight, layer.bias, stride=2, padding=1)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    assert_close(y, expected, dtype=np.float32, reduction_size=4 * 3 ** rank)


@pytest.mark.parametrize("layer_cls, name, kw", [
    (convfast.Conv2d, "conv2d", dict(padding=1, groups=2)),
    (convfast.Conv1d, "conv1d", dict(padding="same", padding_mode="circular", dilation=2)),
    (convfast.ConvTranspose2d, "conv_transpose2d", dict(stride=2, padding=1, output_padding=1)),
    (convfast.ConvTranspose3d, "conv_transpose3d", dict(stride=(1, 2, 2), padding="same")),
])
def test_layer_repeated_calls_with_varying_arrays(layer_cls, name, kw):
    """A layer reused across batch sizes, unbatched input, layouts, dtypes, out= and new weights
    (layers may cache compiled state between calls) always gives the reference result."""
    layer = layer_cls(4, 6, 3, seed=0, dtype=np.float64, **kw)
    rank = int(name[-2])
    rng = np.random.default_rng(16)
    sp = (6,) * rank

    def expect(x):
        return getattr(reference, name)(x, layer.weight, layer.bias, **kw)

    def run(x, dtype=np.float64, **call_kw):
        before = digest(x)
        y = layer(x, **call_kw)
        assert digest(x) == before
        assert_close(y, expect(x), dtype=dtype, reduction_size=4 * 3 ** rank)
        return y

    base = rng.standard_normal((2, 4) + sp)
    run(base[:1])
    run(rng.standard_normal((3, 4) + sp))
    run(rng.standard_normal((4,) + sp))
    for layout in ("fortran", "strided", "negative", "permuted", "bigendian", "unaligned"):
        run(relayout(base, layout))
    run(base.astype(np.float32))  # float32 x with float64 weights: computed in float64
    run(rng.standard_normal((2, 4) + (7,) * rank))  # a different geometry
    run(base)
    ref = layer(base)
    out = np.zeros(ref.shape[::-1]).T
    assert layer(base, out=out) is out
    assert np.array_equal(out, ref)
    layer.bias = np.linspace(-1, 1, 6)
    run(base)
    layer.weight = rng.standard_normal(layer.weight.shape)
    run(base)
    run(relayout(base, "negative"))
    # the layer's parameters cannot be changed in place behind its back
    with pytest.raises(ValueError):
        layer.weight[...] = 0
