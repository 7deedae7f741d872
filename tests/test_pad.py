"""convfast.pad is a drop-in for np.pad: exactly equal results (values, dtype, shape) for every
argument form, mode, dtype, layout and width, including widths larger than the axis."""
import itertools

import numpy as np
import pytest

import convfast

COMPILED_MODES = ["constant", "reflect", "edge", "wrap", "symmetric"]
ALIASES = {"zeros": "constant", "replicate": "edge", "circular": "wrap"}
DTYPES = [np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64, np.complex128, np.bool_]


def sample(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dtype)


def assert_same(actual, expected):
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.array_equal(actual, expected, equal_nan=actual.dtype.kind in "fc"), (actual, expected)


def check(array, pad_width, mode="constant", **kwargs):
    before = np.array(array, copy=True)
    got = convfast.pad(array, pad_width, mode, **kwargs)
    np_mode = ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    want = np.pad(array, pad_width, np_mode, **kwargs)
    assert_same(got, want)
    if isinstance(array, np.ndarray):
        assert np.array_equal(array, before, equal_nan=array.dtype.kind in "fc"), "input mutated"
        assert not np.shares_memory(got, array)
    return got


# ------------------------------------------------------------------------------------------------
# modes x ranks x dtypes
# ------------------------------------------------------------------------------------------------
SHAPES = {1: (5,), 2: (4, 3), 3: (3, 2, 4), 4: (2, 3, 1, 2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", COMPILED_MODES + list(ALIASES))
def test_modes_ranks_dtypes(mode, ndim, dtype):
    a = sample(SHAPES[ndim], dtype, seed=ndim)
    widths = [((i + 1) % 3, (2 * i) % 3) for i in range(ndim)]
    check(a, widths, mode)
    check(a, 1, mode)
    check(a, 0, mode)


# ------------------------------------------------------------------------------------------------
# every pad_width form np.pad accepts
# ------------------------------------------------------------------------------------------------
PAD_WIDTH_FORMS = [
    2, np.int64(1), np.int8(1), (3,), [2], (1, 2), [0, 3], ((1, 2),), ((2, 0), (1, 3)),
    [[2, 1], [0, 2]], [(1, 1), (2, 2)], np.array([[1, 2], [3, 0]]), np.array([1, 2]), np.array(2),
    ((1,), (2,)), [[1], [2]], {0: 1}, {1: (2, 0)}, {-1: 3}, {0: (1, 2), 1: 1}, {}, ((0, 0), (0, 0)),
]


@pytest.mark.parametrize("pad_width", PAD_WIDTH_FORMS, ids=[repr(p) for p in PAD_WIDTH_FORMS])
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_pad_width_forms(mode, pad_width):
    a = sample((3, 4), np.int32, seed=5)
    try:
        want = np.pad(a, pad_width, mode)
    except Exception as exc:  # pragma: no cover - the form list only holds forms np.pad accepts
        pytest.fail(f"np.pad rejects {pad_width!r}: {exc}")
    assert_same(convfast.pad(a, pad_width, mode), want)


@pytest.mark.parametrize("pad_width", [(2, 1), ((2, 1),), [3], 2, {0: (0, 4)}])
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_pad_width_forms_1d(mode, pad_width):
    check(np.arange(1, 6, dtype=np.int16), pad_width, mode)


def test_pad_width_per_axis_3d_and_dict_mixed():
    a = sample((2, 3, 4), np.float64, seed=6)
    for mode in COMPILED_MODES:
        check(a, ((1, 0), (0, 2), (3, 1)), mode)
        check(a, [(1, 1), (2, 2), (0, 0)], mode)
        check(a, {0: 1, 2: (0, 2)}, mode)
        check(a, {-3: (2, 0), -1: 1}, mode)


# ------------------------------------------------------------------------------------------------
# widths larger than the axis: multiple reflections / wraps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", ["reflect", "symmetric", "wrap", "edge", "constant"])
def test_widths_larger_than_axis(mode, n):
    a = np.arange(1, n + 1, dtype=np.int64)
    for before, after in [(n, n), (n + 1, 0), (0, 2 * n + 1), (3 * n + 2, 4 * n - 1), (7 * n + 3, 5 * n + 4),
                          (17, 23)]:
        check(a, (before, after), mode)


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "wrap", "edge"])
def test_widths_larger_than_axis_2d(mode):
    a = sample((2, 3), np.float32, seed=7)
    check(a, ((5, 7), (8, 4)), mode)
    check(a, ((9, 0), (0, 10)), mode)
    b = sample((1, 4, 2), np.int16, seed=8)
    check(b, ((3, 2), (9, 9), (5, 6)), mode)


# ------------------------------------------------------------------------------------------------
# constant_values in every form, with the corner rule of np.pad
# ------------------------------------------------------------------------------------------------
CONSTANT_FORMS = [
    0, 7, -3, 2.5, (5,), (1, 9), [[1, 2]], ((1, 2), (3, 4)), [[10, 20], [30, 40]], np.array([[1, 2], [3, 4]]),
    [[5], [6]], np.array(9),
]


@pytest.mark.parametrize("constant_values", CONSTANT_FORMS, ids=[repr(c) for c in CONSTANT_FORMS])
@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.uint8, np.complex128])
def test_constant_values_forms_2d(constant_values, dtype):
    a = sample((3, 4), dtype, seed=9)
    check(a, ((2, 1), (1, 3)), "constant", constant_values=constant_values)
    check(a, 2, "zeros", constant_values=constant_values)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_constant_corner_rule_per_axis_per_side(ndim):
    # a distinct constant for every (axis, side): every corner region shows which one np.pad keeps
    a = np.zeros((2,) * ndim, dtype=np.int64)
    values = tuple((10 * (i + 1) + 1, 10 * (i + 1) + 2) for i in range(ndim))
    for widths in [1, ((1, 2),) * ndim, tuple((i % 2, (i + 1) % 3 + 1) for i in range(ndim))]:
        check(a, widths, "constant", constant_values=values)
        check(a.astype(np.float32), widths, "constant", constant_values=values)


def test_constant_values_cast_like_numpy():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    check(a, 1, "constant", constant_values=-1)          # wraps to 255 like np.pad
    check(a, 1, "constant", constant_values=300)
    check(a, 1, "constant", constant_values=2.7)         # truncated like np.pad
    check(a.astype(np.int16), 2, "constant", constant_values=((1.9, -1.9), (700, 3)))
    check(np.array([True, False]), 2, "constant", constant_values=(0, 5))
    f = np.arange(4, dtype=np.float32)
    check(f, 2, "constant", constant_values=(np.nan, np.inf))
    check(f.astype(np.complex128), 1, "constant", constant_values=(1 + 2j, -3j))


def test_dict_pad_width_with_numpy_integer_keys_and_widths():
    # np.pad indexes a list with the dict keys, so NumPy integers work as axes
    a = sample((3, 4), np.int16, seed=16)
    for pad_width in [{np.int64(0): 1}, {np.int32(-1): (2, 1)}, {np.intp(1): 2, 0: (0, 1)}]:
        check(a, pad_width, "constant")
        check(a, pad_width, "reflect")


@pytest.mark.parametrize("dtype, constant_values", [
    (np.int8, 300), (np.int8, (1, 300)), (np.int16, ((0, 1), (2, 10**6))), (np.int64, np.nan), (np.int32, (0, np.inf)),
    (np.uint8, ((1, 2), (3, 1000))),
])
def test_unrepresentable_constant_values_rejected_like_numpy(dtype, constant_values):
    """Where np.pad refuses a constant that the dtype cannot hold, the drop-in must refuse too rather
    than write a wrapped or undefined value."""
    a = np.arange(6).reshape(2, 3).astype(dtype)
    try:
        want = np.pad(a, 1, "constant", constant_values=constant_values)
    except (ValueError, OverflowError, TypeError) as exc:
        with pytest.raises((ValueError, OverflowError, TypeError)):
            got = convfast.pad(a, 1, "constant", constant_values=constant_values)
            pytest.fail(f"np.pad raises {type(exc).__name__}({exc}); convfast.pad returned {got.tolist()}")
    else:
        assert_same(convfast.pad(a, 1, "constant", constant_values=constant_values), want)


def test_constant_values_ignored_rules_for_other_modes_match_numpy():
    a = np.arange(5)
    # np.pad rejects constant_values for non-constant modes; convfast must agree on the outcome
    for mode in ["reflect", "edge", "wrap", "symmetric"]:
        with pytest.raises(ValueError):
            np.pad(a, 1, mode, constant_values=3)
        try:
            got = convfast.pad(a, 1, mode, constant_values=3)
        except ValueError:
            continue
        # convfast's explicit constant_values parameter may be ignored for other modes, but then the
        # result must be the mode's own result
        assert_same(got, np.pad(a, 1, mode))


# ------------------------------------------------------------------------------------------------
# layouts: non-contiguous, negative strides, Fortran, read-only, non-native, zero strides
# ------------------------------------------------------------------------------------------------
def _layouts(a):
    yield "c", a
    yield "step", np.repeat(np.repeat(a, 2, axis=0), 3, axis=-1)[::2, ..., ::3]
    yield "negative", np.ascontiguousarray(a[::-1, ..., ::-1])[::-1, ..., ::-1]
    yield "negative-view", a[::-1, ..., ::-1]
    yield "fortran", np.asfortranarray(a)
    yield "transposed", a.T
    ro = a.copy()
    ro.setflags(write=False)
    yield "readonly", ro
    if a.dtype.itemsize > 1 and a.dtype.kind != "b":
        yield "bigendian", a.astype(a.dtype.newbyteorder(">"))
    yield "broadcast", np.broadcast_to(a[:1], a.shape)
    raw = np.zeros(a.nbytes + 1, np.uint8)
    un = raw[1:].view(a.dtype).reshape(a.shape)
    un[...] = a
    yield "unaligned", un


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64, np.complex128])
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_layouts(mode, dtype):
    base = sample((3, 4, 5), dtype, seed=10)
    for name, a in _layouts(base):
        got = convfast.pad(a, ((1, 2), (0, 3), (4, 1)), mode)
        want = np.pad(a, ((1, 2), (0, 3), (4, 1)), mode)
        assert_same(got, want)
        assert got.flags.c_contiguous and got.flags.writeable, name
        assert got.dtype == a.dtype, name
        assert not np.shares_memory(got, a), name


def test_inputs_not_mutated():
    a = sample((4, 5), np.float64, seed=11)
    keep = a.copy()
    for mode in COMPILED_MODES:
        convfast.pad(a, 3, mode)
        convfast.pad(a[::-1, ::2], ((1, 0), (2, 2)), mode)
    assert np.array_equal(a, keep)


def test_other_containers():
    check([1, 2, 3], 2, "reflect")
    check([[1, 2], [3, 4]], ((1, 0), (0, 1)), "wrap")
    check((1.5, 2.5), 1, "edge")
    check(np.float64(3.0), 2, "constant")          # 0-d arrays: np.pad returns them unchanged
    check(np.array(5), 1, "reflect")


@pytest.mark.parametrize("dtype", [np.float16, np.complex64, np.int8, np.uint64, "U3", "S2", "datetime64[s]",
                                   object])
def test_other_dtypes(dtype):
    if dtype == object:
        a = np.array([1, "a", None, 2.5], dtype=object)
    elif dtype in ("U3", "S2"):
        a = np.array(["ab", "c", "de"], dtype=dtype)
    elif dtype == "datetime64[s]":
        a = np.array(["2020-01-01", "2021-06-30", "1999-12-31"], dtype=dtype)
    else:
        a = sample((4,), dtype, seed=12)
    for mode in ["reflect", "edge", "wrap", "symmetric"]:
        check(a, (2, 3), mode)
    if dtype not in ("datetime64[s]",):
        check(a, (2, 3), "constant")


# ------------------------------------------------------------------------------------------------
# empty arrays and empty axes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4), (0, 0)])
def test_empty_axes(shape):
    a = np.zeros(shape, dtype=np.float32)
    # constant: any axis may be extended
    check(a, 1, "constant", constant_values=4)
    check(a, ((2, 1),) + ((0, 0),) * (a.ndim - 1), "constant", constant_values=((1, 2),) * a.ndim)
    # other modes: np.pad's error when an empty axis is extended, and fine when it is not
    for mode in ["reflect", "edge", "wrap", "symmetric"]:
        with pytest.raises(ValueError, match="empty axis"):
            np.pad(a, 1, mode)
        with pytest.raises(ValueError, match="empty axis"):
            convfast.pad(a, 1, mode)
        widths = [(0, 0) if n == 0 else (1, 2) for n in shape]
        check(a, widths, mode)


# ------------------------------------------------------------------------------------------------
# delegated modes and options: np.pad's exact result
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, kwargs", [
    ("linear_ramp", {}), ("linear_ramp", {"end_values": (5, -2)}), ("maximum", {}), ("minimum", {}),
    ("mean", {}), ("median", {}), ("mean", {"stat_length": 2}), ("maximum", {"stat_length": ((1, 2), (2, 1))}),
    ("reflect", {"reflect_type": "odd"}), ("symmetric", {"reflect_type": "odd"}),
    ("reflect", {"reflect_type": "even"}), ("symmetric", {"reflect_type": "even"}), ("empty", {}),
])
@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_delegated_modes(mode, kwargs, dtype):
    a = sample((4, 5), dtype, seed=13)
    got = convfast.pad(a, ((2, 3), (1, 4)), mode, **kwargs)
    want = np.pad(a, ((2, 3), (1, 4)), mode, **kwargs)
    if mode == "empty":
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(got[2:6, 1:6], a)
    else:
        assert_same(got, want)


def test_callable_mode_delegated():
    def pad_with(vector, pad_width, iaxis, kwargs):
        pad_value = kwargs.get("padder", 10)
        vector[:pad_width[0]] = pad_value
        vector[-pad_width[1]:] = pad_value

    a = np.arange(6).reshape((2, 3))
    assert_same(convfast.pad(a, 2, pad_with), np.pad(a, 2, pad_with))
    assert_same(convfast.pad(a, 2, pad_with, padder=100), np.pad(a, 2, pad_with, padder=100))


def test_unknown_mode_is_rejected_like_numpy():
    a = np.arange(4)
    with pytest.raises(ValueError):
        np.pad(a, 1, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        convfast.pad(a, 1, "bogus")


# ------------------------------------------------------------------------------------------------
# exhaustive small sweep: all width pairs 0..7 on tiny axes, every compiled mode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_exhaustive_small_1d(mode):
    for n in range(1, 5):
        a = np.arange(10, 10 + n, dtype=np.int16)
        for before, after in itertools.product(range(8), repeat=2):
            assert_same(convfast.pad(a, (before, after), mode), np.pad(a, (before, after), mode))


@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_exhaustive_small_2d(mode):
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    for w in itertools.product(range(4), repeat=4):
        pw = ((w[0], w[1]), (w[2], w[3]))
        kw = {"constant_values": ((1, 2), (3, 4))} if mode == "constant" else {}
        assert_same(convfast.pad(a, pw, mode, **kw), np.pad(a, pw, mode, **kw))


def test_large_array_parallel_path():
    # big enough for the multi-threaded row loop
    a = sample((64, 300), np.float32, seed=14)
    for mode in COMPILED_MODES:
        check(a, ((5, 70), (301, 2)), mode)
    b = sample((3, 40, 50, 30), np.int16, seed=15)
    check(b, ((1, 1), (2, 0), (0, 3), (4, 4)), "reflect")
    check(b, ((1, 1), (2, 0), (0, 3), (4, 4)), "constant", constant_values=((1, 2), (3, 4), (5, 6), (7, 8)))
