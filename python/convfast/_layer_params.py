"""The parameters of a convolution layer, shared by ``convfast.Conv*`` (layers.py) and
``convfast.torch.Conv*`` (torch.py): validation of the constructor's arguments, in one order, and
the weight's shape. Each layer class keeps its own storage of weight and bias (read-only NumPy
arrays there, ``nn.Parameter`` here) and its own initialisation."""
from __future__ import annotations

from ._spec import as_int, normalize_padding, normalize_padding_mode, per_axis


def set_geometry(layer, rank: int, transposed: bool, in_channels, out_channels, kernel_size, stride, padding,
                 dilation, groups, padding_mode, output_padding) -> None:
    """Validates the arguments and sets them on ``layer`` (padding in normalize_padding's form);
    errors name the layer's class."""
    name = type(layer).__name__
    layer.in_channels = as_int(name, "in_channels", in_channels, minimum=1)
    layer.out_channels = as_int(name, "out_channels", out_channels, minimum=1)
    layer.kernel_size = per_axis(name, "kernel_size", kernel_size, rank, minimum=1)
    layer.stride = per_axis(name, "stride", stride, rank, minimum=1)
    layer.dilation = per_axis(name, "dilation", dilation, rank, minimum=1)
    layer.output_padding = per_axis(name, "output_padding", output_padding, rank, minimum=0)
    layer.groups = as_int(name, "groups", groups, minimum=1)
    layer.padding = normalize_padding(name, padding, rank)
    layer.padding_mode = normalize_padding_mode(name, padding_mode)
    if transposed and layer.padding_mode != "zeros":
        raise ValueError(f"{name}: padding_mode must be 'zeros' for a transposed convolution, got {padding_mode!r}")


def weight_shape(layer, transposed: bool) -> tuple:
    """Checks that the channel counts divide into the groups; the weight's shape (torch.nn's
    layout: (C_out, C_in/G, *k), transposed (C_in, C_out/G, *k))."""
    name = type(layer).__name__
    for label, c in (("in_channels", layer.in_channels), ("out_channels", layer.out_channels)):
        if c % layer.groups:
            raise ValueError(f"{name}: {label}={c} is not divisible by groups={layer.groups}")
    if transposed:
        return (layer.in_channels, layer.out_channels // layer.groups) + layer.kernel_size
    return (layer.out_channels, layer.in_channels // layer.groups) + layer.kernel_size
