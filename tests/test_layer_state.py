"""The layer state that convfast.Conv* and convfast.torch.Conv* share (_layer_params): the six
classes of each module (names, ranks, module, docstrings), the weight layout in both directions
(the weight's shape from the channels; the channels from a weight in ``from_weights``) and PyTorch's
default initialisation bound, which the NumPy layers draw with NumPy's generator."""
import copy
import math
import pickle

import numpy as np
import pytest

import convfast
from convfast import reference
from convfast._spec import conv_spec, conv_transpose_spec
from conftest import requires_torch

NAMES = [f"Conv{r}d" for r in (1, 2, 3)] + [f"ConvTranspose{r}d" for r in (1, 2, 3)]


def _ref(layer, x):
    name, rank = type(layer).__name__, layer._rank
    if layer._transposed:
        spec = conv_transpose_spec(name, rank, x, layer.weight, layer.bias, layer.stride, layer.padding,
                                   layer.output_padding, layer.groups, layer.dilation, None, "channels_first")
        return reference.conv_transpose_reference(spec, x, layer.weight, layer.bias)
    spec = conv_spec(name, rank, x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                     layer.groups, layer.padding_mode, "channels_first")
    return reference.conv_reference(spec, x, layer.weight, layer.bias)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_layer_classes(name):
    rank, transposed = int(name[-2]), name.startswith("ConvTranspose")
    cls = getattr(convfast, name)
    assert cls.__name__ == cls.__qualname__ == name and cls.__module__ == "convfast.layers"
    assert cls._rank == rank and cls._transposed is transposed
    assert cls.__doc__ == f"{rank}-D {'transposed convolution' if transposed else 'convolution'} layer " \
                          f"(torch.nn.{name} signature)."
    layer = cls(4, 6, 3, stride=2, groups=2, seed=0, dtype=np.float64)
    assert layer.kernel_size == (3,) * rank and layer.stride == (2,) * rank
    assert layer.weight.shape == ((4, 3) if transposed else (6, 2)) + (3,) * rank
    assert repr(layer).startswith(f"{name}(4, 6, kernel_size={(3,) * rank}, stride={(2,) * rank}, ")
    x = np.random.default_rng(rank).standard_normal((2, 4) + (5, 4, 3)[:rank])
    np.testing.assert_allclose(layer(x), _ref(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("groups", [1, 3])
def test_from_weights_reads_the_channels_back(name, groups):
    # from_weights inverts the weight layout: the layer it builds has the weight's shape again and
    # the channels torch.nn gives a layer with that weight.
    rank, transposed = int(name[-2]), name.startswith("ConvTranspose")
    rng = np.random.default_rng(groups)
    w = rng.standard_normal((6, 2) + (2, 3, 2)[:rank])
    b = rng.standard_normal(2 * groups if transposed else 6)
    layer = getattr(convfast, name).from_weights(w, b, groups=groups, padding=1)
    cin, cout = (6, 2 * groups) if transposed else (2 * groups, 6)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (cin, cout, groups)
    assert layer.weight.shape == w.shape and layer.dtype == np.float64
    np.testing.assert_array_equal(layer.weight, w)
    x = rng.standard_normal((1, cin) + (5, 4, 3)[:rank])
    np.testing.assert_allclose(layer(x), _ref(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, groups", [("Conv2d", 1), ("Conv3d", 2), ("ConvTranspose1d", 1),
                                          ("ConvTranspose2d", 4)])
def test_numpy_layers_draw_pytorchs_default_bound(name, groups):
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, fan_in = C_in/G * prod(k) for a
    # convolution and C_out/G * prod(k) for a transposed one (weight.shape[1] in torch.nn's layout).
    rank, transposed = int(name[-2]), name.startswith("ConvTranspose")
    k = (3, 2, 2)[:rank]
    layer = getattr(convfast, name)(8, 16, k, groups=groups, seed=1, dtype=np.float64)
    fan_in = (16 if transposed else 8) // groups * math.prod(k)
    bound = 1 / math.sqrt(fan_in)
    for values in (layer.weight, layer.bias):
        assert np.abs(values).max() <= bound
    # 16 * 8 / G * prod(k) >= 96 draws: the extremes come close to the bound
    assert np.abs(layer.weight).max() > 0.9 * bound
    assert abs(layer.weight.mean()) < 0.25 * bound
    again = getattr(convfast, name)(8, 16, k, groups=groups, seed=np.random.default_rng(1), dtype=np.float64)
    np.testing.assert_array_equal(again.weight, layer.weight)
    np.testing.assert_array_equal(again.bias, layer.bias)


@requires_torch
@pytest.mark.parametrize("name", NAMES)
def test_torch_module_classes_pickle_and_copy(name):
    import torch
    import convfast.torch as cft
    rank, transposed = int(name[-2]), name.startswith("ConvTranspose")
    cls = getattr(cft, name)
    assert cls.__name__ == cls.__qualname__ == name and cls.__module__ == "convfast.torch"
    assert cls._rank == rank and cls._transposed is transposed and issubclass(cls, cft._ConvNd)
    assert cls.__doc__ == f"torch.nn.{name} computed by convfast (same signature, parameters and initialisation)."
    torch.manual_seed(rank)
    ours = cls(4, 6, 3, stride=2, groups=2, dtype=torch.float64)
    torch.manual_seed(rank)
    theirs = getattr(torch.nn, name)(4, 6, 3, stride=2, groups=2, dtype=torch.float64)
    x = torch.randn((2, 4) + (5, 4, 3)[:rank], dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(x)
        for module in (ours, pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
            assert type(module) is cls
            torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["Conv2d", "ConvTranspose3d"])
def test_numpy_layers_pickle_and_copy_after_calls(name):
    # A called layer keeps compiled plans (engine objects); its copies rebuild their own and keep
    # the weights read-only and their own.
    rank = int(name[-2])
    layer = getattr(convfast, name)(3, 4, 2, stride=2, seed=3, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 3) + (5, 4, 3)[:rank])
    first = layer(x)
    np.testing.assert_allclose(first, _ref(layer, x), rtol=1e-12, atol=1e-12)
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), copy.copy(layer)):
        assert type(twin) is type(layer) and repr(twin) == repr(layer)
        assert not twin.weight.flags.writeable and not twin.bias.flags.writeable
        for _ in range(2):  # the first call plans, the second runs the kept plan
            np.testing.assert_array_equal(twin(x), first)
        twin.weight = -twin.weight
        np.testing.assert_allclose(twin(x), _ref(twin, x), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(layer(x), first)


@pytest.mark.parametrize("shape, functional_choice, kept_choice", [
    ((8, 512, 4, 4), "", "winograd"),            # 32 tiles: the weight transform is paid once
    ((1, 512, 7, 7), "pixel_lanes_gemm_in_place", "gather_gemm"),  # packed once, streamed faster
])
def test_kept_plans_choose_for_many_calls(monkeypatch, shape, functional_choice, kept_choice):
    """A layer keeps its plan, so its choice does not amortise weight packing or the Winograd
    weight transform over one call as the functional form's does; both agree with the reference."""
    from conftest import assert_close
    for var in ("CONVFAST_ALGO", "CONVFAST_WEIGHTS_IN_PLACE", "CONVFAST_PIXEL_LANES", "CONVFAST_ISA"):
        monkeypatch.delenv(var, raising=False)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((512, 512, 3, 3)) / 48).astype(np.float32)
    y_functional = convfast.conv2d(x, w, padding=1)
    algo = convfast._core.last_algorithm()
    assert not algo.startswith("winograd") and algo.startswith(functional_choice), algo
    layer = convfast.Conv2d.from_weights(w, padding=1)
    y_layer = layer(x)
    assert layer.algorithm(x).startswith(kept_choice), layer.algorithm(x)
    expected = reference.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    assert_close(y_layer, expected, np.float32, 512 * 9)
    assert_close(y_functional, expected, np.float32, 512 * 9)
