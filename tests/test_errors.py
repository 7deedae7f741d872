"""Bad-input battery: every public entry point rejects invalid arguments with the right exception
type (TypeError / ValueError; MemoryError only for a real allocation failure) and a message naming
the function and the offending parameter, never crashes, and never mutates its inputs."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convfast
from convfast import reference

from conftest import assert_close

OPS = {
    "conv1d": (convfast.conv1d, 1, False),
    "conv2d": (convfast.conv2d, 2, False),
    "conv3d": (convfast.conv3d, 3, False),
    "conv_transpose1d": (convfast.conv_transpose1d, 1, True),
    "conv_transpose2d": (convfast.conv_transpose2d, 2, True),
    "conv_transpose3d": (convfast.conv_transpose3d, 3, True),
}

# ------------------------------------------------------------------------------------------------
# Shared (writable) inputs: every battery call uses these, and their checksums are verified after
# each call and once more at the end of the module.
# ------------------------------------------------------------------------------------------------
_rng = np.random.default_rng(1234)
CIN, COUT, N_SP, K_SP = 4, 6, 6, 3
X = {r: _rng.standard_normal((2, CIN) + (N_SP,) * r) for r in (1, 2, 3)}
W = {r: _rng.standard_normal((COUT, CIN) + (K_SP,) * r) for r in (1, 2, 3)}          # conv layout
WT = {r: _rng.standard_normal((CIN, COUT) + (K_SP,) * r) for r in (1, 2, 3)}         # transposed layout
B = _rng.standard_normal(COUT)
PAD_A = np.arange(12, dtype=np.float64).reshape(3, 4)


def _all_shared():
    return [X[r] for r in X] + [W[r] for r in W] + [WT[r] for r in WT] + [B, PAD_A]


def _digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(str((a.shape, a.dtype.str, a.strides)).encode())
    return h.hexdigest()


INITIAL_DIGEST = _digest(_all_shared())


def xw(name):
    _, r, transposed = OPS[name]
    return X[r], (WT[r] if transposed else W[r])


# ------------------------------------------------------------------------------------------------
# The battery: (id, thunk, exception type, substrings the message must contain)
# ------------------------------------------------------------------------------------------------
CASES = []


def case(id_, fn, exc, *words):
    CASES.append(pytest.param(fn, exc, words, id=id_))


def _op_cases():
    for name, (op, r, transposed) in OPS.items():
        x, w = xw(name)
        f = op
        # --- ranks ---------------------------------------------------------------------------------
        case(f"{name}-x-rank-too-small", lambda f=f, x=x, w=w: f(x[0, 0], w), ValueError, name, "x")
        case(f"{name}-x-rank-too-big", lambda f=f, x=x, w=w: f(x[None, None], w), ValueError, name, "x")
        case(f"{name}-weight-rank", lambda f=f, x=x, w=w: f(x, w[0]), ValueError, name, "weight")
        case(f"{name}-bias-2d", lambda f=f, x=x, w=w: f(x, w, B[None]), ValueError, name, "bias")
        case(f"{name}-bias-length", lambda f=f, x=x, w=w: f(x, w, B[:-1]), ValueError, name, "bias")
        # --- channels / groups ----------------------------------------------------------------------
        case(f"{name}-channel-mismatch", lambda f=f, x=x, w=w: f(x[:, :3], w), ValueError, name, "channels")
        case(f"{name}-groups-0", lambda f=f, x=x, w=w: f(x, w, groups=0), ValueError, name, "groups")
        case(f"{name}-groups-negative", lambda f=f, x=x, w=w: f(x, w, groups=-2), ValueError, name, "groups")
        case(f"{name}-groups-bool", lambda f=f, x=x, w=w: f(x, w, groups=True), TypeError, name, "groups")
        case(f"{name}-groups-float", lambda f=f, x=x, w=w: f(x, w, groups=2.0), TypeError, name, "groups")
        if transposed:
            # C_in = 4 not divisible by groups = 3 (weight rows are C_in)
            case(f"{name}-groups-not-dividing", lambda f=f, x=x, w=w: f(x, w, groups=3), ValueError, name, "groups")
        else:
            # x has 4 channels = 2 * 2 but C_out = 6 ... use weight (5, 2, k) so 5 % 2 != 0
            case(f"{name}-groups-not-dividing", lambda f=f, x=x, w=w: f(x, w[:5, :2], groups=2), ValueError,
                 name, "groups")
        # --- stride / dilation ------------------------------------------------------------------------
        for p in ("stride", "dilation"):
            case(f"{name}-{p}-0", lambda f=f, x=x, w=w, p=p: f(x, w, **{p: 0}), ValueError, name, p)
            case(f"{name}-{p}-negative", lambda f=f, x=x, w=w, p=p: f(x, w, **{p: -1}), ValueError, name, p)
            case(f"{name}-{p}-float", lambda f=f, x=x, w=w, p=p: f(x, w, **{p: 1.0}), TypeError, name, p)
            case(f"{name}-{p}-bool", lambda f=f, x=x, w=w, p=p: f(x, w, **{p: True}), TypeError, name, p)
            case(f"{name}-{p}-None", lambda f=f, x=x, w=w, p=p: f(x, w, **{p: None}), TypeError, name, p)
            case(f"{name}-{p}-wrong-length", lambda f=f, x=x, w=w, p=p, r=r: f(x, w, **{p: (1,) * (r + 1)}),
                 ValueError, name, p)
            case(f"{name}-{p}-axis-0", lambda f=f, x=x, w=w, p=p, r=r: f(x, w, **{p: (1,) * (r - 1) + (0,)}),
                 ValueError, name, p)
        # --- padding --------------------------------------------------------------------------------
        case(f"{name}-padding-negative", lambda f=f, x=x, w=w: f(x, w, padding=-1), ValueError, name, "padding")
        case(f"{name}-padding-negative-pair", lambda f=f, x=x, w=w, r=r: f(x, w, padding=[(0, -1)] * r),
             ValueError, name, "padding")
        case(f"{name}-padding-bad-string", lambda f=f, x=x, w=w: f(x, w, padding="full"), ValueError, name,
             "padding")
        case(f"{name}-padding-float", lambda f=f, x=x, w=w: f(x, w, padding=1.5), TypeError, name, "padding")
        case(f"{name}-padding-None", lambda f=f, x=x, w=w: f(x, w, padding=None), TypeError, name, "padding")
        case(f"{name}-padding-wrong-length", lambda f=f, x=x, w=w, r=r: f(x, w, padding=[1] * (r + 1)),
             ValueError, name, "padding")
        case(f"{name}-padding-triple", lambda f=f, x=x, w=w, r=r: f(x, w, padding=[(1, 1, 1)] * r), ValueError,
             name, "padding")
        # --- data_format ------------------------------------------------------------------------------
        case(f"{name}-data_format-bad", lambda f=f, x=x, w=w: f(x, w, data_format="channels_middle"), ValueError,
             name, "data_format")
        case(f"{name}-data_format-None", lambda f=f, x=x, w=w: f(x, w, data_format=None), (TypeError, ValueError),
             name, "data_format")
        # --- sizes ----------------------------------------------------------------------------------
        case(f"{name}-empty-kernel", lambda f=f, x=x, w=w: f(x, w[..., :0]), ValueError, name, "weight")
        case(f"{name}-zero-spatial-input", lambda f=f, x=x, w=w: f(x[..., :0], w), ValueError, name, "x")
        # --- dtypes ----------------------------------------------------------------------------------
        case(f"{name}-complex-x", lambda f=f, x=x, w=w: f(x.astype(np.complex128), w), TypeError, name, "x")
        case(f"{name}-complex-weight", lambda f=f, x=x, w=w: f(x, w.astype(np.complex64)), TypeError, name,
             "weight")
        case(f"{name}-complex-bias", lambda f=f, x=x, w=w: f(x, w, B.astype(np.complex128)), TypeError, name,
             "bias")
        case(f"{name}-object-x", lambda f=f, x=x, w=w: f(x.astype(object), w), TypeError, name, "x")
        case(f"{name}-string-x", lambda f=f, x=x, w=w: f(x.astype(str), w), TypeError, name, "x")
        case(f"{name}-string-bias", lambda f=f, x=x, w=w: f(x, w, np.array(["a"] * COUT)), TypeError, name,
             "bias")
        case(f"{name}-None-x", lambda f=f, w=w: f(None, w), TypeError, name, "x")
        case(f"{name}-ragged-x", lambda f=f, w=w: f([[1.0, 2.0], [3.0]], w), TypeError, name, "x")
        # --- out= ------------------------------------------------------------------------------------
        good = f(x, w)
        case(f"{name}-out-wrong-shape", lambda f=f, x=x, w=w, g=good: f(x, w, out=np.empty(g.shape[:-1] + (g.shape[-1] + 1,))),
             ValueError, name, "out")
        case(f"{name}-out-wrong-dtype", lambda f=f, x=x, w=w, g=good: f(x, w, out=np.empty(g.shape, np.float32)),
             TypeError, name, "out")
        case(f"{name}-out-int-dtype", lambda f=f, x=x, w=w, g=good: f(x, w, out=np.empty(g.shape, np.int64)),
             TypeError, name, "out")

        def _readonly(f=f, x=x, w=w, g=good):
            o = np.empty(g.shape)
            o.setflags(write=False)
            return f(x, w, out=o)

        case(f"{name}-out-readonly", _readonly, ValueError, name, "out")
        case(f"{name}-out-list", lambda f=f, x=x, w=w, g=good: f(x, w, out=np.empty(g.shape).tolist()), TypeError,
             name, "out")
        case(f"{name}-out-broadcast", lambda f=f, x=x, w=w, g=good: f(x, w, out=np.broadcast_to(0.0, g.shape)),
             ValueError, name, "out")

        if not transposed:
            case(f"{name}-padding_mode-bad", lambda f=f, x=x, w=w: f(x, w, padding=1, padding_mode="mirror"),
                 ValueError, name, "padding_mode")
            case(f"{name}-padding_mode-int", lambda f=f, x=x, w=w: f(x, w, padding=1, padding_mode=1), TypeError,
                 name, "padding_mode")
            case(f"{name}-reflect-pad-equal-size", lambda f=f, x=x, w=w: f(x, w, padding=N_SP, padding_mode="reflect"),
                 ValueError, name, "reflect")
            case(f"{name}-reflect-same-too-big",
                 lambda f=f, x=x, w=w, r=r: f(x[(Ellipsis,) + (slice(0, 2),) * r], np.ones((COUT, CIN) + (5,) * r),
                                              padding="same", padding_mode="reflect"),
                 ValueError, name, "reflect")
            case(f"{name}-kernel-larger-than-input", lambda f=f, x=x, r=r: f(x, np.ones((COUT, CIN) + (N_SP + 1,) * r)),
                 ValueError, name, "kernel")
            case(f"{name}-dilated-kernel-larger", lambda f=f, x=x, w=w: f(x, w, dilation=3), ValueError, name,
                 "kernel")
        else:
            case(f"{name}-output_padding-ge-stride", lambda f=f, x=x, w=w: f(x, w, stride=2, output_padding=2),
                 ValueError, name, "output_padding")
            case(f"{name}-output_padding-ge-stride-and-dilation",
                 lambda f=f, x=x, w=w: f(x, w, stride=2, dilation=3, output_padding=3), ValueError, name,
                 "output_padding")
            case(f"{name}-output_padding-stride1", lambda f=f, x=x, w=w: f(x, w, output_padding=1), ValueError,
                 name, "output_padding")
            case(f"{name}-output_padding-negative", lambda f=f, x=x, w=w: f(x, w, output_padding=-1), ValueError,
                 name, "output_padding")
            case(f"{name}-output_padding-float", lambda f=f, x=x, w=w: f(x, w, stride=2, output_padding=0.5),
                 TypeError, name, "output_padding")
            case(f"{name}-output_size-unreachable-small", lambda f=f, x=x, w=w, r=r: f(x, w, stride=2, output_size=(3,) * r),
                 ValueError, name, "output_size")
            case(f"{name}-output_size-unreachable-big",
                 lambda f=f, x=x, w=w, r=r: f(x, w, stride=2, output_size=(2 * N_SP + K_SP,) * r), ValueError, name,
                 "output_size")
            case(f"{name}-output_size-wrong-length", lambda f=f, x=x, w=w, r=r: f(x, w, output_size=(8,) * (r + 3)),
                 ValueError, name, "output_size")
            case(f"{name}-output_size-zero", lambda f=f, x=x, w=w, r=r: f(x, w, output_size=(0,) * r), ValueError,
                 name, "output_size")
            case(f"{name}-output_size-float", lambda f=f, x=x, w=w, r=r: f(x, w, output_size=(8.0,) * r), TypeError,
                 name, "output_size")
            case(f"{name}-output_size-scalar-string", lambda f=f, x=x, w=w: f(x, w, output_size="8"),
                 (TypeError, ValueError), name, "output_size")
            case(f"{name}-output_padding-conflicts-output_size",
                 lambda f=f, x=x, w=w, r=r: f(x, w, stride=2, output_padding=1, output_size=(2 * N_SP + 1,) * r),
                 ValueError, name, "output_padding")
            case(f"{name}-output_padding-with-same",
                 lambda f=f, x=x, w=w, r=r: f(x, np.ones((CIN, COUT) + (1,) * r), stride=2, padding="same",
                                              output_padding=1), ValueError, name, "output_padding")
            case(f"{name}-padding-crops-everything", lambda f=f, x=x, w=w: f(x, w, padding=N_SP + 2), ValueError,
                 name, "padding")


_op_cases()


def _pad_cases():
    a = PAD_A
    case("pad-width-negative", lambda: convfast.pad(a, -1), ValueError, "pad", "pad_width")
    case("pad-width-negative-pair", lambda: convfast.pad(a, ((1, 1), (0, -2))), ValueError, "pad", "pad_width")
    case("pad-width-float", lambda: convfast.pad(a, 1.5), TypeError, "pad", "pad_width")
    case("pad-width-float-pairs", lambda: convfast.pad(a, ((1.0, 1.0), (1.0, 1.0))), TypeError, "pad", "pad_width")
    case("pad-width-string", lambda: convfast.pad(a, "1"), TypeError, "pad", "pad_width")
    case("pad-width-wrong-shape", lambda: convfast.pad(a, ((1, 1), (1, 1), (1, 1))), ValueError, "pad",
         "pad_width")
    case("pad-width-dict-axis-out-of-range", lambda: convfast.pad(a, {5: 1}), ValueError, "pad", "pad_width")
    case("pad-width-negative-reflect", lambda: convfast.pad(a, -1, mode="reflect"), ValueError, "pad",
         "pad_width")
    case("pad-empty-axis-reflect", lambda: convfast.pad(np.zeros((3, 0)), 1, mode="reflect"), ValueError, "pad",
         "empty axis")
    case("pad-empty-axis-wrap", lambda: convfast.pad(np.zeros((0, 3)), ((1, 0), (0, 0)), mode="wrap"), ValueError,
         "pad", "empty axis")
    case("pad-empty-axis-edge", lambda: convfast.pad(np.zeros((0,)), 2, mode="edge"), ValueError, "pad",
         "empty axis")
    case("pad-constant_values-wrong-shape", lambda: convfast.pad(a, 1, constant_values=[1, 2, 3]), ValueError,
         "pad", "constant_values")


_pad_cases()


def _layer_cases():
    L = convfast
    case("Conv2d-in_channels-0", lambda: L.Conv2d(0, 4, 3), ValueError, "Conv2d", "in_channels")
    case("Conv2d-in_channels-float", lambda: L.Conv2d(3.0, 4, 3), TypeError, "Conv2d", "in_channels")
    case("Conv1d-out_channels-negative", lambda: L.Conv1d(3, -4, 3), ValueError, "Conv1d", "out_channels")
    case("Conv2d-kernel_size-0", lambda: L.Conv2d(3, 4, 0), ValueError, "Conv2d", "kernel_size")
    case("Conv3d-kernel_size-wrong-length", lambda: L.Conv3d(3, 4, (3, 3)), ValueError, "Conv3d", "kernel_size")
    case("Conv2d-stride-0", lambda: L.Conv2d(3, 4, 3, stride=0), ValueError, "Conv2d", "stride")
    case("Conv2d-dilation-bool", lambda: L.Conv2d(3, 4, 3, dilation=True), TypeError, "Conv2d", "dilation")
    case("Conv2d-groups-not-dividing-in", lambda: L.Conv2d(3, 4, 3, groups=2), ValueError, "Conv2d", "groups")
    case("Conv2d-groups-not-dividing-out", lambda: L.Conv2d(4, 3, 3, groups=2), ValueError, "Conv2d", "groups")
    case("Conv2d-padding-bad", lambda: L.Conv2d(3, 4, 3, padding="full"), ValueError, "Conv2d", "padding")
    case("Conv2d-padding_mode-bad", lambda: L.Conv2d(3, 4, 3, padding_mode="mirror"), ValueError, "Conv2d",
         "padding_mode")
    case("ConvTranspose2d-padding_mode-reflect", lambda: L.ConvTranspose2d(3, 4, 3, padding_mode="reflect"),
         ValueError, "ConvTranspose2d", "padding_mode")
    case("ConvTranspose1d-output_padding-negative", lambda: L.ConvTranspose1d(3, 4, 3, output_padding=-1),
         ValueError, "ConvTranspose1d", "output_padding")
    case("ConvTranspose3d-groups-0", lambda: L.ConvTranspose3d(4, 4, 3, groups=0), ValueError, "ConvTranspose3d",
         "groups")
    case("Conv2d-data_format-bad", lambda: L.Conv2d(3, 4, 3, data_format="hwcn"), ValueError, "Conv2d",
         "data_format")
    case("Conv2d-dtype-int", lambda: L.Conv2d(3, 4, 3, dtype=np.int32), TypeError, "Conv2d", "dtype")
    case("Conv2d-dtype-complex", lambda: L.Conv2d(3, 4, 3, dtype=np.complex64), TypeError, "Conv2d", "dtype")
    case("Conv2d-call-x-rank", lambda: L.Conv2d(4, 6, 3)(X[3]), ValueError, "Conv2d", "x")
    case("Conv2d-call-channels", lambda: L.Conv2d(3, 6, 3)(X[2]), ValueError, "Conv2d", "channels")
    case("Conv2d-call-complex", lambda: L.Conv2d(4, 6, 3)(X[2].astype(complex)), TypeError, "Conv2d", "x")

    def _set_weight():
        layer = L.Conv2d(4, 6, 3)
        layer.weight = np.ones((6, 4, 2, 2))

    case("Conv2d-weight-setter-shape", _set_weight, ValueError, "Conv2d", "weight")

    def _set_bias():
        layer = L.Conv1d(4, 6, 3)
        layer.bias = np.ones(5)

    case("Conv1d-bias-setter-shape", _set_bias, ValueError, "Conv1d", "bias")
    case("Conv2d-from_weights-rank", lambda: L.Conv2d.from_weights(W[1]), ValueError, "Conv2d", "weight")
    case("ConvTranspose2d-call-output_size", lambda: L.ConvTranspose2d(4, 6, 3, stride=2)(X[2], output_size=(3, 3)),
         ValueError, "ConvTranspose2d", "output_size")


_layer_cases()


def _helper_cases():
    cos, ctos, sp, rf = (convfast.conv_output_shape, convfast.conv_transpose_output_shape, convfast.same_padding,
                         convfast.receptive_field)
    case("conv_output_shape-spatial-0", lambda: cos(0, 3), ValueError, "conv_output_shape", "spatial_shape")
    case("conv_output_shape-spatial-empty", lambda: cos((), 3), ValueError, "conv_output_shape", "spatial_shape")
    case("conv_output_shape-spatial-string", lambda: cos("10", 3), TypeError, "conv_output_shape", "spatial_shape")
    case("conv_output_shape-kernel-0", lambda: cos(10, 0), ValueError, "conv_output_shape", "kernel_size")
    case("conv_output_shape-kernel-wrong-length", lambda: cos((10, 10), (3, 3, 3)), ValueError,
         "conv_output_shape", "kernel_size")
    case("conv_output_shape-kernel-too-big", lambda: cos(5, 7), ValueError, "conv_output_shape", "kernel")
    case("conv_output_shape-stride-0", lambda: cos(10, 3, stride=0), ValueError, "conv_output_shape", "stride")
    case("conv_output_shape-stride-float", lambda: cos(10, 3, stride=2.0), TypeError, "conv_output_shape", "stride")
    case("conv_output_shape-dilation-negative", lambda: cos(10, 3, dilation=-1), ValueError, "conv_output_shape",
         "dilation")
    case("conv_output_shape-padding-bad", lambda: cos(10, 3, padding="full"), ValueError, "conv_output_shape",
         "padding")
    case("conv_output_shape-padding-negative", lambda: cos(10, 3, padding=-1), ValueError, "conv_output_shape",
         "padding")
    case("conv_transpose_output_shape-output_padding", lambda: ctos(4, 3, stride=2, output_padding=2), ValueError,
         "conv_transpose_output_shape", "output_padding")
    case("conv_transpose_output_shape-crop-all", lambda: ctos(1, 1, padding=1), ValueError,
         "conv_transpose_output_shape", "padding")
    case("conv_transpose_output_shape-stride-None", lambda: ctos(4, 3, stride=None), TypeError,
         "conv_transpose_output_shape", "stride")
    case("same_padding-stride-0", lambda: sp(10, 3, stride=0), ValueError, "same_padding", "stride")
    case("same_padding-dilation-float", lambda: sp(10, 3, dilation=1.5), TypeError, "same_padding", "dilation")
    case("same_padding-kernel-bool", lambda: sp(10, True), TypeError, "same_padding", "kernel_size")
    case("receptive_field-kernel-0", lambda: rf([{"kernel_size": 0}]), ValueError, "receptive_field",
         "kernel_size")
    case("receptive_field-no-kernel", lambda: rf([{"stride": 2}]), ValueError, "receptive_field", "kernel_size")
    case("receptive_field-not-mapping", lambda: rf([3]), TypeError, "receptive_field", "layer")
    case("receptive_field-unknown-key", lambda: rf([{"kernel_size": 3, "strides": 2}]), ValueError,
         "receptive_field", "strides")
    case("receptive_field-same-strided", lambda: rf([{"kernel_size": 3, "stride": 2, "padding": "same"}]),
         ValueError, "receptive_field", "padding")
    case("receptive_field-stride-float", lambda: rf([{"kernel_size": 3, "stride": 1.5}]), TypeError,
         "receptive_field", "stride")
    case("set_num_threads-0", lambda: convfast.set_num_threads(0), ValueError, "set_num_threads", "n")
    case("set_num_threads-negative", lambda: convfast.set_num_threads(-3), ValueError, "set_num_threads", "n")
    case("set_num_threads-float", lambda: convfast.set_num_threads(2.0), TypeError, "set_num_threads", "n")
    case("set_num_threads-bool", lambda: convfast.set_num_threads(True), TypeError, "set_num_threads", "n")
    case("set_num_threads-None", lambda: convfast.set_num_threads(None), TypeError, "set_num_threads", "n")
    case("set_isa-unknown", lambda: convfast.set_isa("sse9000"), ValueError, "set_isa", "sse9000")
    case("set_isa-not-string", lambda: convfast.set_isa(3), TypeError, "set_isa", "name")


_helper_cases()


@pytest.fixture
def restore_threads_and_isa():
    n = convfast.get_num_threads()
    isa = convfast.get_isa()
    yield
    convfast.set_num_threads(n)
    convfast.set_isa(isa)


def test_battery_is_large_enough():
    assert len(CASES) >= 70


@pytest.mark.usefixtures("restore_threads_and_isa")
@pytest.mark.parametrize("fn, exc, words", CASES)
def test_bad_input(fn, exc, words):
    before = _digest(_all_shared())
    threads = convfast.get_num_threads()
    with pytest.raises(exc) as info:
        fn()
    # MemoryError is never an acceptable answer to a bad argument
    assert not isinstance(info.value, MemoryError)
    msg = str(info.value)
    for word in words:
        assert word in msg, f"message {msg!r} does not mention {word!r}"
    assert _digest(_all_shared()) == before, "a rejected call mutated its inputs"
    assert convfast.get_num_threads() == threads, "a rejected call changed the thread count"


# ------------------------------------------------------------------------------------------------
# Huge sizes: element counts or coordinates near/over 64 bits. Each runs in a subprocess with an
# address-space limit, so that a crash (segfault, abort) or a runaway allocation is reported as a
# test failure rather than taking the test run (or the machine) down.
# ------------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(r"""
    import json, os, resource, signal, sys
    import numpy as np
    import convfast
    from convfast import reference
    bc = lambda shape, dt=np.float32: np.broadcast_to(np.ones((), dt), shape)
    ns = {"np": np, "convfast": convfast, "reference": reference, "bc": bc}
    # No kernel has run in this process, so forking is safe with OpenMP. Each case runs in its own
    # child, with an address-space limit and an alarm, so a crash or a hang is reported per case.
    results = {}
    for key, expr, expected_expr in json.loads(sys.argv[1]):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
            except (ValueError, OSError):
                pass
            signal.alarm(60)
            try:
                result = eval(expr, ns)
                expected = np.asarray(eval(expected_expr, ns)).tolist() if expected_expr else None
                rec = {"status": "ok", "shape": list(np.shape(result)),
                       "value": np.asarray(result).tolist() if np.size(result) < 100 else None,
                       "expected": expected}
            except BaseException as exc:
                rec = {"status": "raised", "type": type(exc).__name__,
                       "mro": [c.__name__ for c in type(exc).__mro__], "msg": str(exc)[:2000]}
            os.write(wfd, json.dumps(rec).encode())
            os._exit(0)
        os.close(wfd)
        chunks = []
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) or not chunks:
            results[key] = {"status": "crashed", "wait_status": status}
        else:
            results[key] = json.loads(b"".join(chunks))
    print(json.dumps(results))
""")


def _run_isolated(cases):
    """cases: {key: (expression, expected expression or None)} -> {key: result record}."""
    payload = json.dumps([[k, e, x] for k, (e, x) in cases.items()])
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _WORKER, payload], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, f"isolation worker failed: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (id, expression) -- must raise ValueError or MemoryError; a ValueError must come with a message
# (from convfast or NumPy's allocator), never a crash, a hang or any other exception type.
HUGE_MUST_RAISE = [
    ("conv2d-broadcast-x-huge-output",
     "convfast.conv2d(bc((1, 1, 2**30, 2**30)), np.ones((1, 1, 3, 3), np.float32))"),
    ("conv3d-broadcast-x-huge-output",
     "convfast.conv3d(bc((1, 1, 2**20, 2**20, 2**20)), np.ones((1, 1, 1, 1, 1), np.float32))"),
    ("conv_transpose2d-output-overflows",
     "convfast.conv_transpose2d(bc((1, 1, 2**20, 2**20)), np.ones((1, 1, 3, 3), np.float32), stride=2**20)"),
    ("conv_transpose3d-output-product-overflows",
     "convfast.conv_transpose3d(np.ones((1, 1, 2, 2, 2), np.float32), np.ones((1, 1, 1, 1, 1), np.float32), "
     "stride=2**22)"),
    ("conv_transpose1d-broadcast-x-huge",
     "convfast.conv_transpose1d(bc((1, 1, 2**60)), np.ones((1, 1, 3), np.float32), stride=2**10)"),
    ("conv1d-huge-padding", "convfast.conv1d(np.ones((1, 1, 5)), np.ones((1, 1, 3)), padding=2**62)"),
    ("conv1d-padding-beyond-int64", "convfast.conv1d(np.ones((1, 1, 5)), np.ones((1, 1, 3)), padding=2**64)"),
    ("conv1d-huge-dilation", "convfast.conv1d(np.ones((1, 1, 5)), np.ones((1, 1, 3)), dilation=2**62)"),
    ("conv1d-broadcast-batch-huge", "convfast.conv1d(bc((2**40, 1, 3)), np.ones((1, 1, 3), np.float32))"),
    ("conv1d-broadcast-channels-and-kernel",
     "convfast.conv1d(bc((1, 2**40, 1)), bc((1, 2**40, 1)))"),
    ("conv1d-broadcast-huge-kernel",
     "convfast.conv1d(bc((1, 1, 2**40)), bc((1, 1, 2**40 - 8)), stride=4)"),
    ("conv2d-broadcast-huge-kernel",
     "convfast.conv2d(bc((1, 1, 2**20, 2**20)), bc((1, 1, 2**20, 2**20)))"),
    ("conv_transpose1d-huge-kernel-cropped",
     "convfast.conv_transpose1d(bc((1, 1, 1)), bc((1, 1, 2**40)), padding=[(2**40 - 3, 0)])"),
    ("conv_transpose1d-output_size-beyond-int64",
     "convfast.conv_transpose1d(np.ones((1, 1, 5)), np.ones((1, 1, 3)), output_size=[2**64])"),
    ("pad-huge-width", "convfast.pad(np.zeros(3), 2**62)"),
    ("pad-width-at-int64-max", "convfast.pad(np.zeros(3), 2**63 - 1)"),
    ("pad-broadcast-huge", "convfast.pad(np.broadcast_to(np.float64(0), (2**40,)), 1, mode='reflect')"),
    ("pad-broadcast-huge-2d", "convfast.pad(np.broadcast_to(np.float64(0), (2**29, 2**30)), 1)"),
]


@pytest.fixture(scope="module")
def isolated():
    cases = {i: (e, None) for i, e in HUGE_MUST_RAISE}
    cases.update({i: (e, x) for i, _, _, e, x in HUGE_VALID})
    return _run_isolated(cases)


@pytest.mark.parametrize("key, expr", HUGE_MUST_RAISE, ids=[i for i, _ in HUGE_MUST_RAISE])
def test_huge_sizes_raise_cleanly(isolated, key, expr):
    res = isolated[key]
    assert res["status"] != "crashed", f"{expr} crashed the interpreter (wait status {res['wait_status']})"
    assert res["status"] == "raised", f"{expr} unexpectedly returned shape {res.get('shape')}"
    assert "ValueError" in res["mro"] or "MemoryError" in res["mro"], (
        f"{expr} raised {res['type']}: {res['msg'][:300]}")


# Huge parameters whose *result* is tiny and well defined: convfast must either compute it
# (matching the NumPy reference) or refuse with a ValueError naming the function and parameter.
HUGE_VALID = [
    ("conv1d-stride-2**63", "conv1d", "stride",
     "convfast.conv1d(np.arange(5.0).reshape(1, 1, 5), np.array([[[1.0, 2.0, 3.0]]]), stride=2**63)",
     "np.array([[[8.0]]])"),
    ("conv1d-stride-2**63-1", "conv1d", "stride",
     "convfast.conv1d(np.arange(5.0).reshape(1, 1, 5), np.array([[[1.0, 2.0, 3.0]]]), stride=2**63 - 1)",
     "np.array([[[8.0]]])"),
    ("conv_transpose1d-stride-2**63-1", "conv_transpose1d", "stride",
     "convfast.conv_transpose1d(np.full((1, 1, 1), 2.0), np.array([[[1.0, 2.0, 3.0]]]), stride=2**63 - 1)",
     "np.array([[[2.0, 4.0, 6.0]]])"),
    ("conv_transpose1d-stride-2**63", "conv_transpose1d", "stride",
     "convfast.conv_transpose1d(np.full((1, 1, 1), 2.0), np.array([[[1.0, 2.0, 3.0]]]), stride=2**63)",
     "np.array([[[2.0, 4.0, 6.0]]])"),
    ("conv1d-huge-padding-and-stride", "conv1d", "padding",
     "convfast.conv1d(np.arange(5.0).reshape(1, 1, 5), np.array([[[1.0, 2.0, 3.0]]]), padding=2**62, stride=2**62)",
     "np.array([[[0.0, 8.0, 0.0]]])"),
    ("conv3d-broadcast-x-tiny-output", "conv3d", "x",
     "convfast.conv3d(bc((1, 1, 2**20, 2**20, 2**20)), np.ones((1, 1, 2, 2, 2), np.float32), stride=2**19)",
     "np.full((1, 1, 2, 2, 2), 8.0)"),
]


@pytest.mark.parametrize("key, func, param, expr",
                         [pytest.param(i, f, p, e, id=i) for i, f, p, e, _ in HUGE_VALID])
def test_huge_parameters_with_tiny_result(isolated, key, func, param, expr):
    res = isolated[key]
    assert res["status"] != "crashed", f"{expr} crashed the interpreter (wait status {res['wait_status']})"
    if res["status"] == "ok":
        assert res["shape"] == list(np.shape(res["expected"]))
        assert_close(np.array(res["value"]), np.array(res["expected"]), dtype=np.float64)
    else:
        assert res["type"] == "ValueError", f"{expr} raised {res['type']}: {res['msg'][:400]}"
        assert func in res["msg"] and param in res["msg"], res["msg"]


def test_huge_valid_expected_values_match_reference():
    # the hand-written expectations above are what the NumPy oracle computes where it can
    x = np.arange(5.0).reshape(1, 1, 5)
    w = np.array([[[1.0, 2.0, 3.0]]])
    assert_close(reference.conv1d(x, w, stride=2**63), [[[8.0]]], dtype=np.float64)
    assert_close(reference.conv_transpose1d(np.full((1, 1, 1), 2.0), w, stride=2**63 - 1), [[[2.0, 4.0, 6.0]]],
                 dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# After the battery: inputs untouched; read-only inputs accepted.
# ------------------------------------------------------------------------------------------------
def test_shared_inputs_not_mutated_by_battery():
    assert _digest(_all_shared()) == INITIAL_DIGEST


@pytest.mark.parametrize("name", list(OPS))
def test_read_only_inputs_accepted_and_untouched(name):
    op, r, transposed = OPS[name]
    x, w = xw(name)
    xr, wr, br = x.copy(), w.copy(), B.copy()
    for a in (xr, wr, br):
        a.setflags(write=False)
    digest = _digest([xr, wr, br])
    kwargs = dict(stride=2, padding=1)
    y = op(xr, wr, br, **kwargs)
    ref = getattr(reference, name)(x, w, B, **kwargs)
    assert_close(y, ref, dtype=np.float64)
    assert y.flags.writeable and y.flags.c_contiguous
    assert _digest([xr, wr, br]) == digest
    if not transposed:
        y2 = op(xr, wr, br, padding=1, padding_mode="reflect")
        assert_close(y2, getattr(reference, name)(x, w, B, padding=1, padding_mode="reflect"), dtype=np.float64)
        assert _digest([xr, wr, br]) == digest


def test_read_only_pad_input_accepted():
    a = PAD_A.copy()
    a.setflags(write=False)
    for mode in ("constant", "reflect", "edge", "wrap", "symmetric"):
        assert np.array_equal(convfast.pad(a, 2, mode=mode), np.pad(PAD_A, 2, mode=mode))
    assert np.array_equal(a, PAD_A)


def test_failed_call_with_out_leaves_out_untouched():
    x, w = xw("conv2d")
    out = np.full((2, COUT, N_SP - 2, N_SP - 2), 7.0)
    with pytest.raises(ValueError):
        convfast.conv2d(x, w, stride=0, out=out)
    with pytest.raises(ValueError):
        convfast.conv2d(x, w, groups=3, out=out)
    assert np.all(out == 7.0)
