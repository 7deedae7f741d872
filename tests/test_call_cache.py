"""The per-call fast path (functional._CALLS, layers' kept plans): a call whose signature was seen
before skips the normalisation. Every variation of a call must still give the reference's result and
the full path's errors, whichever call came first."""
import numpy as np
import pytest

import convfast
from convfast import functional, reference
from convfast._spec import conv_spec, conv_transpose_spec


def _ref(x, w, b=None, **kw):
    spec = conv_spec("conv2d", 2, x, w, b, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                     kw.get("groups", 1), kw.get("padding_mode", "zeros"), kw.get("data_format", "channels_first"))
    return reference.conv_reference(spec, x, w, b)


def _check(y, expected):
    tol = 1e-5 if y.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * max(1.0, float(np.abs(expected).max())))


@pytest.fixture(autouse=True)
def _fresh_cache():
    functional._CALLS.clear()
    yield
    functional._CALLS.clear()


def test_repeated_call_is_cached_and_equal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    first = convfast.conv2d(x, w, b, padding=1)
    assert len(functional._CALLS) == 1
    second = convfast.conv2d(x, w, b, padding=1)
    np.testing.assert_array_equal(first, second)
    _check(second, _ref(x, w, b, padding=1))
    # new values, same signature: the kept call reads the new operands
    x2, w2, b2 = x * 2 + 1, w[::-1].copy(), -b
    _check(convfast.conv2d(x2, w2, b2, padding=1), _ref(x2, w2, b2, padding=1))
    assert len(functional._CALLS) == 1


@pytest.mark.parametrize("change", ["shape", "dtype", "stride", "padding", "dilation", "layout", "transposed_view",
                                    "bias", "no_bias", "padding_mode", "groups"])
def test_any_change_of_signature_gives_the_right_result(change):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 10, 11)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    kw = dict(stride=1, padding=1)
    convfast.conv2d(x, w, b, **kw)
    convfast.conv2d(x, w, b, **kw)
    if change == "shape":
        x = rng.standard_normal((2, 4, 7, 5)).astype(np.float32)
    elif change == "dtype":
        x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    elif change == "stride":
        kw["stride"] = (2, 1)
    elif change == "padding":
        kw["padding"] = ((0, 2), (1, 0))
    elif change == "dilation":
        kw["dilation"] = 2
    elif change == "layout":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        kw["data_format"] = "channels_last"
    elif change == "transposed_view":
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # same shape, other strides
    elif change == "bias":
        b = rng.standard_normal(4).astype(np.float32)[::-1]  # negative stride
    elif change == "no_bias":
        b = None
    elif change == "padding_mode":
        kw["padding_mode"] = "reflect"
    elif change == "groups":
        w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
        kw["groups"] = 2
    for _ in range(2):  # the first call and the kept one
        y = convfast.conv2d(x, w, b, **kw)
        if change == "layout":
            expected = _ref(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), w, b, **{k: v for k, v in kw.items()
                                                                                  if k != "data_format"})
            expected = expected.transpose(0, 2, 3, 1)
        else:
            expected = _ref(x, w, b, **kw)
        _check(y, expected)


@pytest.mark.parametrize("bad", [dict(stride=True), dict(stride=1.0), dict(groups=True), dict(padding=(1.0, 1)),
                                 dict(dilation=(1, False))])
def test_values_equal_to_a_kept_signature_still_raise(bad):
    x = np.ones((1, 2, 6, 6), np.float32)
    w = np.ones((2, 2, 3, 3), np.float32)
    for _ in range(2):
        convfast.conv2d(x, w, stride=1, padding=1, dilation=1, groups=1)
    params = dict(stride=1, padding=1, dilation=1, groups=1)
    params.update(bad)
    with pytest.raises(TypeError, match="conv2d"):
        convfast.conv2d(x, w, **params)


def test_read_only_and_misaligned_operands():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 8, 8))
    w = rng.standard_normal((2, 3, 3, 3))
    expected = _ref(x, w)
    convfast.conv2d(x, w)
    x_ro = x.copy()
    x_ro.flags.writeable = False
    _check(convfast.conv2d(x_ro, w), expected)
    buf = np.empty(x.nbytes + 1, np.uint8)
    misaligned = np.frombuffer(buf[1:1 + x.nbytes].data, dtype=np.float64).reshape(x.shape)
    assert not misaligned.flags.aligned
    misaligned[...] = x
    for _ in range(2):
        _check(convfast.conv2d(misaligned, w), expected)
    np.testing.assert_array_equal(misaligned, x)  # not mutated


def test_out_and_mixed_dtypes_bypass_the_cache_correctly():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    convfast.conv2d(x, w)
    out = np.empty((1, 2, 6, 6), np.float32)
    assert convfast.conv2d(x, w, out=out) is out
    _check(out, _ref(x, w))
    x16 = x.astype(np.float16)
    for _ in range(2):
        y = convfast.conv2d(x16, w)
        assert y.dtype == np.float32
        _check(y, _ref(x16.astype(np.float32), w))
    with pytest.raises(ValueError, match="conv2d"):
        convfast.conv2d(x[:, :2], w)  # wrong channels after a kept call of the right ones


def test_transposed_calls_and_non_finite_weights():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    kw = dict(stride=2, padding=1, output_padding=1)

    def ref(w):
        spec = conv_transpose_spec("conv_transpose2d", 2, x, w, None, 2, 1, 1, 1, 1, None, "channels_first")
        return reference.conv_transpose_reference(spec, x, w, None)

    for _ in range(2):
        _check(convfast.conv_transpose2d(x, w, **kw), ref(w))
    w_inf = w.copy()
    w_inf[0, 0, 0, 0] = np.inf
    y = convfast.conv_transpose2d(x, w_inf, **kw)  # same signature: the kept call must not take it
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref(w_inf)))
    _check(np.nan_to_num(y, posinf=0, neginf=0), np.nan_to_num(ref(w_inf), posinf=0, neginf=0))
    for _ in range(2):
        y = convfast.conv_transpose2d(x, w, output_size=(10, 10), stride=2, padding=1)
        assert y.shape == (1, 2, 10, 10)


def test_layers_keep_plans_until_weights_change():
    rng = np.random.default_rng(5)
    layer = convfast.Conv2d(4, 8, 3, padding=1, seed=0)
    x = rng.standard_normal((1, 4, 7, 7)).astype(np.float32)
    first = layer(x)
    np.testing.assert_array_equal(layer(x), first)
    _check(first, _ref(x, layer.weight, layer.bias, padding=1))
    layer.weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    _check(layer(x), _ref(x, layer.weight, layer.bias, padding=1))
    layer.bias = None
    _check(layer(x), _ref(x, layer.weight, None, padding=1))
    xs = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    _check(layer(xs), _ref(x, layer.weight, None, padding=1))
    x64 = x.astype(np.float64)  # a float32 layer computes float64 inputs in float64
    _check(layer(x64), _ref(x64, layer.weight.astype(np.float64), None, padding=1))


def test_kept_layer_plans_follow_the_isa():
    supported = convfast.supported_isas()
    if len(supported) < 2:
        pytest.skip("one ISA only")
    layer = convfast.Conv2d(64, 64, 3, padding=1, seed=0)
    x = np.random.default_rng(6).standard_normal((1, 64, 8, 8)).astype(np.float32)
    before = convfast.get_isa()
    try:
        ys = []
        for isa in supported:
            convfast.set_isa(isa)
            ys.append(layer(x))
            ys.append(layer(x))
        for y in ys:
            _check(y, _ref(x, layer.weight, layer.bias, padding=1))
    finally:
        convfast.set_isa(before)


def test_backward_kept_specs_match_torch_and_check_grad_output():
    torch = pytest.importorskip("torch")
    from convfast import backward
    backward._SPECS.clear()
    rng = np.random.default_rng(7)
    for shape in [(2, 3, 9, 8), (1, 3, 6, 7), (2, 3, 9, 8)]:
        x = rng.standard_normal(shape)
        w = rng.standard_normal((4, 3, 3, 3))
        y = convfast.conv2d(x, w, stride=2, padding=1)
        gy = rng.standard_normal(y.shape)
        for _ in range(2):
            gx, gw, gb = convfast.conv2d_backward(gy, x, w, stride=2, padding=1)
            tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
            torch.nn.functional.conv2d(tx, tw, stride=2, padding=1).backward(torch.tensor(gy))
            np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-10)
            assert gb is None
        with pytest.raises(ValueError, match="conv2d_backward: grad_output has shape"):
            convfast.conv2d_backward(gy[:, :, :-1], x, w, stride=2, padding=1)
    backward._SPECS.clear()


def test_equal_but_distinct_dtype_objects():
    import pickle
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 7, 7)).astype(np.float32)
    w = pickle.loads(pickle.dumps(rng.standard_normal((3, 2, 3, 3)).astype(np.float32)))
    for _ in range(2):
        _check(convfast.conv2d(x, w), _ref(x, w))
        _check(convfast.conv2d(pickle.loads(pickle.dumps(x)), w), _ref(x, w))
    layer = convfast.Conv2d.from_weights(w)
    _check(layer(pickle.loads(pickle.dumps(x))), _ref(x, w))


def test_backward_kept_spec_does_not_skip_device_checks():
    # A kept spec for NumPy operands must not let a non-NumPy grad_output through unchecked.
    from convfast import backward

    class FakeGpuArray:  # what convfast's device dispatch takes for a GPU array
        shape = (1, 3, 4)
        __cuda_array_interface__ = {"shape": (1, 3, 4), "typestr": "<f8", "data": (0, False), "version": 3}

    x = np.zeros((1, 2, 5))
    w = np.ones((3, 2, 2))
    gy = np.ones((1, 3, 4))
    convfast.conv1d_backward(gy, x, w)
    convfast.conv1d_backward(gy, x, w)
    with pytest.raises(ValueError, match="conv1d_backward: grad_output is a GPU array"):
        convfast.conv1d_backward(FakeGpuArray(), x, w)
    backward._SPECS.clear()
