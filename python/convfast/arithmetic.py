"""Output-size, SAME-padding and receptive-field arithmetic (the seed tutorials' formulas).

All helpers accept an int or one int per spatial axis for every size parameter and return one value
per axis (tuples), using exactly the rules the operators use (:mod:`convfast._spec`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Tuple, Union

from ._spec import (_as_sequence, _is_int, as_int, conv_out_size, effective_kernel, normalize_padding, per_axis,
                    resolve_conv_pads, resolve_transposed_pads, same_pads, transposed_out_shape)


def _geometry(func, spatial_shape, kernel_size, stride, dilation):
    spatial = _spatial(func, spatial_shape)
    r = len(spatial)
    return (spatial, per_axis(func, "kernel_size", kernel_size, r, minimum=1),
            per_axis(func, "stride", stride, r, minimum=1), per_axis(func, "dilation", dilation, r, minimum=1))


def _spatial(func, spatial_shape):
    if _is_int(spatial_shape):
        return (as_int(func, "spatial_shape", spatial_shape, minimum=1),)
    items = _as_sequence(func, "spatial_shape", spatial_shape)
    if not items:
        raise ValueError(f"{func}: spatial_shape must have at least one axis")
    return tuple(as_int(func, "spatial_shape", v, minimum=1) for v in items)


def conv_output_shape(spatial_shape, kernel_size, stride=1, padding=0, dilation=1) -> Tuple[int, ...]:
    """Spatial output shape of a convolution: floor((in + before + after - dilation*(k-1) - 1) / stride) + 1.

    ``padding`` takes every form the operators take (int, per-axis ints, (before, after) pairs,
    "valid", "same", "same_lower").

    >>> conv_output_shape((224, 224), 7, stride=2, padding=3)
    (112, 112)
    >>> conv_output_shape(10, 3, stride=2, padding="same")
    (5,)
    """
    func = "conv_output_shape"
    spatial, kernel, stride, dilation = _geometry(func, spatial_shape, kernel_size, stride, dilation)
    pads = resolve_conv_pads(func, padding, spatial, kernel, stride, dilation)
    out = tuple(conv_out_size(n, k, s, d, p) for n, k, s, d, p in zip(spatial, kernel, stride, dilation, pads))
    if any(o < 1 for o in out):
        raise ValueError(f"{func}: kernel {kernel} (dilation {dilation}) does not fit the padded input "
                         f"{spatial} with padding {pads}; output would be {out}")
    return out


def conv_transpose_output_shape(spatial_shape, kernel_size, stride=1, padding=0, output_padding=0,
                                dilation=1) -> Tuple[int, ...]:
    """Spatial output shape of a transposed convolution:
    (in - 1)*stride - before - after + dilation*(k-1) + 1 + output_padding.

    >>> conv_transpose_output_shape((4, 4), 3, stride=2, padding=1, output_padding=1)
    (8, 8)
    """
    func = "conv_transpose_output_shape"
    spatial, kernel, stride, dilation = _geometry(func, spatial_shape, kernel_size, stride, dilation)
    op = per_axis(func, "output_padding", output_padding, len(spatial), minimum=0)
    pads, implied = resolve_transposed_pads(func, padding, kernel, stride, dilation)
    op = tuple(a + b for a, b in zip(op, implied))
    return transposed_out_shape(func, spatial, kernel, stride, dilation, pads, op)


def same_padding(spatial_shape, kernel_size, stride=1, dilation=1, *, lower=False) -> Tuple[Tuple[int, int], ...]:
    """TF/ONNX "SAME" padding for any stride and dilation, as (before, after) per axis.

    out = ceil(in / stride); total = max((out - 1)*stride + dilation*(k - 1) + 1 - in, 0);
    before = total // 2 (SAME_UPPER; ``lower=True`` puts the odd pixel before).

    >>> same_padding((224, 224), 7, stride=2)
    ((2, 3), (2, 3))
    """
    spatial, kernel, stride, dilation = _geometry("same_padding", spatial_shape, kernel_size, stride, dilation)
    return same_pads(spatial, kernel, stride, dilation, lower=lower)


class ReceptiveField(NamedTuple):
    """After one layer: ``size`` = receptive field of one output pixel, ``jump`` = distance between
    adjacent outputs, ``start`` = centre of the first output's field (all in input pixels, start as a 0-based
    pixel coordinate;
    can be negative or fractional when padding reaches outside the image). Per-axis tuples when the
    layers are multi-dimensional."""
    size: Union[int, Tuple[int, ...]]
    jump: Union[int, Tuple[int, ...]]
    start: Union[float, Tuple[float, ...]]


_LAYER_KEYS = {"kernel_size", "stride", "dilation", "padding", "name", "type", "kind"}


def receptive_field(layers: Iterable[Mapping]) -> list:
    """Receptive-field growth through a stack of convolution / pooling layers.

    Each layer is a mapping with ``kernel_size`` and optional ``stride`` (1), ``dilation`` (1) and
    ``padding`` (0: an int, per-axis ints, (before, after) pairs, "valid", or "same" when the stride
    is 1). Per layer: size += (dilation*(k-1)) * jump; start += ((dilation*(k-1))/2 - before) * jump;
    jump *= stride.

    >>> [r.size for r in receptive_field([{"kernel_size": 3}] * 3)]
    [3, 5, 7]
    >>> receptive_field([{"kernel_size": 3, "dilation": 2}])[0].size
    5
    """
    func = "receptive_field"
    layers = list(layers)
    rank = 1
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise TypeError(f"{func}: layer {i} must be a mapping with kernel_size, got {type(layer).__name__}")
        if "kernel_size" not in layer:
            raise ValueError(f"{func}: layer {i} has no kernel_size")
        unknown = set(layer) - _LAYER_KEYS
        if unknown:
            raise ValueError(f"{func}: layer {i} has unknown keys {sorted(unknown)}")
        for key in ("kernel_size", "stride", "dilation"):
            v = layer.get(key, 1)
            if not _is_int(v):
                rank = max(rank, len(_as_sequence(func, key, v)))
        pad = layer.get("padding", 0)
        if not isinstance(pad, str) and not _is_int(pad):
            rank = max(rank, len(_as_sequence(func, "padding", pad)))
    scalar = all(_is_int(layer.get(k, 1)) for layer in layers for k in ("kernel_size", "stride", "dilation")) \
        and all(isinstance(layer.get("padding", 0), str) or _is_int(layer.get("padding", 0)) for layer in layers)

    size, jump, start = [1] * rank, [1] * rank, [0.0] * rank
    records = []
    for i, layer in enumerate(layers):
        name = f"{func}: layer {i}"
        kernel = per_axis(name, "kernel_size", layer["kernel_size"], rank, minimum=1)
        stride = per_axis(name, "stride", layer.get("stride", 1), rank, minimum=1)
        dilation = per_axis(name, "dilation", layer.get("dilation", 1), rank, minimum=1)
        padding = normalize_padding(name, layer.get("padding", 0), rank)
        if padding == "valid":
            before = (0,) * rank
        elif padding in ("same", "same_lower"):
            if any(s != 1 for s in stride):
                raise ValueError(f"{name}: padding={padding!r} with stride > 1 depends on the input size; "
                                 f"give explicit padding")
            before = tuple((effective_kernel(k, d) - 1) // 2 if padding == "same"
                           else effective_kernel(k, d) // 2
                           for k, d in zip(kernel, dilation))
        else:
            before = tuple(p[0] for p in padding)
        for a in range(rank):
            span = effective_kernel(kernel[a], dilation[a]) - 1
            start[a] = start[a] + (span / 2 - before[a]) * jump[a]
            size[a] = size[a] + span * jump[a]
            jump[a] = jump[a] * stride[a]
        starts = [int(s) if float(s).is_integer() else s for s in start]
        if scalar:
            records.append(ReceptiveField(size[0], jump[0], starts[0]))
        else:
            records.append(ReceptiveField(tuple(size), tuple(jump), tuple(starts)))
    return records
