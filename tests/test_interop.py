"""Drop-in use with other array types: PyTorch CPU tensors (and anything exposing __array__ or
__dlpack__) go in; the result has the type of x."""
import numpy as np
import pytest

import convfast
from conftest import assert_close, requires_torch


class ArrayLike:
    """Exposes only __array__ (as xarray, pandas and friends do)."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


class DLPackOnly:
    """Exposes only the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


@pytest.mark.parametrize("wrapper", [ArrayLike, DLPackOnly])
def test_array_protocols_in_numpy_out(wrapper):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    y = convfast.conv2d(wrapper(x), wrapper(w), padding=1)
    assert isinstance(y, np.ndarray)
    assert_close(y, convfast.reference.conv2d(x, w, padding=1))


@requires_torch
class TestTorch:
    def setup_method(self):
        import torch
        self.torch = torch
        self.F = torch.nn.functional
        torch.manual_seed(0)

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_conv2d_tensor_in_tensor_out(self, dtype):
        torch, F = self.torch, self.F
        dt = getattr(torch, dtype)
        x = torch.randn(2, 4, 11, 9, dtype=dt)
        w = torch.randn(6, 2, 3, 3, dtype=dt, requires_grad=True)  # an nn.Parameter-like weight
        b = torch.randn(6, dtype=dt)
        y = convfast.conv2d(x, w, b, stride=2, padding=1, groups=2)
        assert isinstance(y, torch.Tensor) and y.dtype == dt
        expected = F.conv2d(x, w, b, stride=2, padding=1, groups=2).detach()
        assert_close(y.numpy(), expected.numpy(), dtype=dtype, reduction_size=18)

    def test_inputs_not_copied_or_mutated(self):
        torch = self.torch
        x = torch.randn(1, 2, 6, 6)
        before = x.clone()
        view = convfast._interop.to_numpy("conv2d", "x", x)
        assert view.ctypes.data == x.data_ptr()  # zero-copy in
        convfast.conv2d(x, torch.randn(3, 2, 3, 3))
        assert torch.equal(x, before)

    def test_non_contiguous_tensor(self):
        torch, F = self.torch, self.F
        x = torch.randn(2, 3, 10, 12, dtype=torch.float64).transpose(2, 3)[..., ::2]
        w = torch.randn(5, 3, 3, 2, dtype=torch.float64)
        y = convfast.conv2d(x, w, padding=(1, 0))
        assert_close(y.numpy(), F.conv2d(x, w, padding=(1, 0)).numpy())

    @pytest.mark.parametrize("rank", [1, 2, 3])
    def test_transposed_and_layers(self, rank):
        torch, F = self.torch, self.F
        x = torch.randn((1, 4) + (5,) * rank, dtype=torch.float64)
        wt = torch.randn((4, 3) + (3,) * rank, dtype=torch.float64)
        f = getattr(convfast, f"conv_transpose{rank}d")
        tf = getattr(F, f"conv_transpose{rank}d")
        y = f(x, wt, stride=2, padding=1, output_padding=1)
        assert isinstance(y, torch.Tensor)
        assert_close(y.numpy(), tf(x, wt, stride=2, padding=1, output_padding=1).numpy())
        layer = getattr(convfast, f"Conv{rank}d")(4, 2, 3, padding="same", dtype=np.float64)
        out = layer(x)
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 2) + (5,) * rank

    def test_layer_weights_from_torch(self):
        torch, F = self.torch, self.F
        ref = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect")
        layer = convfast.Conv2d.from_weights(ref.weight, ref.bias, stride=2, padding=1, padding_mode="reflect")
        x = torch.randn(2, 3, 16, 16)
        assert_close(layer(x).numpy(), ref(x).detach().numpy(), dtype="float32", reduction_size=27)

    def test_complex_tensor_rejected(self):
        torch = self.torch
        with pytest.raises(TypeError, match="conv2d"):
            convfast.conv2d(torch.randn(1, 1, 3, 3, dtype=torch.complex64), torch.randn(1, 1, 1, 1))
