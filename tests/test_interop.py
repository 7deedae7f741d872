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
        assert y.grad_fn is not None  # the weight requires grad: the result is differentiable
        expected = F.conv2d(x, w, b, stride=2, padding=1, groups=2).detach()
        assert_close(y.detach().numpy(), expected.numpy(), dtype=dtype, reduction_size=18)

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


@requires_torch
class TestTorchGradients:
    """A torch tensor that requires grad goes through convfast.torch's autograd function: the result
    has a grad_fn and .backward() gives PyTorch's gradients (autograd of torch.nn.functional as the
    oracle)."""

    def setup_method(self):
        import torch
        self.torch = torch
        self.F = torch.nn.functional
        torch.manual_seed(0)

    def _leaves(self, *tensors):
        return [t.detach().clone().requires_grad_(True) for t in tensors]

    @pytest.mark.parametrize("rank", [1, 2, 3])
    @pytest.mark.parametrize("transposed", [False, True])
    def test_backward_matches_torch(self, rank, transposed):
        torch, F = self.torch, self.F
        x = torch.randn((2, 4) + (6,) * rank, dtype=torch.float64)
        if transposed:
            w = torch.randn((4, 3) + (3,) * rank, dtype=torch.float64)
            kwargs = dict(stride=2, padding=1, output_padding=1)
            ours, theirs = getattr(convfast, f"conv_transpose{rank}d"), getattr(F, f"conv_transpose{rank}d")
        else:
            w = torch.randn((3, 4) + (3,) * rank, dtype=torch.float64)
            kwargs = dict(stride=2, padding=1, dilation=1)
            ours, theirs = getattr(convfast, f"conv{rank}d"), getattr(F, f"conv{rank}d")
        b = torch.randn(3, dtype=torch.float64)
        x1, w1, b1 = self._leaves(x, w, b)
        x2, w2, b2 = self._leaves(x, w, b)
        y1 = ours(x1, w1, b1, **kwargs)
        y2 = theirs(x2, w2, b2, **kwargs)
        assert isinstance(y1, torch.Tensor) and y1.grad_fn is not None
        gy = torch.randn_like(y2)
        y1.backward(gy)
        y2.backward(gy)
        assert_close(y1.detach().numpy(), y2.detach().numpy())
        for ours_grad, torch_grad in ((x1.grad, x2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad)):
            assert_close(ours_grad.numpy(), torch_grad.numpy())

    def test_gradcheck(self):
        torch = self.torch
        x, w = self._leaves(torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(3, 2, 3, 2, dtype=torch.float64))
        assert torch.autograd.gradcheck(
            lambda a, b: convfast.conv2d(a, b, stride=2, padding="same", padding_mode="symmetric"), (x, w))

    def test_only_the_weight_requires_grad(self):
        torch, F = self.torch, self.F
        x = torch.randn(2, 3, 7, 7)
        w, = self._leaves(torch.randn(5, 3, 3, 3))
        w_ref, = self._leaves(w)
        convfast.conv2d(x, w, padding=1).square().sum().backward()
        F.conv2d(x, w_ref, padding=1).square().sum().backward()
        assert x.grad is None
        assert_close(w.grad.numpy(), w_ref.grad.numpy(), dtype="float32", reduction_size=2 * 49)

    def test_numpy_input_tensor_weight(self):
        torch, F = self.torch, self.F
        x = np.random.default_rng(1).standard_normal((1, 2, 6, 6))
        w, = self._leaves(torch.randn(4, 2, 3, 3, dtype=torch.float64))
        w_ref, = self._leaves(w)
        y = convfast.conv2d(x, w)
        assert isinstance(y, torch.Tensor) and y.grad_fn is not None
        y.sum().backward()
        F.conv2d(torch.from_numpy(x), w_ref).sum().backward()
        assert_close(w.grad.numpy(), w_ref.grad.numpy())

    def test_channels_last(self):
        torch, F = self.torch, self.F
        x_nhwc, w, b = self._leaves(torch.randn(2, 9, 8, 3, dtype=torch.float64), torch.randn(4, 3, 3, 3,
                                    dtype=torch.float64), torch.randn(4, dtype=torch.float64))
        x_ref, w_ref, b_ref = self._leaves(x_nhwc, w, b)
        y = convfast.conv2d(x_nhwc, w, b, stride=2, padding="same", data_format="channels_last")
        y_ref = F.conv2d(F.pad(x_ref.permute(0, 3, 1, 2), (0, 1, 1, 1)), w_ref, b_ref, stride=2).permute(0, 2, 3, 1)
        assert tuple(y.shape) == tuple(y_ref.shape) == (2, 5, 4, 4)
        gy = torch.randn_like(y_ref)
        y.backward(gy)
        y_ref.backward(gy)
        assert_close(y.detach().numpy(), y_ref.detach().numpy())
        for ours_grad, torch_grad in ((x_nhwc.grad, x_ref.grad), (w.grad, w_ref.grad), (b.grad, b_ref.grad)):
            assert_close(ours_grad.numpy(), torch_grad.numpy())

    def test_no_grad_mode_gives_a_plain_tensor(self):
        torch = self.torch
        x, w = self._leaves(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
        with torch.no_grad():
            y = convfast.conv2d(x, w)
        assert isinstance(y, torch.Tensor) and y.grad_fn is None and not y.requires_grad

    def test_inputs_not_mutated(self):
        torch = self.torch
        x, w = self._leaves(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
        before = (x.detach().clone(), w.detach().clone())
        convfast.conv2d(x, w, padding=1).sum().backward()
        assert torch.equal(x.detach(), before[0]) and torch.equal(w.detach(), before[1])

    def test_out_with_grad_rejected(self):
        torch = self.torch
        x, = self._leaves(torch.randn(1, 2, 5, 5))
        with pytest.raises(TypeError, match=r"conv2d: out="):
            convfast.conv2d(x, torch.randn(3, 2, 3, 3), out=np.empty((1, 3, 3, 3), np.float32))

    def test_mixed_dtypes_with_grad_rejected(self):
        torch = self.torch
        x, = self._leaves(torch.randn(1, 2, 5, 5, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"conv_transpose2d: .*float64.*float32"):
            convfast.conv_transpose2d(x, torch.randn(2, 3, 3, 3))

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    def test_unsupported_dtype_with_grad(self, dtype):
        torch = self.torch
        x, = self._leaves(torch.randn(1, 2, 5, 5).to(getattr(torch, dtype)))
        w = torch.randn(3, 2, 3, 3).to(getattr(torch, dtype))
        with pytest.raises(TypeError, match=rf"conv2d: x has dtype torch.{dtype}"):
            convfast.conv2d(x, w)

    def test_bfloat16_rejected_by_name(self):
        torch = self.torch
        x = torch.randn(1, 2, 5, 5, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match=r"conv2d: x has dtype torch.bfloat16, which convfast does not"):
            convfast.conv2d(x, torch.randn(3, 2, 3, 3))
        with pytest.raises(TypeError, match=r"conv_transpose1d: weight has dtype torch.bfloat16"):
            convfast.conv_transpose1d(torch.randn(1, 2, 5), torch.randn(2, 3, 3, dtype=torch.bfloat16))

    def test_float16_without_grad_still_computed(self):
        torch, F = self.torch, self.F
        x, w = torch.randn(1, 2, 6, 6).half(), torch.randn(3, 2, 3, 3).half()
        y = convfast.conv2d(x, w, padding=1)
        assert y.dtype == torch.float32
        assert_close(y.numpy(), F.conv2d(x.float(), w.float(), padding=1).numpy(), dtype="float32", reduction_size=18)

    def test_sparse_tensor_rejected(self):
        torch = self.torch
        with pytest.raises(TypeError, match=r"conv2d: x is a torch tensor with layout"):
            convfast.conv2d(torch.randn(1, 2, 5, 5).to_sparse(), torch.randn(3, 2, 3, 3))
