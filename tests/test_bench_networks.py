"""The whole-network benchmark's helpers: every network, built tiny, gives the same outputs and
gradients with its convolutions swapped for convfast.torch as the unmodified torch.nn model; and the
one-node ONNX models of the layer suite's onnxruntime comparison compute the case's convolution."""
import copy

import numpy as np
import pytest

from conftest import requires_torch

pytestmark = requires_torch

TOL = 1e-8  # float64; a wrong stride, padding, group count or weight copy gives errors of order 1


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for both libraries: the tests check results, and tiny layers on a busy machine
    would otherwise wait for each other's threads."""
    import torch
    import convfast
    before = convfast.get_num_threads(), torch.get_num_threads()
    convfast.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    convfast.set_num_threads(before[0])
    torch.set_num_threads(before[1])


def _networks():
    from convfast import _bench_networks as bn
    return bn


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "unet2d", "unet3d", "wavenet",
                                  "dcgan"])
def test_swapped_network_matches_torch(name):
    import torch
    from torch import nn
    import convfast.torch as cft
    bn = _networks()
    net = bn.NETWORKS[name]
    torch.manual_seed(0)
    model = net.build(True).double()
    swapped = bn.swap_convs(model)

    # Every convolution is swapped (none left), names and parameter shapes unchanged, the original untouched.
    torch_convs = [m for m in model.modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                               nn.ConvTranspose2d, nn.ConvTranspose3d)]
    assert torch_convs and len(bn.conv_modules(model)) == len(torch_convs)
    assert not any(type(m).__module__.startswith("torch.nn") and "Conv" in type(m).__name__
                   for m in swapped.modules())
    assert sum(isinstance(m, cft._ConvNd) for m in swapped.modules()) == len(torch_convs)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in swapped.state_dict().items()}

    # Forward in eval mode at "batch 1" and "batch 8" shapes.
    for mode in ("forward_b1", "forward_b8"):
        x = torch.randn(net.input_shape(mode, tiny=True), dtype=torch.float64)
        model.eval()
        swapped.eval()
        with torch.no_grad():
            expected = model(x)
            actual = swapped(x)
        assert actual.shape == expected.shape
        scale = float(expected.abs().max())
        assert float((actual - expected).abs().max()) <= TOL * scale, mode

    # A training step: the loss and every parameter's gradient.
    x = torch.randn(net.input_shape("train_b8", tiny=True), dtype=torch.float64)
    outs, grads = [], []
    for m in (model, swapped):
        m.train()
        m.zero_grad(set_to_none=True)
        out = m(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum()
        loss.backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert float((outs[1] - outs[0]).abs().max()) <= TOL * float(outs[0].abs().max())
    assert grads[0].keys() == grads[1].keys()  # the same parameters get gradients (not all: WaveNet's last residual)
    total = float(torch.stack([g.norm() for g in grads[0].values()]).norm())
    for k, g in grads[0].items():
        err = float((grads[1][k] - g).norm())
        assert err <= TOL * max(float(g.norm()), 1e-4 * total), (k, err, float(g.norm()))


def test_check_network_flags_a_wrong_swap():
    """check_network reports a mismatch when one convolution's weights differ."""
    import torch
    bn = _networks()
    model, cf_model, x, target = bn.prepare(bn.NETWORKS["unet2d"], "train_b8", "float64", tiny=True)
    good = bn.check_network(model, cf_model, "train_b8", x, target)
    assert good["ok"] and good["gradient_error"] <= TOL
    convs = bn.conv_modules(cf_model)
    with torch.no_grad():
        convs[3][1].weight.mul_(1.01)  # followed by a training-mode batch norm: only the gradients change
    bad = bn.check_network(model, cf_model, "train_b8", x, target)
    assert not bad["ok"] and bad["output_error"] < 1e-4 and bad["gradient_error"] > 1e-4
    with torch.no_grad():
        convs[3][1].weight.div_(1.01)
        convs[-1][1].bias.add_(0.01)  # the head: the output changes
    bad = bn.check_network(model, cf_model, "forward_b1", x[:1])
    assert not bad["ok"] and bad["output_error"] > 1e-4


def test_swap_keeps_arguments_and_layer_types():
    import torch
    from torch import nn
    bn = _networks()
    model = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
                          nn.Conv2d(8, 16, 3, 1, 2, dilation=2, padding_mode="reflect"),
                          nn.Conv2d(16, 16, 3, 2, 1, groups=2), nn.Conv2d(16, 4, 1),
                          nn.ConvTranspose2d(4, 6, 3, 2, 1, output_padding=1, groups=2),
                          nn.Conv2d(6, 6, 1)).double()
    swapped = bn.swap_convs(model)
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = model(x), swapped(x)
    assert float((actual - expected).abs().max()) <= TOL * float(expected.abs().max())
    kinds = [bn.layer_type(m) for _, m in bn.conv_modules(model)]
    assert kinds == ["first layer (C_in<=3)", "depthwise 3x3", "3x3 dilated", "grouped 3x3 s2", "1x1",
                     "transposed 3x3 s2", "1x1"]
    assert bn.layer_type(model[6], (1, 6, 1, 1)) == "1x1 on 1x1 maps"
    assert bn.layer_type(nn.Conv1d(32, 64, 3, dilation=4)) == "1-D k3 dilated"
    assert bn.layer_type(nn.Conv3d(16, 16, 3, 2)) == "3-D 3x3x3 s2"


def test_instrument_times_every_convolution_forward_and_backward():
    import torch
    bn = _networks()
    model, cf_model, x, target = bn.prepare(bn.NETWORKS["wavenet"], "train_b8", "float32", tiny=True)
    for m in (model, cf_model):
        runner = bn.Runner(m, "train_b8", x, target)
        inst = bn.Instrument(m)
        inst.reset()
        runner.run()
        inst.remove()
        assert inst.times.keys() == dict(bn.conv_modules(m)).keys()
        modules = dict(bn.conv_modules(m))
        assert all(f > 0 for f, _ in inst.times.values()), inst.times
        # a backward time wherever autograd ran the layer's backward (not WaveNet's unused last residual)
        assert all((b > 0) == (modules[k].weight.grad is not None) for k, (_, b) in inst.times.items()), inst.times
        assert sum(modules[k].weight.grad is not None for k in modules) >= len(modules) - 1
        assert not m._forward_hooks and all(not c._forward_hooks for c in m.modules())


# The onnxruntime comparison of the layer suite: the ONNX bytes written by _bench_suite.
ORT_CASES = ["resnet_3x3_64_56", "stem_7x7s2_3_64_224", "dilated_3x3d2_256_28", "grouped_3x3g32_128_56",
             "b1_depthwise_5x5_672_14", "b1_conv1d_k4s2_32_16000", "conv3d_s2_32_64_32", "convT_k3s2p1op1_128_64_28",
             "convT3d_k2s2_64_32_16", "percall_3x3_1_1_8"]


@pytest.mark.parametrize("name", ORT_CASES)
def test_onnx_model_of_a_case_matches_torch(name):
    pytest.importorskip("onnxruntime")
    from convfast import _bench_suite as suite
    case = suite.CASES[name]
    small = copy.copy(case)
    object.__setattr__(small, "batch", 1)
    inputs = suite.make_inputs(small, "float32")
    session = suite.ort_session(small, inputs, threads=1)
    y = suite.run_ort(session, inputs)
    ok, err = suite.check_close(y, suite.run_torch(small, inputs), "float32")
    assert ok, err


def test_ort_in_compare_case():
    pytest.importorskip("onnxruntime")
    from convfast import _bench_suite as suite
    r = suite.compare_case(suite.CASES["percall_3x3_1_1_8"], "float32", against=("torch", "ort"), budget_s=0.05)
    assert r["ok"] and "ort_ms" in r and r["best_peer"] in ("torch", "ort")
    assert r["speedup_vs_best"] == pytest.approx(min(r["torch_ms"], r["ort_ms"]) / r["convfast_ms"])
    r64 = suite.compare_case(suite.CASES["percall_3x3_1_1_8"], "float64", against=("torch", "ort"), budget_s=0.05)
    assert "ort_ms" not in r64 and "float64" in r64["ort_skipped"]


def test_onnxruntime_peer_of_a_network():
    """The forward modes' onnxruntime peer: the unmodified model exported to ONNX computes the
    model's output (within float32 rounding), and the report carries its time and the ratio against
    the faster peer for the forward modes only."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import torch
    bn = _networks()
    net = bn.NETWORKS["resnet18"]
    model, _, x, _ = bn.prepare(net, "forward_b1", "float32", tiny=True)
    model.eval()
    run, err = bn.ort_network(model, x, 1)
    assert run is not None, err
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.allclose(run()[0], expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))
    assert err < 1e-4
    result = bn.run_network(net, "float32", batch=2, budget_s=0.0, min_rounds=1, instrumented_runs=1,
                            modes=("forward_b1", "train_b8"), peers=("ort",), threads=1)
    fwd, train = result["modes"]["forward_b1"], result["modes"]["train_b8"]
    assert fwd["onnxruntime_min_ms"] > 0
    assert fwd["ratio_best_peer"] == pytest.approx(min(fwd["torch_min_ms"], fwd["onnxruntime_min_ms"]) /
                                                   fwd["convfast_min_ms"])
    assert "onnxruntime_min_ms" not in train and "ratio_best_peer" not in train
    quiet = bn.run_network(net, "float32", batch=2, budget_s=0.0, min_rounds=1, instrumented_runs=1,
                           modes=("forward_b1",), peers=(), threads=1)
    assert "onnxruntime_min_ms" not in quiet["modes"]["forward_b1"]
