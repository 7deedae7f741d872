"""convfast.torch: the autograd Function (gradcheck), the functional ops and the nn.Module drop-ins
(parity with torch.nn.Conv*/ConvTranspose* in initialisation, forward, backward, state_dict, training
with an optimizer) and convfast's extras (strided "same", same_lower, symmetric padding, pairs)."""
import subprocess
import sys
import zlib

import numpy as np
import pytest

import convfast
from conftest import requires_torch

pytestmark = [requires_torch,
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")]

try:
    import torch
    import torch.nn.functional as F
    import convfast.torch as cft
except Exception:  # pragma: no cover
    torch = F = cft = None

D = torch.float64 if torch is not None else None


def test_import_convfast_does_not_import_torch():
    code = "import sys, convfast; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)
# ----------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    # (rank, transposed, in, out, kernel, input spatial, kwargs): small, since gradcheck runs one
    # backward per output element and two forwards per input element
    (1, False, 2, 3, 3, (7,), dict(stride=2, padding="same", padding_mode="symmetric")),
    (1, False, 4, 2, 2, (6,), dict(padding=((3, 0),), dilation=2, groups=2, padding_mode="circular")),
    (2, False, 2, 4, (3, 2), (5, 4), dict(stride=(2, 1), padding="same_lower", dilation=(1, 2), groups=2,
                                          padding_mode="reflect")),
    (2, False, 2, 2, 3, (4, 4), dict(padding=((1, 2), (0, 1)), padding_mode="replicate")),
    (3, False, 2, 2, 2, (3, 3, 4), dict(stride=2, padding="same", padding_mode="symmetric")),
    (1, True, 2, 3, 3, (4,), dict(stride=2, padding=1, output_padding=1)),
    (2, True, 4, 2, (2, 3), (2, 2), dict(stride=(2, 3), padding="same", groups=2, dilation=(2, 1))),
    (2, True, 2, 2, 3, (3, 2), dict(stride=2, padding=((0, 2), (1, 0)), output_padding=(1, 0))),
    (3, True, 2, 1, 2, (2, 2, 2), dict(stride=2, padding="same_lower")),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"{c[0]}d-{'T' if c[1] else 'C'}-{sorted(c[6])}")
def test_gradcheck(case):
    r, transposed, cin, cout, k, spatial, kw = case
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    k = (k,) * r if isinstance(k, int) else k
    g = kw.get("groups", 1)
    x = torch.randn((1, cin) + spatial, dtype=D, requires_grad=True)
    wshape = (cin, cout // g) + k if transposed else (cout, cin // g) + k
    w = torch.randn(wshape, dtype=D, requires_grad=True)
    b = torch.randn(cout, dtype=D, requires_grad=True)
    fn = getattr(cft, f"conv_transpose{r}d" if transposed else f"conv{r}d")
    assert torch.autograd.gradcheck(lambda x_, w_, b_: fn(x_, w_, b_, **kw), (x, w, b))
    # without a bias, and with only some inputs requiring grad (random projections: fast_mode)
    w2 = w.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, w_: fn(x_, w_, None, **kw), (x.detach(), w2), fast_mode=True)


def test_gradcheck_module_unbatched():
    m = cft.Conv2d(2, 3, 3, stride=2, padding="same", padding_mode="symmetric", dtype=D)
    x = torch.randn(2, 5, 6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    mt = cft.ConvTranspose1d(2, 2, 3, stride=2, dtype=D)
    assert torch.autograd.gradcheck(lambda x_: mt(x_, output_size=[8]), (torch.randn(2, 3, dtype=D,
                                                                                       requires_grad=True),))


# ----------------------------------------------------------------------------------------------
# Parity with torch.nn
# ----------------------------------------------------------------------------------------------

MODULE_CASES = [
    (1, False, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2)),
    (1, False, dict(in_channels=3, out_channels=2, kernel_size=5, padding="same", padding_mode="circular",
                    bias=False)),
    (2, False, dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1),
                    padding_mode="reflect")),
    (2, False, dict(in_channels=4, out_channels=8, kernel_size=3, padding="valid", groups=4)),
    (2, False, dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="replicate")),
    (3, False, dict(in_channels=2, out_channels=3, kernel_size=2, stride=2, padding=1)),
    (1, True, dict(in_channels=4, out_channels=2, kernel_size=4, stride=2, padding=1)),
    (2, True, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2)),
    (2, True, dict(in_channels=3, out_channels=2, kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), bias=False)),
    (3, True, dict(in_channels=2, out_channels=2, kernel_size=2, stride=2)),
]


def _pair(r, transposed, kw, dtype):
    name = f"ConvTranspose{r}d" if transposed else f"Conv{r}d"
    torch.manual_seed(1234)
    ours = getattr(cft, name)(**kw, dtype=dtype)
    torch.manual_seed(1234)
    theirs = getattr(torch.nn, name)(**kw, dtype=dtype)
    return ours, theirs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c[0]}d-{'T' if c[1] else 'C'}-{c[2]}")
def test_module_matches_torch_nn(case, dtype):
    r, transposed, kw = case
    dtype = getattr(torch, dtype)
    ours, theirs = _pair(r, transposed, kw, dtype)
    # identical initialisation under the same seed, torch.nn's parameter shapes and repr
    assert torch.equal(ours.weight, theirs.weight)
    assert (ours.bias is None) == (theirs.bias is None)
    if ours.bias is not None:
        assert torch.equal(ours.bias, theirs.bias)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]

    torch.manual_seed(7)
    x = torch.randn((3, kw["in_channels"]) + (7, 6, 5)[:r], dtype=dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ya, yb, **tol)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
    if ours.bias is not None:
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
    # unbatched input, as torch.nn accepts it
    torch.testing.assert_close(ours(x[0]), theirs(x[0]), **tol)


def test_state_dict_round_trip_with_torch_nn():
    torch.manual_seed(0)
    src = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dtype=D)
    dst = cft.Conv2d(3, 5, 3, stride=2, padding=1, dtype=D)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=D)
    torch.testing.assert_close(dst(x), src(x))
    back = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dtype=D)
    back.load_state_dict(dst.state_dict())
    assert torch.equal(back.weight, src.weight) and torch.equal(back.bias, src.bias)
    srct = torch.nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2, dtype=D)
    dstt = cft.ConvTranspose3d(2, 4, 2, stride=2, groups=2, dtype=D)
    dstt.load_state_dict(srct.state_dict())
    xt = torch.randn(1, 2, 3, 2, 3, dtype=D)
    torch.testing.assert_close(dstt(xt), srct(xt))


def test_transposed_output_size_matches_torch():
    ours, theirs = _pair(2, True, dict(in_channels=2, out_channels=3, kernel_size=3, stride=3, padding=1), D)
    x = torch.randn(1, 2, 4, 5, dtype=D)
    for size in ([10, 13], [12, 15], torch.Size([1, 3, 11, 14])):
        torch.testing.assert_close(ours(x, output_size=size), theirs(x, output_size=size))


def test_sequential_training_with_optimizer_matches_torch_nn():
    def net(mod):
        return torch.nn.Sequential(mod.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                   mod.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), torch.nn.Tanh(),
                                   mod.ConvTranspose2d(4, 2, 2, stride=2), torch.nn.Flatten(),
                                   torch.nn.Linear(2 * 8 * 8, 3)).double()

    torch.manual_seed(5)
    a = net(cft)
    torch.manual_seed(5)
    b = net(torch.nn)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(4, 1, 8, 8, dtype=D, generator=gen)
        target = torch.randint(0, 3, (4,), generator=gen)
        losses = []
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-10
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)


def test_only_needed_gradients_are_computed(monkeypatch):
    calls = []
    real = convfast.conv2d_backward

    def spy(*args, needs=None, **kw):
        calls.append(needs)
        return real(*args, needs=needs, **kw)

    monkeypatch.setattr(convfast.backward, "conv2d_backward", spy)
    m = cft.Conv2d(2, 3, 3, bias=False, dtype=D)
    x = torch.randn(1, 2, 5, 5, dtype=D)  # input without grad: grad_input is not computed
    m(x).sum().backward()
    assert calls[-1] == (False, True, False)
    m.weight.requires_grad_(False)
    x.requires_grad_(True)
    m(x).sum().backward()
    assert calls[-1] == (True, False, False)


def test_channels_last_tensors_and_no_grad():
    m = cft.Conv2d(3, 4, 3, padding="same", dtype=D)
    x = torch.randn(2, 3, 6, 7, dtype=D).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ref = torch.nn.functional.conv2d(x, m.weight, m.bias, padding=1)
    y = m(x)
    torch.testing.assert_close(y, ref)
    gx, = torch.autograd.grad(y.square().sum(), x)
    rgx, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, rgx)
    with torch.no_grad():
        assert not m(x).requires_grad


@pytest.mark.parametrize("make", [lambda: cft.Conv2d(16, 32, 3, padding=1), lambda: cft.Conv1d(8, 8, 5, groups=8),
                                  lambda: cft.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
                                  lambda: cft.Conv3d(4, 16, 3, stride=2)])
def test_inference_plans_follow_weight_updates(make):
    """Under no_grad a module keeps a plan with its weights packed; every way the weights can
    change through the parameters must drop it: optimizer steps, copy_ under no_grad,
    load_state_dict, a new Parameter, a bias update, a dtype change."""
    torch.manual_seed(0)
    m = make()
    rank = len(m.kernel_size)
    x = torch.randn((2, m.in_channels) + (9,) * rank)
    fn = getattr(F, ("conv_transpose" if m.transposed else "conv") + f"{rank}d")
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)

    def check(model_input=x):
        with torch.no_grad():
            ref = fn(model_input, m.weight, m.bias, **kw)
            for _ in range(2):  # the second call runs the kept plan
                torch.testing.assert_close(m(model_input), ref, rtol=1e-4, atol=1e-4)

    check()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().sum().backward()
    opt.step()
    check()
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))
    check()
    m.load_state_dict({"weight": torch.randn_like(m.weight), "bias": torch.randn_like(m.bias)})
    check()
    m.weight = torch.nn.Parameter(torch.randn_like(m.weight))
    check()
    with torch.no_grad():
        m.bias.add_(1.0)
    check()
    m.double()
    check(x.double())
    check(x[:1].double())  # another input shape: its own plan


def test_training_calls_follow_parameter_changes():
    """Calls that record a graph keep NumPy views of the weight and bias; every way the parameters
    can change must show in the next result: optimizer steps (in place), a new Parameter, .data set
    to another tensor, to a view of the same storage, and a dtype change."""
    torch.manual_seed(0)
    m = cft.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def check(model_input=x):
        for _ in range(2):
            ref = F.conv2d(model_input.detach(), m.weight.detach(), m.bias.detach(), padding=1)
            y = m(model_input)
            assert y.requires_grad
            torch.testing.assert_close(y.detach(), ref, rtol=1e-4, atol=1e-4)

    check()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().sum().backward()
    opt.step()
    check()
    m.weight = torch.nn.Parameter(torch.randn_like(m.weight))
    check()
    m.weight.data = torch.randn(6, 4, 3, 3)
    check()
    wide = torch.randn(6, 8, 3, 3)
    m.weight.data = wide[:, :4]  # strided
    check()
    m.weight.data = wide[:, 4:]  # the same storage, another offset
    check()
    m.bias.data = torch.randn(6)
    check()
    m.double()
    check(x.double())


def test_modules_with_kept_plans_copy_and_pickle():
    import copy
    import pickle
    m = cft.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y = m(x)
    m(x).sum().backward()  # a kept call for the grad path too
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        with torch.no_grad():
            torch.testing.assert_close(twin(x), y)
            twin.weight.mul_(2)
            torch.testing.assert_close(twin(x) - twin.bias[:, None, None], 2 * (y - m.bias[:, None, None]))
        torch.testing.assert_close(m(x), y)  # the original keeps its own weights


# ----------------------------------------------------------------------------------------------
# convfast's extras
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular", "symmetric"])
@pytest.mark.parametrize("padding", ["same", "same_lower"])
def test_strided_same_and_symmetric_modules(r, mode, padding):
    torch.manual_seed(r)
    m = getattr(cft, f"Conv{r}d")(2, 4, 3, stride=2, padding=padding, padding_mode=mode, groups=2, dtype=D)
    assert m.padding == padding and m.padding_mode == mode
    x = torch.randn((2, 2) + (7, 6, 5)[:r], dtype=D, requires_grad=True)
    y = m(x)
    assert y.shape[2:] == tuple(-(-n // 2) for n in x.shape[2:])
    expected = getattr(convfast, f"conv{r}d")(x.detach().numpy(), m.weight.detach().numpy(),
                                              m.bias.detach().numpy(), stride=2, padding=padding, padding_mode=mode,
                                              groups=2)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    y.backward(gy)
    gx, gw, gb = getattr(convfast, f"conv{r}d_backward")(gy.numpy(), x.detach().numpy(), m.weight.detach().numpy(),
                                                         m.bias.detach().numpy(), stride=2, padding=padding,
                                                         padding_mode=mode, groups=2)
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.weight.grad.numpy(), gw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.bias.grad.numpy(), gb, rtol=1e-12, atol=1e-12)
    if mode != "symmetric":  # the same numbers as torch.nn on an explicitly padded input
        pads = convfast._spec.conv_spec("t", r, x.detach().numpy(), m.weight.detach().numpy(), None, 2, padding, 1, 2,
                                        mode, "channels_first").pads
        flat = [p for pair in reversed(pads) for p in pair]
        x2 = x.detach().clone().requires_grad_(True)
        xp = F.pad(x2, flat) if mode == "zeros" else F.pad(x2, flat, mode=mode)
        y2 = getattr(F, f"conv{r}d")(xp, m.weight, m.bias, stride=2, groups=2)
        torch.testing.assert_close(y, y2)
        y2.backward(gy)
        torch.testing.assert_close(x.grad, x2.grad)


def test_transposed_same_module():
    m = cft.ConvTranspose2d(3, 2, 3, stride=2, padding="same", dtype=D)
    x = torch.randn(1, 3, 4, 5, dtype=D, requires_grad=True)
    assert m(x).shape == (1, 2, 8, 10)
    assert torch.autograd.gradcheck(m, (x,))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, words", [
    (lambda: cft.ConvTranspose2d(2, 2, 3, padding_mode="reflect"), ValueError, ["ConvTranspose2d", "padding_mode"]),
    (lambda: cft.Conv2d(3, 4, 3, groups=2), ValueError, ["Conv2d", "groups"]),
    (lambda: cft.Conv1d(3, 4, 0), ValueError, ["Conv1d", "kernel_size"]),
    (lambda: cft.Conv2d(3, 4, 3, padding="full"), ValueError, ["Conv2d", "padding"]),
    (lambda: cft.Conv2d(3, 4, 3, padding_mode="mirror"), ValueError, ["Conv2d", "padding_mode"]),
    (lambda: cft.Conv2d(3, 4, 3, dtype=torch.float16), TypeError, ["Conv2d", "dtype"]),
    (lambda: cft.Conv2d(3, 4, 3)(torch.randn(1, 3, 5, 5, dtype=D)), TypeError, ["conv2d", "dtype"]),
    (lambda: cft.conv2d(np.ones((1, 1, 3, 3)), torch.ones(1, 1, 3, 3)), TypeError, ["conv2d", "input"]),
    (lambda: cft.Conv2d(3, 4, 3)(torch.randn(1, 2, 5, 5)), ValueError, ["conv2d", "channels"]),
    (lambda: cft.conv1d(torch.ones(1, 1, 5, dtype=torch.int64), torch.ones(1, 1, 3, dtype=torch.int64)), TypeError,
     ["conv1d", "dtype"]),
])
def test_errors(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_double_backward_is_refused():
    m = cft.Conv1d(1, 1, 3, dtype=D)
    x = torch.randn(1, 1, 6, dtype=D, requires_grad=True)
    gx, = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
