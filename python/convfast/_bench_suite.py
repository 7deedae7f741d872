"""The layer suite shared by ``python -m convfast bench`` and the asv benchmarks (``benchmarks/``).

A plain module: NumPy and convfast only; PyTorch is imported lazily, and only by the functions that
compare against it. It lives inside the package so that ``python -m convfast bench`` works from an
installed wheel; ``benchmarks/layers.py`` re-exports it for asv.

A case is one convolution layer of a well-known network at a batch size that makes one call take
roughly 5-100 ms on a 2-core AVX2 machine (PyTorch 2.13 timings). ``SUITES["small"]`` (9 cases,
about a minute with the PyTorch comparison), ``SUITES["batch1"]`` (layers of whole networks at
batch 1 and small maps, 0.01-10 ms a call, where per-call costs and the choice of algorithm weigh)
and ``SUITES["full"]`` (every case) name them.

>>> from convfast import _bench_suite as suite
>>> case = suite.CASES["resnet_3x3_64_56"]
>>> inputs = suite.make_inputs(case, "float32")
>>> y = suite.run_convfast(case, inputs)
>>> y.shape == case.output_shape()
True
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import convfast

LAYOUTS = ("channels_first", "channels_last")
DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One layer: PyTorch-style parameters (symmetric integer padding) and a batch size."""

    name: str
    op: str                       # "conv" or "conv_transpose"
    rank: int                     # spatial dimensions, 1-3
    batch: int
    in_channels: int
    out_channels: int
    spatial: Tuple[int, ...]      # input spatial size
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int = 1
    output_padding: Tuple[int, ...] = ()
    family: str = ""              # conv1d, conv2d, conv3d, pointwise, dilated, depthwise, grouped, transposed2d, ...
    note: str = ""                # where the layer comes from
    bias: bool = True

    @property
    def transposed(self) -> bool:
        return self.op == "conv_transpose"

    def weight_shape(self) -> Tuple[int, ...]:
        g = self.groups
        if self.transposed:
            return (self.in_channels, self.out_channels // g) + self.kernel
        return (self.out_channels, self.in_channels // g) + self.kernel

    def output_spatial(self) -> Tuple[int, ...]:
        out = []
        for i, (n, k, s, p, d) in enumerate(zip(self.spatial, self.kernel, self.stride, self.padding, self.dilation)):
            if self.transposed:
                out.append((n - 1) * s - 2 * p + d * (k - 1) + 1 + self.output_padding[i])
            else:
                out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    def input_shape(self, layout: str = "channels_first") -> Tuple[int, ...]:
        if layout == "channels_last":
            return (self.batch,) + self.spatial + (self.in_channels,)
        return (self.batch, self.in_channels) + self.spatial

    def output_shape(self, layout: str = "channels_first") -> Tuple[int, ...]:
        if layout == "channels_last":
            return (self.batch,) + self.output_spatial() + (self.out_channels,)
        return (self.batch, self.out_channels) + self.output_spatial()

    def describe(self) -> str:
        def axes(t):
            return "x".join(map(str, t))
        text = (f"{self.op}{self.rank}d N={self.batch} {self.in_channels}->{self.out_channels} "
                f"{axes(self.spatial)} k{axes(self.kernel)} s{axes(self.stride)} p{axes(self.padding)}")
        if any(d != 1 for d in self.dilation):
            text += f" d{axes(self.dilation)}"
        if any(self.output_padding):
            text += f" op{axes(self.output_padding)}"
        if self.groups != 1:
            text += f" g{self.groups}"
        return text


def _case(name, op, rank, batch, cin, cout, spatial, kernel, stride=1, padding=0, dilation=1, groups=1,
          output_padding=0, family="", note="") -> Case:
    def axes(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank
    if not family:
        family = f"{'transposed' if op == 'conv_transpose' else 'conv'}{rank}d"
    return Case(name=name, op=op, rank=rank, batch=batch, in_channels=cin, out_channels=cout, spatial=axes(spatial),
                kernel=axes(kernel), stride=axes(stride), padding=axes(padding), dilation=axes(dilation),
                groups=groups, output_padding=axes(output_padding), family=family, note=note)


_ALL: List[Case] = [
    # 2-D 3x3 layers of the classic image networks.
    _case("resnet_3x3_64_56", "conv", 2, 8, 64, 64, 56, 3, 1, 1, note="ResNet conv2_x 3x3"),
    _case("resnet_3x3_128_28", "conv", 2, 8, 128, 128, 28, 3, 1, 1, note="ResNet conv3_x 3x3"),
    _case("resnet_3x3_256_14", "conv", 2, 8, 256, 256, 14, 3, 1, 1, note="ResNet conv4_x 3x3"),
    _case("vgg_3x3_512_14", "conv", 2, 4, 512, 512, 14, 3, 1, 1, note="VGG-16 conv5 3x3"),
    _case("unet_3x3_64_128", "conv", 2, 2, 64, 64, 128, 3, 1, 1, note="U-Net first level at 128x128"),
    _case("stem_7x7s2_3_64_224", "conv", 2, 8, 3, 64, 224, 7, 2, 3, family="stem", note="ResNet stem, C_in=3"),
    # 1x1 (pointwise) layers.
    _case("pointwise_1x1_256_64_56", "conv", 2, 8, 256, 64, 56, 1, 1, 0, family="pointwise",
          note="ResNet bottleneck 1x1 reduce"),
    _case("pointwise_1x1s2_256_512_56", "conv", 2, 8, 256, 512, 56, 1, 2, 0, family="pointwise",
          note="ResNet downsample shortcut 1x1 stride 2"),
    # Dilated (atrous) layers.
    _case("dilated_3x3d2_256_28", "conv", 2, 4, 256, 256, 28, 3, 1, 2, 2, family="dilated",
          note="DeepLab dilation 2"),
    _case("dilated_3x3d6_256_32", "conv", 2, 2, 256, 256, 32, 3, 1, 6, 6, family="dilated",
          note="DeepLab ASPP dilation 6"),
    # Depthwise and grouped.
    _case("depthwise_3x3_256_56", "conv", 2, 8, 256, 256, 56, 3, 1, 1, groups=256, family="depthwise",
          note="MobileNet depthwise 3x3"),
    _case("depthwise_3x3s2_256_56", "conv", 2, 8, 256, 256, 56, 3, 2, 1, groups=256, family="depthwise",
          note="MobileNet depthwise 3x3 stride 2"),
    _case("depthwise_3x3_128_112", "conv", 2, 8, 128, 128, 112, 3, 1, 1, groups=128, family="depthwise",
          note="MobileNet depthwise 3x3 at 112x112"),
    _case("grouped_3x3g32_128_56", "conv", 2, 8, 128, 128, 56, 3, 1, 1, groups=32, family="grouped",
          note="ResNeXt-50 32x4d 3x3"),
    # 1-D.
    _case("audio1d_k9_64_16000", "conv", 1, 1, 64, 64, 16000, 9, 1, 4, note="1-D audio, 1 s at 16 kHz"),
    # 3-D.
    _case("conv3d_1_32_32", "conv", 3, 4, 1, 32, 32, 3, 1, 1, note="3-D CNN first layer, C_in=1"),
    _case("conv3d_32_64_32", "conv", 3, 1, 32, 64, 32, 3, 1, 1, note="3-D CNN 3x3x3"),
    _case("conv3d_s2_32_64_32", "conv", 3, 2, 32, 64, 32, 3, 2, 1, note="3-D CNN 3x3x3 stride 2"),
    # Transposed.
    _case("convT_k2s2_128_64_28", "conv_transpose", 2, 8, 128, 64, 28, 2, 2, 0, note="U-Net up-convolution"),
    _case("convT_k3s2p1op1_128_64_28", "conv_transpose", 2, 8, 128, 64, 28, 3, 2, 1, output_padding=1,
          note="decoder k3 s2 p1 op1"),
    _case("convT_k4s2p1_256_128_16", "conv_transpose", 2, 4, 256, 128, 16, 4, 2, 1, note="DCGAN generator"),
    _case("convT3d_k2s2_64_32_16", "conv_transpose", 3, 4, 64, 32, 16, 2, 2, 0, note="3-D U-Net up-convolution"),
]

# Batch 1 (inference) and the small layers of whole networks, where per-call costs, thread start-up
# and the choice of algorithm matter more than the FMA rate: SUITES["batch1"].
_BATCH1: List[Case] = [
    _case("percall_3x3_1_1_8", "conv", 2, 1, 1, 1, 8, 3, 1, 1, note="trivial layer: per-call cost"),
    # 1x1 with 32-256 channels.
    _case("b1_pointwise_1x1_32_192_28", "conv", 2, 1, 32, 192, 28, 1, family="pointwise",
          note="MobileNetV2 expand 1x1"),
    _case("b1_pointwise_1x1_192_32_28", "conv", 2, 1, 192, 32, 28, 1, family="pointwise",
          note="MobileNetV2 project 1x1"),
    _case("b1_pointwise_1x1_64_256_56", "conv", 2, 1, 64, 256, 56, 1, family="pointwise",
          note="ResNet-50 bottleneck expand 1x1"),
    _case("b1_pointwise_1x1s2_64_128_56", "conv", 2, 1, 64, 128, 56, 1, 2, family="pointwise",
          note="ResNet-18 downsample shortcut 1x1 stride 2"),
    _case("b1_pointwise1d_32_32_16000", "conv", 1, 1, 32, 32, 16000, 1, family="pointwise",
          note="WaveNet residual/skip 1x1"),
    _case("b1_pointwise1d_256_128_4000", "conv", 1, 1, 256, 128, 4000, 1, family="pointwise",
          note="1-D encoder 1x1"),
    # 3x3 stride 2.
    _case("b1_3x3s2_64_128_56", "conv", 2, 1, 64, 128, 56, 3, 2, 1, note="ResNet-18 layer2.0.conv1 3x3 stride 2"),
    _case("b1_3x3s2_256_512_14", "conv", 2, 1, 256, 512, 14, 3, 2, 1, note="ResNet-18 layer4.0.conv1 3x3 stride 2"),
    # First layers (1-3 input channels).
    _case("b1_stem_7x7s2_3_64_224", "conv", 2, 1, 3, 64, 224, 7, 2, 3, family="stem", note="ResNet stem at batch 1"),
    _case("b1_stem_3x3s2_3_32_224", "conv", 2, 1, 3, 32, 224, 3, 2, 1, family="stem",
          note="MobileNet/EfficientNet stem at batch 1"),
    _case("b1_stem1d_k7_1_32_16000", "conv", 1, 1, 1, 32, 16000, 7, 1, 3, note="1-D first layer (audio), C_in=1"),
    _case("mnist_3x3_1_32_28", "conv", 2, 64, 1, 32, 28, 3, 1, 1, family="stem",
          note="MNIST CNN first layer, batch 64"),
    # 3x3 with 512 channels on small maps.
    _case("b1_3x3_512_7", "conv", 2, 1, 512, 512, 7, 3, 1, 1, note="ResNet-18 layer4 3x3 on 7x7"),
    _case("b1_3x3_512_4", "conv", 2, 1, 512, 512, 4, 3, 1, 1, note="ResNet-18 layer4 3x3 on 4x4 (112x112 input)"),
    # Depthwise with many channels on small maps.
    _case("b1_depthwise_3x3_32_112", "conv", 2, 1, 32, 32, 112, 3, 1, 1, groups=32, family="depthwise",
          note="MobileNetV2 first depthwise"),
    _case("b1_depthwise_3x3_384_14", "conv", 2, 1, 384, 384, 14, 3, 1, 1, groups=384, family="depthwise",
          note="MobileNetV2 depthwise 384 on 14x14"),
    _case("b1_depthwise_3x3_576_14", "conv", 2, 1, 576, 576, 14, 3, 1, 1, groups=576, family="depthwise",
          note="MobileNetV2 depthwise 576 on 14x14"),
    _case("b1_depthwise_3x3_960_7", "conv", 2, 1, 960, 960, 7, 3, 1, 1, groups=960, family="depthwise",
          note="MobileNetV2 depthwise 960 on 7x7"),
    _case("b1_depthwise_5x5_672_14", "conv", 2, 1, 672, 672, 14, 5, 1, 2, groups=672, family="depthwise",
          note="EfficientNet-B0 depthwise 5x5"),
    # Grouped with 16 channels per group.
    _case("b1_grouped_3x3g8_128_28", "conv", 2, 1, 128, 128, 28, 3, 1, 1, groups=8, family="grouped",
          note="grouped 3x3, 16 channels per group"),
    _case("b1_grouped_3x3g16_256_14", "conv", 2, 1, 256, 256, 14, 3, 1, 1, groups=16, family="grouped",
          note="RegNet-style grouped 3x3, 16 channels per group"),
    # 1-D with 32 channels.
    _case("b1_conv1d_k3_32_16000", "conv", 1, 1, 32, 32, 16000, 3, 1, 1, note="1-D k3, 32 channels"),
    _case("b1_conv1d_k4s2_32_16000", "conv", 1, 1, 32, 32, 16000, 4, 2, 1, note="1-D k4 stride 2 (encoder)"),
]
_ALL += _BATCH1

CASES: Dict[str, Case] = {c.name: c for c in _ALL}

SUITES: Dict[str, List[str]] = {
    "small": ["resnet_3x3_64_56", "vgg_3x3_512_14", "stem_7x7s2_3_64_224", "pointwise_1x1_256_64_56",
              "depthwise_3x3_256_56", "audio1d_k9_64_16000", "conv3d_s2_32_64_32", "convT_k4s2p1_256_128_16",
              "convT3d_k2s2_64_32_16"],
    "batch1": [c.name for c in _BATCH1],
    "full": [c.name for c in _ALL],
}


def get_suite(name: str = "small") -> List[Case]:
    """The cases of a suite ("small", "full"), or of a comma-separated list of case names."""
    if name in SUITES:
        return [CASES[n] for n in SUITES[name]]
    names = [n.strip() for n in name.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ValueError(f"unknown suite or case {', '.join(unknown) or name!r}; suites: {sorted(SUITES)}, "
                         f"cases: {sorted(CASES)}")
    return [CASES[n] for n in names]


PASSES = ("forward", "backward")


def flops(case: Case, pass_: str = "forward") -> int:
    """2 x multiply-accumulates. A transposed convolution counts the MACs of the convolution it is the
    adjoint of: 2 N C_in C_out/groups prod(kernel) prod(input spatial). The backward pass (grad_input
    and grad_weight) is two such products."""
    per_position = case.in_channels * (case.out_channels // case.groups) * math.prod(case.kernel)
    positions = math.prod(case.spatial if case.transposed else case.output_spatial())
    return 2 * case.batch * per_position * positions * (2 if pass_ == "backward" else 1)


# ----------------------------------------------------------------------------------------------
# Inputs and the calls
# ----------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """NumPy operands of one case in one dtype and layout; PyTorch views of them made on demand."""

    case: Case
    dtype: np.dtype
    layout: str
    x: np.ndarray
    weight: np.ndarray
    bias: Optional[np.ndarray]
    _torch: Optional[tuple] = field(default=None, repr=False)

    def torch_operands(self):
        """(x, weight, bias) as torch tensors sharing memory with the NumPy arrays where the layout
        allows; channels_last inputs become channels_last tensors (weights converted once, as
        ``model.to(memory_format=torch.channels_last)`` would)."""
        if self._torch is None:
            import torch
            x = torch.from_numpy(self.x)
            w = torch.from_numpy(self.weight)
            b = None if self.bias is None else torch.from_numpy(self.bias)
            if self.layout == "channels_last":
                x = x.movedim(-1, 1)  # (N, C, *spatial) view with channels-last strides
                fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(self.case.rank)
                if fmt is not None:
                    w = w.contiguous(memory_format=fmt)
            self._torch = (x, w, b)
        return self._torch


def make_inputs(case: Case, dtype="float32", layout: str = "channels_first", seed: int = 0) -> Inputs:
    """Random operands with PyTorch's default initialisation scale, so outputs are O(1)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, case.input_shape(layout)).astype(dtype)
    wshape = case.weight_shape()
    bound = 1.0 / math.sqrt(wshape[1] * math.prod(case.kernel))
    weight = rng.uniform(-bound, bound, wshape).astype(dtype)
    bias = rng.uniform(-bound, bound, case.out_channels).astype(dtype) if case.bias else None
    return Inputs(case, dtype, layout, x, weight, bias)


def _kwargs(case: Case) -> dict:
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    if case.transposed:
        kw["output_padding"] = case.output_padding
    return kw


def run_convfast(case: Case, inputs: Inputs, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The case through convfast's functional API; the result is in the inputs' layout."""
    fn = getattr(convfast, f"{case.op}{case.rank}d")
    return fn(inputs.x, inputs.weight, inputs.bias, data_format=inputs.layout, out=out, **_kwargs(case))


def run_torch(case: Case, inputs: Inputs) -> np.ndarray:
    """The case through torch.nn.functional (imported here); the result is returned as a NumPy view in
    the inputs' layout (no copy)."""
    import torch
    import torch.nn.functional as F
    x, w, b = inputs.torch_operands()
    fn = getattr(F, f"{case.op}{case.rank}d")
    with torch.inference_mode():
        y = fn(x, w, b, **_kwargs(case))
    if inputs.layout == "channels_last":
        y = y.movedim(1, -1)
    return y.numpy()


def run_reference(case: Case, inputs: Inputs) -> np.ndarray:
    """The case through convfast.reference (pure NumPy, float64 accumulation): slow, for small cases."""
    fn = getattr(convfast.reference, f"{case.op}{case.rank}d")
    return fn(inputs.x, inputs.weight, inputs.bias, data_format=inputs.layout, **_kwargs(case))


# The backward pass timed: grad_input and grad_weight (PyTorch's output_mask), not grad_bias.
BACKWARD_MASK = (True, True, False)


def make_grad_output(case: Case, dtype="float32", layout: str = "channels_first", seed: int = 1) -> np.ndarray:
    """A random output gradient of the case's output shape, in the layout."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, case.output_shape(layout)).astype(np.dtype(dtype))


def run_convfast_backward(case: Case, inputs: Inputs, grad_output: np.ndarray):
    """(grad_input, grad_weight) through convfast.{op}{rank}d_backward; grad_input in the inputs' layout."""
    fn = getattr(convfast, f"{case.op}{case.rank}d_backward")
    gx, gw, _ = fn(grad_output, inputs.x, inputs.weight, None, data_format=inputs.layout, needs=BACKWARD_MASK,
                   **_kwargs(case))
    return gx, gw


def run_torch_backward(case: Case, inputs: Inputs, grad_output: np.ndarray):
    """(grad_input, grad_weight) through torch.ops.aten.convolution_backward (what autograd calls for a
    convolution), with the same output_mask; NumPy views in the inputs' layout."""
    import torch
    x, w, _ = inputs.torch_operands()
    gy = torch.from_numpy(grad_output)
    if inputs.layout == "channels_last":
        gy = gy.movedim(-1, 1)
    output_padding = list(case.output_padding) if case.transposed else [0] * case.rank
    with torch.inference_mode():
        gx, gw, _ = torch.ops.aten.convolution_backward(
            gy, x, w, None, list(case.stride), list(case.padding), list(case.dilation), case.transposed,
            output_padding, case.groups, list(BACKWARD_MASK))
    if inputs.layout == "channels_last":
        gx = gx.movedim(1, -1)
    return gx.numpy(), gw.numpy()


# ----------------------------------------------------------------------------------------------
# onnxruntime: a single-Conv ONNX model per case
# ----------------------------------------------------------------------------------------------
#
# The model is written as ONNX protobuf bytes by the few lines below (field numbers of onnx.proto),
# so that the comparison needs only onnxruntime, not the onnx package.

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_int(field_no: int, value: int) -> bytes:
    return _varint(field_no << 3) + _varint(value)


def _pb_bytes(field_no: int, payload) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else bytes(payload)
    return _varint((field_no << 3) | 2) + _varint(len(payload)) + payload


_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 11}


def _onnx_tensor(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    dims = b"".join(_pb_int(1, d) for d in array.shape)
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()  # ONNX raw_data is little-endian
    return dims + _pb_int(2, _ONNX_TYPES[array.dtype]) + _pb_bytes(8, name) + _pb_bytes(9, raw)


def _onnx_value_info(name: str, dtype, shape) -> bytes:
    dims = b"".join(_pb_bytes(1, _pb_int(1, d)) for d in shape)
    tensor_type = _pb_int(1, _ONNX_TYPES[np.dtype(dtype)]) + _pb_bytes(2, dims)
    return _pb_bytes(1, name) + _pb_bytes(2, _pb_bytes(1, tensor_type))


def _onnx_ints(name: str, values) -> bytes:
    return _pb_bytes(1, name) + b"".join(_pb_int(8, v) for v in values) + _pb_int(20, 7)  # type INTS


def _onnx_int(name: str, value: int) -> bytes:
    return _pb_bytes(1, name) + _pb_int(3, value) + _pb_int(20, 2)  # type INT


ONNX_OPSET = 17


def onnx_model_bytes(case: Case, weight: np.ndarray, bias: Optional[np.ndarray]) -> bytes:
    """A serialised ONNX ModelProto: one Conv or ConvTranspose node (NCHW) with the case's
    parameters, the weight and bias as initializers, input "x" and output "y" of the case's shapes."""
    dtype = np.dtype(weight.dtype)
    attrs = [_onnx_ints("kernel_shape", case.kernel), _onnx_ints("strides", case.stride),
             _onnx_ints("pads", tuple(case.padding) * 2), _onnx_ints("dilations", case.dilation),
             _onnx_int("group", case.groups)]
    if case.transposed:
        attrs.append(_onnx_ints("output_padding", case.output_padding))
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    node = (b"".join(_pb_bytes(1, n) for n in inputs) + _pb_bytes(2, "y") + _pb_bytes(3, "layer")
            + _pb_bytes(4, "ConvTranspose" if case.transposed else "Conv") + b"".join(_pb_bytes(5, a) for a in attrs))
    graph = _pb_bytes(1, node) + _pb_bytes(2, case.name) + _pb_bytes(5, _onnx_tensor("w", weight))
    if bias is not None:
        graph += _pb_bytes(5, _onnx_tensor("b", bias))
    graph += _pb_bytes(11, _onnx_value_info("x", dtype, case.input_shape()))
    graph += _pb_bytes(12, _onnx_value_info("y", dtype, case.output_shape()))
    opset = _pb_bytes(1, "") + _pb_int(2, ONNX_OPSET)
    return _pb_int(1, 8) + _pb_bytes(2, "convfast-bench") + _pb_bytes(7, graph) + _pb_bytes(8, opset)


def ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        return True
    except Exception:
        return False


def ort_cpu_session(model: bytes, threads: Optional[int] = None):
    """An onnxruntime InferenceSession (CPU) of an ONNX model at ``threads`` intra-op threads
    (default: convfast's count), sequential, all graph optimisations on, and no spinning of its
    thread pool after a run (spinning threads would take the cores from the library timed next)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or convfast.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_session(case: Case, inputs: Inputs, threads: Optional[int] = None):
    """The case's one-node model in ort_cpu_session."""
    return ort_cpu_session(onnx_model_bytes(case, inputs.weight, inputs.bias), threads)


def run_ort(session, inputs: Inputs) -> np.ndarray:
    """One run of an :func:`ort_session` on the inputs (channels_first only)."""
    return session.run(None, {"x": inputs.x})[0]


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# Checking and timing
# ----------------------------------------------------------------------------------------------

TOLERANCE = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10}


def check_close(result: np.ndarray, expected: np.ndarray, dtype) -> Tuple[bool, float]:
    """(ok, error): error is max |result - expected| / max |expected|; ok when every element is within
    ``tol * (|expected| + max |expected|)`` with tol 2e-4 (float32) or 1e-10 (float64)."""
    expected = np.asarray(expected)
    if result.shape != expected.shape:
        return False, math.inf
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    scale = scale or 1.0
    error = float(np.max(np.abs(result.astype(np.float64) - expected))) / scale if expected.size else 0.0
    tol = TOLERANCE[np.dtype(dtype)]
    return bool(np.allclose(result, expected, rtol=tol, atol=tol * scale)), error


def set_threads(n: int) -> None:
    """The same thread count for convfast and (if it is imported) PyTorch."""
    convfast.set_num_threads(n)
    import sys
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def measure_interleaved(fns: Dict[str, Callable[[], object]], budget_s: float = 2.0, warmup: int = 2,
                     min_repeats: int = 5, max_repeats: int = 2000) -> Dict[str, dict]:
    """Times several callables against each other in one process.

    Each is warmed up ``warmup`` times; the number of rounds is chosen from the warm-up timings so
    that all rounds together take about ``budget_s`` (clamped to [min_repeats, max_repeats]). In
    every round each callable runs once, the order alternating between rounds so that slow drifts of
    the machine (clock, neighbours) hit all of them alike. Returns, per name, the median, minimum
    and all samples in milliseconds.
    """
    names = list(fns)
    estimate = {}
    for name in names:
        best = math.inf
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fns[name]()
            best = min(best, time.perf_counter() - t0)
        estimate[name] = best
    per_round = sum(estimate.values())
    rounds = int(min(max_repeats, max(min_repeats, budget_s // max(per_round, 1e-9))))
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(s), "min_ms": min(s), "rounds": len(s), "samples_ms": s}
            for name, s in samples.items()}


def gflops(case: Case, ms: float, pass_: str = "forward") -> float:
    return flops(case, pass_) / (ms * 1e6)


def compare_case(case: Case, dtype="float32", layout: str = "channels_first", threads: Optional[int] = None,
                 against: Sequence[str] = ("torch",), budget_s: float = 2.0, seed: int = 0,
                 reference_max_flops: float = 2e8, pass_: str = "forward") -> dict:
    """Checks convfast against each comparator, then times them interleaved.

    ``against`` may hold "torch", "numpy" (convfast.reference, only for cases of at most
    ``reference_max_flops``) and "ort" (onnxruntime running a one-node ONNX model of the case,
    channels_first only; when both torch and ort are timed, ``best_peer`` and ``speedup_vs_best``
    name the faster of the two). convfast's result is checked against PyTorch (or, without PyTorch,
    against the NumPy reference when the case is small enough) before anything is timed; a case that
    fails the check is not timed. Returns a dict of plain values (JSON-serialisable).

    ``pass_="backward"`` times grad_input + grad_weight instead (convfast.*_backward against
    torch.ops.aten.convolution_backward with output_mask (True, True, False)); both gradients are
    checked against PyTorch first (the NumPy reference has no backward: "numpy" is ignored).
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    dtype = np.dtype(dtype)
    if threads is not None:
        set_threads(threads)
    inputs = make_inputs(case, dtype, layout, seed)
    result = {"case": case.name, "description": case.describe(), "family": case.family, "dtype": dtype.name,
              "layout": layout, "threads": convfast.get_num_threads(), "flops": flops(case, pass_),
              "pass": pass_, "checked_against": None, "ok": None, "error": None}
    if pass_ == "backward":
        return _compare_backward(case, inputs, result, against, budget_s)
    y = run_convfast(case, inputs)
    try:  # which engine path ran (private, informative only)
        result["algorithm"] = convfast._core.last_algorithm()
    except Exception:
        pass
    fns: Dict[str, Callable[[], object]] = {"convfast": lambda: run_convfast(case, inputs)}
    use_reference = "numpy" in against and flops(case) <= reference_max_flops
    if "numpy" in against and not use_reference:
        result["numpy_skipped"] = f"larger than {reference_max_flops:.0e} FLOP"
    if "torch" in against:
        ok, err = check_close(y, run_torch(case, inputs), dtype)
        result.update(checked_against="torch", ok=ok, error=err)
        fns["torch"] = lambda: run_torch(case, inputs)
    if use_reference:
        ref = run_reference(case, inputs)
        if result["checked_against"] is None:
            ok, err = check_close(y, ref, dtype)
            result.update(checked_against="numpy", ok=ok, error=err)
        fns["numpy"] = lambda: run_reference(case, inputs)
    if "ort" in against:
        _add_ort(case, inputs, y, result, fns)
    if result["ok"] is False:
        return result
    return _record_timings(case, fns, budget_s, result, "forward")


def _add_ort(case: Case, inputs: Inputs, y: np.ndarray, result: dict, fns: Dict[str, Callable[[], object]]) -> None:
    """Adds onnxruntime to the timed callables when it can run the case; its result must match
    convfast's (which is checked against PyTorch or NumPy) or it is left out with the reason."""
    if inputs.layout != "channels_first":
        result["ort_skipped"] = "ONNX Conv takes channels_first (NCHW) only"
        return
    try:
        session = ort_session(case, inputs)
        y_ort = run_ort(session, inputs)
    except Exception as exc:  # e.g. no float64 kernel for this operator
        text = str(exc)
        if "NOT_IMPLEMENTED" in text:
            result["ort_skipped"] = f"onnxruntime has no {inputs.dtype.name} kernel for it"
        else:
            result["ort_skipped"] = f"onnxruntime cannot run it: {text.splitlines()[0][:120]}"
        return
    ok, err = check_close(y_ort, y, inputs.dtype)
    if not ok:
        result["ort_skipped"] = f"onnxruntime's result differs from convfast's by {err:.2g} (relative)"
        return
    fns["ort"] = lambda: run_ort(session, inputs)


def _record_timings(case: Case, fns: Dict[str, Callable[[], object]], budget_s: float, result: dict,
                    pass_: str) -> dict:
    """Time fns interleaved; add each one's median/min ms and GFLOP/s and the speedups to result."""
    timings = measure_interleaved(fns, budget_s=budget_s)
    for name, t in timings.items():
        result[f"{name}_ms"] = t["median_ms"]
        result[f"{name}_min_ms"] = t["min_ms"]
        result[f"{name}_gflops"] = gflops(case, t["median_ms"], pass_)
        result["rounds"] = t["rounds"]
    for name in ("torch", "numpy", "ort"):
        if f"{name}_ms" in result:
            result[f"speedup_vs_{name}"] = result[f"{name}_ms"] / result["convfast_ms"]
    peers = [name for name in ("torch", "ort") if f"{name}_ms" in result]
    if len(peers) > 1:
        best = min(peers, key=lambda name: result[f"{name}_ms"])
        result["best_peer"] = best
        result["speedup_vs_best"] = result[f"{best}_ms"] / result["convfast_ms"]
    return result


def _compare_backward(case: Case, inputs: Inputs, result: dict, against: Sequence[str], budget_s: float) -> dict:
    gy = make_grad_output(case, inputs.dtype, inputs.layout)
    gx, gw = run_convfast_backward(case, inputs, gy)
    fns: Dict[str, Callable[[], object]] = {"convfast": lambda: run_convfast_backward(case, inputs, gy)}
    if "torch" in against:
        tgx, tgw = run_torch_backward(case, inputs, gy)
        ok_x, err_x = check_close(gx, tgx, inputs.dtype)
        ok_w, err_w = check_close(gw, tgw, inputs.dtype)
        result.update(checked_against="torch", ok=ok_x and ok_w, error=max(err_x, err_w),
                      error_grad_input=err_x, error_grad_weight=err_w)
        fns["torch"] = lambda: run_torch_backward(case, inputs, gy)
    if result["ok"] is False:
        return result
    return _record_timings(case, fns, budget_s, result, "backward")


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


__all__ = ["Case", "CASES", "SUITES", "LAYOUTS", "DTYPES", "Inputs", "get_suite", "flops", "gflops", "make_inputs",
           "run_convfast", "run_torch", "run_reference", "torch_available", "check_close", "set_threads",
           "measure_interleaved", "compare_case", "geometric_mean", "TOLERANCE", "PASSES", "BACKWARD_MASK",
           "make_grad_output", "run_convfast_backward", "run_torch_backward", "ort_available", "ort_session",
           "run_ort", "onnx_model_bytes"]
