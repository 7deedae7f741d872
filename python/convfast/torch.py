"""PyTorch drop-ins computed by convfast: an ``autograd.Function``, functional ops and ``nn.Module`` layers.

    import convfast.torch as cft
    model = torch.nn.Sequential(cft.Conv2d(1, 8, 3, stride=2, padding="same"), torch.nn.ReLU(), ...)

Imported only when the user imports it (``import convfast`` never imports torch).

* ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d``: torch.nn's constructor signatures (in_channels,
  out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype;
  transposed: output_padding, and ``forward(input, output_size=None)``), the same parameters
  (``weight``, ``bias``: ``nn.Parameter``; torch.nn's shapes, so ``state_dict`` keys and tensors are
  interchangeable with ``torch.nn.Conv2d`` & co.), initialised exactly as torch.nn does
  (``kaiming_uniform_(a=sqrt(5))``, bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), so that under
  the same ``torch.manual_seed`` both draw identical weights. Plus convfast's extras: ``padding=``
  "same" with any stride, "same_lower", (before, after) pairs, and ``padding_mode="symmetric"``;
  transposed layers also accept "same" / "same_lower" / "valid".
* ``conv1d`` ... ``conv_transpose3d``: the functional forms (torch.nn.functional's signatures,
  plus ``padding_mode`` for the convolutions and ``output_size`` for the transposed ones).
* ``ConvFunction``: the ``torch.autograd.Function`` underneath; forward with convfast.conv*,
  backward with convfast.conv*_backward, asking only for the gradients autograd needs
  (``ctx.needs_input_grad``, PyTorch's ``output_mask``).

CPU tensors are handed to convfast as zero-copy NumPy views; results come back as tensors sharing
convfast's output buffers. Tensors on another device go to convfast as they are, so they work
wherever convfast's operators accept them (its GPU backend). Modules called without autograd
recording (``torch.no_grad()``, ``inference_mode``) keep their weights packed per input shape until a
parameter changes (another tensor, or an in-place update through it, which bumps its version counter);
writes through ``.data`` or a NumPy view are not seen, as they are not by autograd. float32 and float64 are supported;
input, weight and bias must share dtype and device, as torch.nn requires. The backward pass is
differentiable only once (``once_differentiable``): double backward (e.g. gradient penalties)
raises.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import init

from . import backward as _backward
from . import functional as _functional
from ._layer_params import LayerParams, concrete_layers
from ._spec import conv_spec, conv_transpose_spec

__all__ = ["ConvParams", "ConvFunction", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
           "ConvTranspose3d"]

_DTYPES = (torch.float32, torch.float64)


class ConvParams(NamedTuple):
    """Everything but the tensors: the arguments of convfast.conv{rank}d / conv_transpose{rank}d."""

    rank: int
    transposed: bool
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    padding_mode: str = "zeros"        # convolution only
    output_padding: object = 0         # transposed only
    output_size: object = None         # transposed only

    @property
    def name(self) -> str:
        return f"conv_transpose{self.rank}d" if self.transposed else f"conv{self.rank}d"

    def spec(self, x, weight, bias):
        """The normalised call (convfast._spec) for NumPy operands; raises as the functional form does."""
        if self.transposed:
            return conv_transpose_spec(self.name, self.rank, x, weight, bias, self.stride, self.padding,
                                       self.output_padding, self.groups, self.dilation, self.output_size,
                                       "channels_first")
        return conv_spec(self.name, self.rank, x, weight, bias, self.stride, self.padding, self.dilation,
                         self.groups, self.padding_mode, "channels_first")

    def forward(self, x, weight, bias, calls: Optional[dict] = None, planned: bool = False):
        """y. ``calls`` (a module's): CPU calls keep a ``_core.Call`` per input shape and parameters
        there (see :meth:`run`)."""
        if x.device.type != "cpu":  # to convfast as they are: its GPU backend takes them
            return self._functional(x, weight, bias)
        # zero-copy NumPy views, so that the call takes convfast's fast path for a seen signature
        if calls is None:
            weight, bias = weight.detach().numpy(), None if bias is None else bias.detach().numpy()
            return torch.from_numpy(self._functional(x.detach().numpy(), weight, bias))
        weight, bias = _parameter_views(calls, weight, bias)
        return torch.from_numpy(self.run(x.detach().numpy(), weight, bias, calls, planned))

    def run(self, x, weight, bias, calls: dict, planned: bool = False):
        """y for NumPy operands through the ``_core.Call`` kept in ``calls`` for x's shape and these
        parameters (made on a miss, after the full validation); ``planned`` ones hold the weights
        packed, valid only while the weights stay as they are (the caller drops them otherwise)."""
        key = (x.shape, self)
        call = calls.get(key)
        y = None if call is None else call.run(x, weight, bias)
        if y is None:
            y = _functional.run_spec(self.spec(x, weight, bias), x, weight, bias, None, calls, key, planned)
        return y

    def _functional(self, x, weight, bias):
        fn = getattr(_functional, self.name)
        if self.transposed:
            return fn(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation,
                      output_size=self.output_size)
        return fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                  padding_mode=self.padding_mode)

    def backward(self, grad_output, x, weight, needs):
        fn = getattr(_backward, f"{self.name}_backward")
        cpu = x.device.type == "cpu"
        if cpu:  # NumPy views: the backward's kept specs apply to a seen signature
            grad_output, x, weight = grad_output.detach().numpy(), x.detach().numpy(), weight.detach().numpy()
        if self.transposed:
            grads = fn(grad_output, x, weight, None, self.stride, self.padding, self.output_padding, self.groups,
                       self.dilation, output_size=self.output_size, needs=needs)
        else:
            grads = fn(grad_output, x, weight, None, self.stride, self.padding, self.dilation, self.groups,
                       padding_mode=self.padding_mode, needs=needs)
        return tuple(None if g is None else torch.from_numpy(g) for g in grads) if cpu else grads


def _parameter_views(calls: dict, weight, bias):
    """NumPy views of a module's weight and bias, kept in its ``calls`` between calls (a trivial
    training-mode call 28.1 -> 26.9 us: making the views costs about 3, checking the key 1.5). A
    view stays right while the tensor's data pointer, shape and strides are those it was made from:
    the kept view holds the old storage, so another storage (``.data =``, ``.double()``) cannot take
    its address; in-place updates (optimizer steps) are seen through it."""
    key = (weight.data_ptr(), weight.shape, weight.stride()) + \
        (() if bias is None else (bias.data_ptr(), bias.shape, bias.stride()))
    kept = calls.get("parameter views")
    if kept is None or kept[0] != key:
        kept = calls["parameter views"] = (key, weight.detach().numpy(),
                                           None if bias is None else bias.detach().numpy())
    return kept[1], kept[2]


def _check_tensors(func: str, x, weight, bias) -> None:
    if type(x) is torch.Tensor and x.dtype in _DTYPES and type(weight) is nn.Parameter and \
            weight.dtype == x.dtype and weight.device == x.device and \
            (bias is None or (type(bias) is nn.Parameter and bias.dtype == x.dtype and bias.device == x.device)):
        return  # the modules' common case, checked in one expression
    for label, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is None and label == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"convfast.torch.{func}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"convfast.torch.{func}: {label} has dtype {t.dtype}; convfast computes float32 and "
                            f"float64 tensors")
        if t.dtype != x.dtype:
            raise TypeError(f"convfast.torch.{func}: input ({x.dtype}) and {label} ({t.dtype}) must have the same "
                            f"dtype")
        if t.device != x.device:
            raise ValueError(f"convfast.torch.{func}: input is on {x.device} but {label} is on {t.device}")


class ConvFunction(torch.autograd.Function):
    """``ConvFunction.apply(input, weight, bias, params)``: y = convfast's convolution with
    ``params`` (a :class:`ConvParams`); its backward computes only the gradients autograd needs.
    An optional fifth argument, a dict, keeps the forward's ``_core.Call`` per input shape
    (:meth:`ConvParams.forward`'s ``calls``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, params: ConvParams, calls: Optional[dict] = None):
        y = params.forward(x, weight, bias, calls)
        ctx.params = params
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None, None
        gx, gw, gb = ctx.params.backward(grad_output, x, weight, needs)
        return gx, gw, gb, None, None


def _records_graph(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                        (bias is not None and bias.requires_grad))


def _apply(params: ConvParams, x, weight, bias):
    _check_tensors(params.name, x, weight, bias)
    if _records_graph(x, weight, bias):
        return ConvFunction.apply(x, weight, bias, params)
    return params.forward(x, weight, bias)  # no graph to record: no autograd.Function around the call


def _make_conv(rank: int):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
        return _apply(ConvParams(rank, False, stride, padding, dilation, groups, padding_mode), input, weight, bias)

    conv.__name__ = conv.__qualname__ = f"conv{rank}d"
    conv.__doc__ = (f"torch.nn.functional.conv{rank}d computed by convfast (differentiable), plus padding_mode "
                    f"and convfast's padding forms (strided \"same\", \"same_lower\", (before, after) pairs).")
    return conv


def _make_conv_transpose(rank: int):
    def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                       output_size=None):
        params = ConvParams(rank, True, stride, padding, dilation, groups, "zeros", output_padding, output_size)
        return _apply(params, input, weight, bias)

    conv_transpose.__name__ = conv_transpose.__qualname__ = f"conv_transpose{rank}d"
    conv_transpose.__doc__ = (f"torch.nn.functional.conv_transpose{rank}d computed by convfast (differentiable), "
                              f"plus output_size and padding=\"same\" / \"same_lower\" / pairs.")
    return conv_transpose


conv1d, conv2d, conv3d = (_make_conv(r) for r in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(r) for r in (1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def _padding_attribute(padding):
    """torch.nn's form of a normalised padding: a string, a tuple of ints when symmetric, else
    the (before, after) pairs."""
    if isinstance(padding, str):
        return padding
    if all(a == b for a, b in padding):
        return tuple(a for a, _ in padding)
    return tuple(padding)


class _ConvNd(LayerParams, nn.Module):
    __constants__ = ["stride", "padding", "dilation", "groups", "padding_mode", "output_padding", "in_channels",
                     "out_channels", "kernel_size"]

    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
               output_padding, device, dtype):
        name = type(self).__name__
        self._set_params(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                         output_padding)
        self.padding = _padding_attribute(self.padding)
        self.transposed = self._transposed
        shape = self._weight_shape()
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype must be torch.float32 or torch.float64, got {dtype}")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.ConvNd's initialisation, draw for draw (so torch.manual_seed reproduces it)."""
        with torch.no_grad():
            # kaiming_uniform_ itself, not U(-_init_bound, _init_bound): its bound, computed through the
            # leaky_relu gain, differs from 1/sqrt(fan_in) in the last bit for 71% of fan_in values
            init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = self._init_bound(self.weight.shape)
                init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if isinstance(self.padding, str) or any(p != 0 for p in self.padding):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._rank:
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * self._rank:
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    # Each module keeps a _core.Call per input shape and parameters: ``_calls`` for calls that
    # record a graph (the weights change every training step, so they are packed per call), and
    # ``_plans`` for the others, whose plans hold the weights packed (and Winograd-transformed)
    # once. The plans are dropped when the weight or bias changes: another tensor, or an in-place
    # update through the parameter (optimizer steps, load_state_dict, copy_ under no_grad), which
    # bumps the version counter autograd reads (writes through .data or a NumPy view go unseen,
    # as by autograd). The kept NumPy views hold the weights' storage, so that no new tensor can
    # take its address while the plans live.
    _calls = _plans = _plans_weights = _plans_arrays = None

    def _forward(self, x, output_size=None):
        weight, bias = self.weight, self.bias
        params = self._params(output_size)
        if self._calls is None:
            self._calls = {}
        if _records_graph(x, weight, bias):
            _check_tensors(params.name, x, weight, bias)
            return ConvFunction.apply(x, weight, bias, params, self._calls)
        if type(x) is not torch.Tensor or x.device.type != "cpu" or weight.device.type != "cpu":
            return _apply(params, x, weight, bias)
        weights_key = (weight._version, weight.data_ptr(), weight.stride()) + \
            (() if bias is None else (bias._version, bias.data_ptr()))
        if weights_key != self._plans_weights:
            _check_tensors(params.name, x, weight, bias)
            self._plans, self._plans_weights = {}, weights_key
            self._plans_arrays = (weight.detach().numpy(), None if bias is None else bias.detach().numpy())
        xn = x.detach().numpy() if x.requires_grad else x.numpy()
        w, b = self._plans_arrays
        call = self._plans.get((xn.shape, params))
        y = None if call is None else call.run(xn, w, b)
        if y is None:  # a new shape, or operands that do not match the kept call: the full checks
            _check_tensors(params.name, x, weight, bias)
            y = params.run(xn, w, b, self._plans, planned=True)
        return torch.from_numpy(y)

    def __getstate__(self):
        # kept calls hold engine objects, which neither pickle nor deepcopy: a copy makes its own
        state = self.__dict__.copy()
        for name in ("_calls", "_plans", "_plans_weights", "_plans_arrays"):
            state.pop(name, None)
        return state

    def _params(self, output_size=None) -> ConvParams:
        if self._transposed:
            # As torch.nn: an output_size overrides the layer's output_padding.
            return ConvParams(self._rank, True, self.stride, self.padding, self.dilation, self.groups, "zeros",
                              0 if output_size is not None else self.output_padding, output_size)
        return ConvParams(self._rank, False, self.stride, self.padding, self.dilation, self.groups, self.padding_mode)


class _Conv(_ConvNd):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding: Union[str, int, tuple] = 0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=None) -> None:
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, 0,
                    device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward(input)


class _ConvTranspose(_ConvNd):
    _transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None) -> None:
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                    output_padding, device, dtype)

    def forward(self, input: torch.Tensor, output_size: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        if output_size is not None:
            output_size = tuple(int(v) for v in output_size)
        return self._forward(input, output_size)


Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = concrete_layers(
    __name__, _Conv, _ConvTranspose, "{torch_name} computed by convfast (same signature, parameters and "
                                     "initialisation).")
