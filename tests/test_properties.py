"""Property tests: every operator against the NumPy reference over random valid shapes and
parameters, and random (possibly invalid) parameters only ever raising ValueError / TypeError."""
import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import convfast
from convfast import reference

from conftest import assert_close

MODES = ["zeros", "reflect", "replicate", "circular", "symmetric"]
MODE_ALIASES = {"zeros": ["zeros", "constant"], "replicate": ["replicate", "edge"], "circular": ["circular", "wrap"],
                "reflect": ["reflect"], "symmetric": ["symmetric"]}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def eff(k, d):
    return (k - 1) * d + 1


@st.composite
def per_axis_arg(draw, values):
    """An int when every axis agrees and the draw says so, else a tuple (or list / length-1 list)."""
    values = tuple(values)
    if len(set(values)) == 1:
        form = draw(st.sampled_from(["int", "tuple", "list", "len1"]))
        if form == "int":
            return values[0]
        if form == "len1":
            return [values[0]]
        return list(values) if form == "list" else values
    return draw(st.sampled_from([tuple, list]))(values)


@st.composite
def padding_arg(draw, pairs):
    """Explicit (before, after) pairs in any accepted form."""
    pairs = tuple(tuple(p) for p in pairs)
    forms = ["pairs"]
    if all(a == b for a, b in pairs):
        forms.append("ints")
        if len(set(pairs)) == 1:
            forms.append("int")
    form = draw(st.sampled_from(forms))
    if form == "int":
        return pairs[0][0]
    if form == "ints":
        return draw(per_axis_arg([a for a, _ in pairs]))
    return draw(st.sampled_from([list, tuple]))(pairs)


def layout_view(a, kind):
    """An array equal to `a` with another memory layout."""
    if kind == "c":
        return a
    if kind == "strided":
        buf = np.full([2 * n + 1 for n in a.shape], np.nan, dtype=a.dtype)
        v = buf[tuple(slice(1, 2 * n + 1, 2) for n in a.shape)]
        v[...] = a
        return v
    if kind == "negative":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if kind == "all-negative":
        sl = (slice(None, None, -1),) * a.ndim
        return np.ascontiguousarray(a[sl])[sl]
    if kind == "fortran":
        return np.asfortranarray(a)
    raise ValueError(kind)


LAYOUTS = st.sampled_from(["c", "c", "strided", "negative", "all-negative", "fortran"])
# channels per group: mostly tiny, sometimes past a micro-kernel tile (MR/NR are 4..16)
CHANNELS = st.one_of(st.integers(1, 2), st.integers(3, 9))


@pytest.fixture(autouse=True, scope="module")
def _single_thread_for_speed():
    """One kernel thread: on small problems, waking an OpenMP team can cost milliseconds per call on
    shared machines. Thread-count independence is checked bitwise in test_threads.py."""
    n = convfast.get_num_threads()
    convfast.set_num_threads(1)
    yield
    convfast.set_num_threads(n)


@st.composite
def conv_case(draw, rank=None):
    rank = draw(st.sampled_from([1, 2, 3])) if rank is None else rank
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(CHANNELS)
    cout = groups * draw(CHANNELS)
    batch = draw(st.integers(1, 2))
    batched = draw(st.booleans()) if batch == 1 else True
    channels_last = draw(st.booleans())
    mode = draw(st.sampled_from(MODES))
    style = draw(st.sampled_from(["explicit", "explicit", "valid", "same", "same_lower"]))
    max_n = {1: 9, 2: 6, 3: 4}[rank]
    sizes, kernel, stride, dilation, pairs = [], [], [], [], []
    for _ in range(rank):
        n = draw(st.integers(1, max_n))
        s = draw(st.integers(1, 3))
        d = draw(st.integers(1, 3))
        if style == "explicit":
            cap = (n - 1) if mode == "reflect" else 3
            pb = draw(st.integers(0, cap))
            pa = draw(st.integers(0, cap))
        else:
            pb = pa = 0
        room = n + pb + pa  # the dilated kernel must fit the padded input ...
        if style in ("same", "same_lower") and mode == "reflect":
            room = n        # ... and for reflect SAME the implied pads must stay < n (eff <= n guarantees it)
        kmax = min(4, (room - 1) // d + 1)
        k = draw(st.integers(1, kmax))
        assert eff(k, d) <= room
        sizes.append(n)
        kernel.append(k)
        stride.append(s)
        dilation.append(d)
        pairs.append((pb, pa))
    if style == "explicit":
        padding = draw(padding_arg(pairs))
    else:
        padding = style if draw(st.booleans()) else style.upper()
    kwargs = dict(stride=draw(per_axis_arg(stride)), dilation=draw(per_axis_arg(dilation)), padding=padding,
                  groups=groups, padding_mode=draw(st.sampled_from(MODE_ALIASES[mode])))
    if channels_last:
        kwargs["data_format"] = draw(st.sampled_from(["channels_last", ["nwc", "nhwc", "ndhwc"][rank - 1]]))
    elif draw(st.booleans()):
        kwargs["data_format"] = "channels_first"
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    xshape = ((batch,) if batched else ()) + ((*sizes, cin) if channels_last else (cin, *sizes))
    x = rng.standard_normal(xshape).astype(dtype)
    w = rng.standard_normal((cout, cin // groups, *kernel)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if draw(st.booleans()) else None
    x = layout_view(x, draw(LAYOUTS))
    w = layout_view(w, draw(LAYOUTS))
    return rank, x, w, b, kwargs, (cin // groups) * math.prod(kernel)


@st.composite
def conv_transpose_case(draw, rank=None):
    rank = draw(st.sampled_from([1, 2, 3])) if rank is None else rank
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(CHANNELS)
    cout = groups * draw(CHANNELS)
    batch = draw(st.integers(1, 2))
    batched = draw(st.booleans()) if batch == 1 else True
    channels_last = draw(st.booleans())
    style = draw(st.sampled_from(["explicit", "explicit", "valid", "same", "same_lower"]))
    size_control = draw(st.sampled_from(["none", "output_padding", "output_size"]))
    if style in ("same", "same_lower") and size_control == "output_padding":
        size_control = "none"
    max_n = {1: 7, 2: 5, 3: 3}[rank]
    sizes, kernel, stride, dilation, pairs, ops, targets = [], [], [], [], [], [], []
    for _ in range(rank):
        n = draw(st.integers(1, max_n))
        k = draw(st.integers(1, 4))
        s = draw(st.integers(1, 3))
        d = draw(st.integers(1, 3))
        full = (n - 1) * s + eff(k, d)
        if style == "explicit":
            pb = draw(st.integers(0, min(full - 1, 4)))
            pa = draw(st.integers(0, min(full - 1 - pb, 4)))
            base = full - pb - pa
        elif style == "valid":
            pb = pa = 0
            base = full
        else:
            base = None  # fixed by the SAME rule: n * s
        op = draw(st.integers(0, max(s, d) - 1)) if size_control == "output_padding" else 0
        sizes.append(n)
        kernel.append(k)
        stride.append(s)
        dilation.append(d)
        pairs.append((pb, pa) if style == "explicit" else (0, 0))
        ops.append(op)
        if size_control == "output_size" and base is not None:
            targets.append(base + draw(st.integers(0, max(s, d) - 1)))
    if style == "explicit":
        padding = draw(padding_arg(pairs))
    else:
        padding = style
    kwargs = dict(stride=draw(per_axis_arg(stride)), dilation=draw(per_axis_arg(dilation)), padding=padding,
                  groups=groups)
    if size_control == "output_padding":
        kwargs["output_padding"] = draw(per_axis_arg(ops))
    if size_control == "output_size" and targets:
        full_shape = draw(st.booleans())
        if full_shape:  # output_size may also be the whole output shape
            lead = ((batch,) if batched else ())
            shape = lead + ((*targets, cout) if channels_last else (cout, *targets))
            kwargs["output_size"] = shape
        else:
            kwargs["output_size"] = draw(st.sampled_from([tuple, list]))(targets)
    if channels_last:
        kwargs["data_format"] = "channels_last"
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    xshape = ((batch,) if batched else ()) + ((*sizes, cin) if channels_last else (cin, *sizes))
    x = rng.standard_normal(xshape).astype(dtype)
    w = rng.standard_normal((cin, cout // groups, *kernel)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if draw(st.booleans()) else None
    x = layout_view(x, draw(LAYOUTS))
    w = layout_view(w, draw(LAYOUTS))
    return rank, x, w, b, kwargs, (cin // groups) * math.prod(kernel)


def _run_and_compare(name, x, w, b, kwargs, K):
    note(f"{name} x{x.shape}{x.dtype} strides {x.strides} w{w.shape} strides {w.strides} bias={b is not None} "
         f"{kwargs}")
    xs, ws = x.copy(), w.copy()
    y = getattr(convfast, name)(x, w, b, **kwargs)
    expected = getattr(reference, name)(x, w, b, **kwargs)
    assert np.array_equal(x, xs, equal_nan=True) and np.array_equal(w, ws, equal_nan=True), "input mutated"
    assert y.dtype == expected.dtype == x.dtype
    assert y.flags.c_contiguous
    assert_close(y, expected, dtype=x.dtype, reduction_size=K)
    return y


# ------------------------------------------------------------------------------------------------
# forward convolutions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 3])
@given(data=st.data())
def test_conv_matches_reference(rank, data):
    rank, x, w, b, kwargs, K = data.draw(conv_case(rank))
    _run_and_compare(f"conv{rank}d", x, w, b, kwargs, K)


@pytest.mark.parametrize("rank", [1, 2, 3])
@given(data=st.data())
def test_conv_transpose_matches_reference(rank, data):
    rank, x, w, b, kwargs, K = data.draw(conv_transpose_case(rank))
    y = _run_and_compare(f"conv_transpose{rank}d", x, w, b, kwargs, K)
    if kwargs.get("output_size") is not None:
        cl = kwargs.get("data_format") == "channels_last"
        want = tuple(kwargs["output_size"])
        if len(want) != rank:
            want = want[-rank - 1:-1] if cl else want[-rank:]
        spatial = y.shape[-rank - 1:-1] if cl else y.shape[-rank:]
        assert tuple(spatial) == want


@given(case=conv_case())
def test_conv_same_padding_output_size(case):
    rank, x, w, b, kwargs, K = case
    if not isinstance(kwargs["padding"], str) or kwargs["padding"].lower() not in ("same", "same_lower"):
        return
    cl = kwargs.get("data_format", "channels_first") != "channels_first"
    y = getattr(convfast, f"conv{rank}d")(x, w, b, **kwargs)
    in_sp = x.shape[-rank - 1:-1] if cl else x.shape[-rank:]
    out_sp = y.shape[-rank - 1:-1] if cl else y.shape[-rank:]
    stride = kwargs["stride"]
    stride = (stride,) * rank if isinstance(stride, int) else tuple(stride) * (rank if len(stride) == 1 else 1)
    assert tuple(out_sp) == tuple(-(-n // s) for n, s in zip(in_sp, stride))


@given(case=conv_case(), data=st.data())
def test_conv_out_argument_and_layout_consistency(case, data):
    """out= gives the same bits as a fresh call; channels_last equals channels_first moved."""
    rank, x, w, b, kwargs, K = case
    name = f"conv{rank}d"
    op = getattr(convfast, name)
    y = op(x, w, b, **kwargs)
    out = np.full(y.shape, np.nan, dtype=y.dtype)
    if data.draw(st.booleans()):
        out = np.full([2 * n for n in y.shape], np.nan, dtype=y.dtype)[(slice(None, None, 2),) * y.ndim]
    assert op(x, w, b, out=out, **kwargs) is out
    assert np.array_equal(out, y)
    # the same problem in the other layout
    cl = kwargs.get("data_format", "channels_first") != "channels_first"
    caxis = -1 if cl else (1 if x.ndim == rank + 2 else 0)
    other = np.moveaxis(x, caxis, (1 if x.ndim == rank + 2 else 0) if cl else -1)
    kw2 = dict(kwargs, data_format="channels_first" if cl else "channels_last")
    y2 = op(other, w, b, **kw2)
    back = np.moveaxis(y2, (1 if y.ndim == rank + 2 else 0) if cl else -1, caxis)
    assert_close(back, y, dtype=x.dtype, reduction_size=K)


@given(case=conv_case())
def test_conv_unbatched_equals_batched(case):
    rank, x, w, b, kwargs, K = case
    if x.ndim != rank + 2:
        return
    op = getattr(convfast, f"conv{rank}d")
    y = op(x, w, b, **kwargs)
    y0 = op(x[0], w, b, **kwargs)
    assert np.array_equal(y0, y[0])


# ------------------------------------------------------------------------------------------------
# adjointness: <conv(x), y> == <x, conv_transpose(y)> with the same stride/padding/dilation/groups
# ------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_transpose_is_adjoint_of_conv(data):
    rank = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.integers(1, 2))
    cin, cout = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 2))
    sizes, kernel, stride, dilation, pads = [], [], [], [], []
    for _ in range(rank):
        n = data.draw(st.integers(1, {1: 9, 2: 6, 3: 4}[rank]))
        d = data.draw(st.integers(1, 2))
        pb, pa = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
        k = data.draw(st.integers(1, min(3, (n + pb + pa - 1) // d + 1)))
        sizes.append(n)
        kernel.append(k)
        stride.append(data.draw(st.integers(1, 3)))
        dilation.append(d)
        pads.append((pb, pa))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cin, *sizes))
    w = rng.standard_normal((cout, cin // groups, *kernel))
    kw = dict(stride=stride, padding=pads, dilation=dilation, groups=groups)
    y = getattr(convfast, f"conv{rank}d")(x, w, **kw)
    g = rng.standard_normal(y.shape)
    # conv_transpose weight layout (C_in_t = cout, C_out_t/groups = cin/groups): the conv weight itself
    in_spatial = y.shape[2:]
    exact = [convfast.conv_output_shape(n, k, s, p, d)[0] for n, k, s, p, d in zip(sizes, kernel, stride,
                                                                                     [[p] for p in pads], dilation)]
    assert tuple(exact) == tuple(in_spatial)
    xt = getattr(convfast, f"conv_transpose{rank}d")(g, w, stride=stride, padding=pads, dilation=dilation,
                                                     groups=groups, output_size=sizes)
    assert xt.shape == x.shape
    lhs, rhs = float(np.vdot(y, g)), float(np.vdot(x, xt))
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs), np.abs(y).sum() * np.abs(g).max())


# ------------------------------------------------------------------------------------------------
# layers agree with the functional ops
# ------------------------------------------------------------------------------------------------
@given(case=conv_case())
def test_conv_layer_from_weights_matches_functional(case):
    rank, x, w, b, kwargs, K = case
    cls = getattr(convfast, f"Conv{rank}d")
    layer = cls.from_weights(w, b, **kwargs)
    y = layer(x)
    assert y.dtype == w.dtype
    assert np.array_equal(y, getattr(convfast, f"conv{rank}d")(x, w, b, **kwargs))


@given(case=conv_transpose_case())
def test_conv_transpose_layer_matches_functional(case):
    rank, x, w, b, kwargs, K = case
    kwargs = dict(kwargs)
    output_size = kwargs.pop("output_size", None)
    layer = getattr(convfast, f"ConvTranspose{rank}d").from_weights(w, b, **kwargs)
    y = layer(x, output_size=output_size)
    assert np.array_equal(y, getattr(convfast, f"conv_transpose{rank}d")(x, w, b, output_size=output_size,
                                                                          **kwargs))


# ------------------------------------------------------------------------------------------------
# the shape helpers agree with the operators
# ------------------------------------------------------------------------------------------------
@given(case=conv_case())
def test_conv_output_shape_helper(case):
    rank, x, w, b, kwargs, K = case
    cl = kwargs.get("data_format", "channels_first") != "channels_first"
    in_sp = x.shape[-rank - 1:-1] if cl else x.shape[-rank:]
    y = getattr(convfast, f"conv{rank}d")(x, w, b, **kwargs)
    out_sp = y.shape[-rank - 1:-1] if cl else y.shape[-rank:]
    assert convfast.conv_output_shape(in_sp, w.shape[2:], kwargs["stride"], kwargs["padding"],
                                      kwargs["dilation"]) == tuple(out_sp)


@given(case=conv_transpose_case())
def test_conv_transpose_output_shape_helper(case):
    rank, x, w, b, kwargs, K = case
    if "output_size" in kwargs:
        return
    cl = kwargs.get("data_format", "channels_first") != "channels_first"
    in_sp = x.shape[-rank - 1:-1] if cl else x.shape[-rank:]
    y = getattr(convfast, f"conv_transpose{rank}d")(x, w, b, **kwargs)
    out_sp = y.shape[-rank - 1:-1] if cl else y.shape[-rank:]
    assert convfast.conv_transpose_output_shape(in_sp, w.shape[2:], kwargs["stride"], kwargs["padding"],
                                                kwargs.get("output_padding", 0), kwargs["dilation"]) == tuple(out_sp)


# ------------------------------------------------------------------------------------------------
# invalid (or random) parameters: only ValueError / TypeError, never anything else
# ------------------------------------------------------------------------------------------------
JUNK_INT = st.one_of(st.integers(-2, 5), st.sampled_from([0, -1, True, False, 1.0, 2.5, None, "2", (), (1,),
                                                          (1, 2), (1, 2, 3), [0], [[1, 2]], np.int64(2),
                                                          np.array([1, 1]), np.float32(1)]))
JUNK_PAD = st.one_of(st.integers(-2, 5), st.sampled_from(["valid", "same", "SAME", "same_lower", "full", "", None,
                                                          1.5, (1, 2), [(1, 2)], [(1, 2)] * 2, [(1, 2)] * 3,
                                                          [(-1, 0)], [(1, 2, 3)], [(True, 0)], (0,)]))
JUNK_MODE = st.sampled_from(MODES + ["constant", "edge", "wrap", "mirror", "", None, 0, "REFLECT"])
JUNK_FORMAT = st.sampled_from(["channels_first", "channels_last", "NHWC", "ncl", "nc", None, 1])
JUNK_DTYPE = st.sampled_from([np.float32, np.float64, np.int32, np.bool_, np.float16, np.complex64, object, "U2"])


@given(data=st.data())
def test_random_parameters_only_raise_value_or_type_error(data):
    rank = data.draw(st.sampled_from([1, 2, 3]))
    transposed = data.draw(st.booleans())
    name = f"conv_transpose{rank}d" if transposed else f"conv{rank}d"
    xnd = data.draw(st.integers(rank, rank + 3))
    xshape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=xnd, max_size=xnd)))
    wnd = data.draw(st.integers(rank + 1, rank + 3))
    wshape = tuple(data.draw(st.lists(st.integers(0, 3), min_size=wnd, max_size=wnd)))
    xdt, wdt = data.draw(JUNK_DTYPE), data.draw(JUNK_DTYPE)
    x = np.ones(xshape, dtype=xdt)
    w = np.ones(wshape, dtype=wdt)
    b = data.draw(st.one_of(st.none(), st.integers(0, 4).map(lambda n: np.ones(n)),
                            st.just(np.ones((2, 2))), st.just(np.ones(2, complex))))
    kwargs = dict(stride=data.draw(JUNK_INT), padding=data.draw(JUNK_PAD), dilation=data.draw(JUNK_INT),
                  groups=data.draw(JUNK_INT), data_format=data.draw(JUNK_FORMAT))
    if transposed:
        kwargs["output_padding"] = data.draw(JUNK_INT)
        kwargs["output_size"] = data.draw(st.one_of(st.none(), JUNK_INT))
    else:
        kwargs["padding_mode"] = data.draw(JUNK_MODE)
    note(f"{name} x{xshape} {xdt} w{wshape} {wdt} bias {None if b is None else b.shape} {kwargs}")
    xs, ws = x.copy(), w.copy()
    try:
        y = getattr(convfast, name)(x, w, b, **kwargs)
    except (ValueError, TypeError) as exc:
        assert name in str(exc), f"message does not name {name}: {exc}"
        # the reference validates identically
        with pytest.raises(type(exc)):
            getattr(reference, name)(x, w, b, **kwargs)
    else:
        expected = getattr(reference, name)(x, w, b, **kwargs)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        assert_close(y, expected, dtype=y.dtype, reduction_size=max(1, int(np.prod(wshape[1:]))))
    assert np.array_equal(x, xs) and np.array_equal(w, ws)


@given(data=st.data())
def test_random_helper_arguments_only_raise_value_or_type_error(data):
    spatial = data.draw(st.one_of(JUNK_INT, st.lists(st.integers(-1, 6), min_size=0, max_size=4)))
    kernel = data.draw(st.one_of(JUNK_INT, st.lists(st.integers(-1, 4), min_size=0, max_size=4)))
    kw = dict(stride=data.draw(JUNK_INT), dilation=data.draw(JUNK_INT))
    for func, extra in [(convfast.conv_output_shape, dict(padding=data.draw(JUNK_PAD))),
                        (convfast.conv_transpose_output_shape, dict(padding=data.draw(JUNK_PAD),
                                                                    output_padding=data.draw(JUNK_INT))),
                        (convfast.same_padding, {})]:
        try:
            out = func(spatial, kernel, **kw, **extra)
        except (ValueError, TypeError) as exc:
            assert func.__name__ in str(exc)
        else:
            assert isinstance(out, tuple)


# ------------------------------------------------------------------------------------------------
# pad against np.pad
# ------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_pad_matches_numpy(data):
    ndim = data.draw(st.integers(1, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    dtype = data.draw(st.sampled_from([np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64,
                                       np.complex128, np.bool_]))
    mode = data.draw(st.sampled_from(["constant", "reflect", "edge", "wrap", "symmetric"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = (rng.standard_normal(shape) * 50).astype(dtype) if dtype != np.bool_ else rng.random(shape) > 0.5
    a = layout_view(a, data.draw(st.sampled_from(["c", "negative", "all-negative", "fortran"])))
    widths = [(data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9))) for _ in range(ndim)]
    form = data.draw(st.sampled_from(["pairs", "dict", "scalar"]))
    if form == "dict":
        pad_width = {i: p for i, p in enumerate(widths) if p != (0, 0)}
    elif form == "scalar":
        pad_width = widths[0][0]
    else:
        pad_width = widths
    kwargs = {}
    if mode == "constant" and data.draw(st.booleans()):
        kwargs["constant_values"] = [(int(rng.integers(0, 100)), int(rng.integers(0, 100))) for _ in range(ndim)]
    keep = a.copy()
    got = convfast.pad(a, pad_width, mode, **kwargs)
    want = np.pad(a, pad_width, mode, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    assert np.array_equal(a, keep)
