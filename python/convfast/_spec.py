"""Parameter normalisation and validation: the one place where user-facing arguments become a
:class:`ConvSpec`.

Both the compiled path (:mod:`convfast.functional`) and the NumPy oracle (:mod:`convfast.reference`)
start from the spec built here, so they cannot disagree about what a call means; they only differ in
how they compute it.

Every error raised here names the public function, the parameter and the offending value.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from ._interop import to_numpy

Pairs = Tuple[Tuple[int, int], ...]

# Canonical padding-mode names, their np.pad equivalents and the code the kernels use.
PADDING_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3, "symmetric": 4}
PADDING_MODE_ALIASES = {"constant": "zeros", "edge": "replicate", "wrap": "circular"}
NUMPY_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                  "circular": "wrap", "symmetric": "symmetric"}

_LAYOUT_ALIASES = {
    "channels_first": "channels_first", "channels_last": "channels_last",
    "ncw": "channels_first", "ncl": "channels_first", "nchw": "channels_first", "ncdhw": "channels_first",
    "nwc": "channels_last", "nlc": "channels_last", "nhwc": "channels_last", "ndhwc": "channels_last",
}


# ----------------------------------------------------------------------------------------------
# Scalars and per-axis tuples
# ----------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def as_int(func: str, name: str, value, *, minimum: Optional[int] = None) -> int:
    """An integer parameter: Python/NumPy ints only (bool, float, None and strings are TypeErrors)."""
    if not _is_int(value):
        raise TypeError(f"{func}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{func}: {name} must be >= {minimum}, got {value}")
    return value


def _as_sequence(func: str, name: str, value):
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"{func}: {name} must be an int or a 1-D sequence of ints, got an array of shape {value.shape}")
        return list(value)
    if isinstance(value, (tuple, list)):
        return list(value)
    raise TypeError(f"{func}: {name} must be an int or a sequence of ints, got {value!r} ({type(value).__name__})")


def per_axis(func: str, name: str, value, rank: int, *, minimum: int) -> Tuple[int, ...]:
    """An int, or one int per spatial axis (a length-1 sequence is broadcast, as PyTorch does)."""
    if _is_int(value):
        return (as_int(func, name, value, minimum=minimum),) * rank
    items = _as_sequence(func, name, value)
    if len(items) == 1:
        items = items * rank
    if len(items) != rank:
        raise ValueError(f"{func}: {name} must be an int or {rank} ints (one per spatial axis), got {value!r}")
    return tuple(as_int(func, name, v, minimum=minimum) for v in items)


# ----------------------------------------------------------------------------------------------
# Shape arithmetic (shared by the public helpers in arithmetic.py)
# ----------------------------------------------------------------------------------------------

def effective_kernel(k: int, d: int) -> int:
    return (k - 1) * d + 1


def same_pads(spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int], lower: bool = False) -> Pairs:
    """TF/ONNX SAME for any stride and dilation: out = ceil(in / stride); the odd pixel goes after
    (SAME_UPPER) or before (SAME_LOWER)."""
    pads = []
    for n, k, s, d in zip(spatial, kernel, stride, dilation):
        out = -(-n // s)
        total = max((out - 1) * s + effective_kernel(k, d) - n, 0)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if lower else (small, big))
    return tuple(pads)


def conv_out_size(n: int, k: int, s: int, d: int, pads: Tuple[int, int]) -> int:
    return (n + pads[0] + pads[1] - effective_kernel(k, d)) // s + 1


def transposed_out_size(n: int, k: int, s: int, d: int, pads: Tuple[int, int], output_padding: int) -> int:
    return (n - 1) * s - pads[0] - pads[1] + effective_kernel(k, d) + output_padding


def transposed_same(kernel, stride, dilation, lower: bool = False):
    """Padding and output_padding for a transposed convolution whose output is input * stride
    (Keras Conv2DTranspose / ONNX auto_pad): the adjoint of a strided SAME convolution."""
    pads, extra = [], []
    for k, s, d in zip(kernel, stride, dilation):
        total = effective_kernel(k, d) - s
        if total >= 0:
            small, big = total // 2, total - total // 2
            pads.append((big, small) if lower else (small, big))
            extra.append(0)
        else:  # kernel shorter than the stride: nothing to crop, the gap is appended at the end
            pads.append((0, 0))
            extra.append(-total)
    return tuple(pads), tuple(extra)


def normalize_padding(func: str, padding, rank: int):
    """Returns either a string ('valid', 'same', 'same_lower') or explicit (before, after) pairs."""
    if isinstance(padding, str):
        key = padding.lower()
        if key in ("valid", "same", "same_lower", "same_upper"):
            return "same" if key == "same_upper" else key
        raise ValueError(f"{func}: padding must be 'valid', 'same', 'same_lower', an int, ints or (before, after) "
                         f"pairs, got {padding!r}")
    if _is_int(padding):
        p = as_int(func, "padding", padding, minimum=0)
        return ((p, p),) * rank
    items = _as_sequence(func, "padding", padding)
    if len(items) == 1:
        items = items * rank
    if len(items) != rank:
        raise ValueError(f"{func}: padding must have one entry per spatial axis ({rank}), got {padding!r}")
    pairs = []
    for item in items:
        if _is_int(item):
            p = as_int(func, "padding", item, minimum=0)
            pairs.append((p, p))
        else:
            pair = _as_sequence(func, "padding", item)
            if len(pair) != 2:
                raise ValueError(f"{func}: each padding pair must be (before, after), got {item!r}")
            pairs.append(tuple(as_int(func, "padding", v, minimum=0) for v in pair))
    return tuple(pairs)


def resolve_conv_pads(func: str, padding, spatial, kernel, stride, dilation) -> Pairs:
    """Explicit (before, after) pairs for a forward convolution's padding argument."""
    padding = normalize_padding(func, padding, len(spatial))
    if padding == "valid":
        return ((0, 0),) * len(spatial)
    if padding in ("same", "same_lower"):
        return same_pads(spatial, kernel, stride, dilation, lower=padding == "same_lower")
    return padding


def resolve_transposed_pads(func: str, padding, kernel, stride, dilation):
    """(pads cropped, output_padding implied by the padding style) for a transposed convolution."""
    rank = len(kernel)
    padding = normalize_padding(func, padding, rank)
    if padding == "valid":
        return ((0, 0),) * rank, (0,) * rank
    if padding in ("same", "same_lower"):
        return transposed_same(kernel, stride, dilation, lower=padding == "same_lower")
    return padding, (0,) * rank


def transposed_out_shape(func: str, spatial, kernel, stride, dilation, pads, output_padding) -> Tuple[int, ...]:
    """Checked output size of a transposed convolution, per axis."""
    check_output_padding(func, output_padding, stride, dilation)
    out = tuple(transposed_out_size(n, k, s, d, p, o)
                for n, k, s, d, p, o in zip(spatial, kernel, stride, dilation, pads, output_padding))
    if any(o < 1 for o in out):
        raise ValueError(f"{func}: padding {tuple(pads)} crops more than the full output; output size would be {out}")
    return out


def check_output_padding(func: str, output_padding, stride, dilation) -> None:
    for axis, (o, s, d) in enumerate(zip(output_padding, stride, dilation)):
        if o >= max(s, d):
            raise ValueError(f"{func}: output_padding {tuple(output_padding)} must be smaller than stride or dilation "
                             f"on every axis (axis {axis}: stride {s}, dilation {d})")


def normalize_padding_mode(func: str, padding_mode) -> str:
    if not isinstance(padding_mode, str):
        raise TypeError(f"{func}: padding_mode must be a string, got {padding_mode!r}")
    key = PADDING_MODE_ALIASES.get(padding_mode.lower(), padding_mode.lower())
    if key not in PADDING_MODES:
        raise ValueError(f"{func}: padding_mode must be one of {sorted(PADDING_MODES)}, got {padding_mode!r}")
    return key


def normalize_data_format(func: str, data_format) -> str:
    if not isinstance(data_format, str) or data_format.lower() not in _LAYOUT_ALIASES:
        raise ValueError(f"{func}: data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
    return _LAYOUT_ALIASES[data_format.lower()]


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

def compute_dtype(func: str, **arrays) -> np.dtype:
    """float32 stays float32 (float16 is computed as float32); float64, integers and bools are
    computed as float64; any float64 operand promotes the call to float64."""
    wide = False
    for name, a in arrays.items():
        if a is None:
            continue
        dt = a.dtype
        if dt.kind == "f":
            if dt.itemsize > 4:
                wide = True
        elif dt.kind in "iub":
            wide = True
        else:
            raise TypeError(f"{func}: {name} must be a real numeric array, got dtype {dt}")
    return np.dtype(np.float64 if wide else np.float32)


def as_array(func: str, name: str, value) -> np.ndarray:
    """value as a NumPy array: ndarrays as they are, torch tensors / DLPack / __array__ producers
    as views where possible (see _interop), lists converted; non-numeric dtypes are TypeErrors."""
    value = to_numpy(func, name, value)
    if isinstance(value, np.ndarray):
        return value
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. ragged lists
        raise TypeError(f"{func}: {name} could not be converted to an array: {exc}") from None
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{func}: {name} must be a real numeric array, got {type(value).__name__} "
                        f"with dtype {arr.dtype}")
    return arr


# ----------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvSpec:
    """A fully resolved convolution: every parameter explicit and checked against the shapes."""

    func: str
    rank: int
    transposed: bool
    batched: bool
    channels_last: bool
    batch: int
    in_channels: int
    out_channels: int
    groups: int
    in_spatial: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pads: Pairs                      # conv: zeros/mode pixels added; transposed: pixels cropped
    output_padding: Tuple[int, ...]  # transposed only (zeros for conv)
    padding_mode: str                # conv only ("zeros" for transposed)
    out_spatial: Tuple[int, ...]
    dtype: np.dtype

    @property
    def pad_before(self) -> Tuple[int, ...]:
        return tuple(p[0] for p in self.pads)

    def output_shape(self) -> Tuple[int, ...]:
        """The shape of y in the caller's layout (batched or not, channels first or last)."""
        if self.channels_last:
            shape = self.out_spatial + (self.out_channels,)
        else:
            shape = (self.out_channels,) + self.out_spatial
        return ((self.batch,) + shape) if self.batched else shape

    def canonical_input(self, x: np.ndarray) -> np.ndarray:
        """x as an (N, C, *spatial) view (no copy)."""
        return self._canonical(x)

    def canonical_output(self, y: np.ndarray) -> np.ndarray:
        return self._canonical(y)

    def _canonical(self, a: np.ndarray) -> np.ndarray:
        if not self.batched:
            a = a[np.newaxis]
        if self.channels_last:
            a = np.moveaxis(a, -1, 1)
        return a


def _check_input_rank(func: str, x: np.ndarray, rank: int, channels_last: bool) -> bool:
    layout = "(N, *spatial, C)" if channels_last else "(N, C, *spatial)"
    if x.ndim == rank + 2:
        return True
    if x.ndim == rank + 1:
        return False
    raise ValueError(f"{func}: x must be {rank + 2}-D {layout} or unbatched {rank + 1}-D, got shape {x.shape}")


def _split_input(func, x, rank, channels_last):
    batched = _check_input_rank(func, x, rank, channels_last)
    shape = x.shape if batched else (1,) + x.shape
    if channels_last:
        batch, spatial, channels = shape[0], tuple(shape[1:-1]), shape[-1]
    else:
        batch, channels, spatial = shape[0], shape[1], tuple(shape[2:])
    if any(n < 1 for n in spatial):
        raise ValueError(f"{func}: x spatial sizes must be positive, got {spatial} (x shape {x.shape})")
    return batched, batch, channels, spatial


def _check_weight(func, w, rank, transposed):
    layout = "(C_in, C_out/groups, *kernel)" if transposed else "(C_out, C_in/groups, *kernel)"
    if w.ndim != rank + 2:
        raise ValueError(f"{func}: weight must be {rank + 2}-D {layout}, got shape {w.shape}")
    kernel = tuple(w.shape[2:])
    if any(k < 1 for k in kernel):
        raise ValueError(f"{func}: weight kernel sizes must be positive, got {kernel} (weight shape {w.shape})")
    return kernel


def _check_bias(func, bias, out_channels):
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != out_channels):
        raise ValueError(f"{func}: bias must have shape ({out_channels},), got {bias.shape}")


def _common_params(func, rank, stride, dilation, groups, padding, data_format):
    channels_last = normalize_data_format(func, data_format) == "channels_last"
    stride = per_axis(func, "stride", stride, rank, minimum=1)
    dilation = per_axis(func, "dilation", dilation, rank, minimum=1)
    groups = as_int(func, "groups", groups, minimum=1)
    normalize_padding(func, padding, rank)  # reject a malformed padding before looking at shapes
    return channels_last, stride, dilation, groups


def conv_spec(func: str, rank: int, x: np.ndarray, w: np.ndarray, bias: Optional[np.ndarray], stride, padding,
              dilation, groups, padding_mode, data_format) -> ConvSpec:
    channels_last, stride, dilation, groups = _common_params(func, rank, stride, dilation, groups, padding,
                                                             data_format)
    mode = normalize_padding_mode(func, padding_mode)
    batched, batch, cin, spatial = _split_input(func, x, rank, channels_last)
    kernel = _check_weight(func, w, rank, transposed=False)
    cout = w.shape[0]
    if cin != w.shape[1] * groups:
        raise ValueError(f"{func}: x has {cin} channels but weight {w.shape} with groups={groups} expects "
                         f"{w.shape[1] * groups}")
    if cout % groups:
        raise ValueError(f"{func}: weight has {cout} output channels, not divisible by groups={groups}")
    _check_bias(func, bias, cout)
    pads = resolve_conv_pads(func, padding, spatial, kernel, stride, dilation)
    if mode == "reflect":
        for axis, (n, (pb, pa)) in enumerate(zip(spatial, pads)):
            if max(pb, pa) >= n:
                raise ValueError(f"{func}: reflect padding {(pb, pa)} must be smaller than the input size {n} "
                                 f"on spatial axis {axis}")
    out = tuple(conv_out_size(n, k, s, d, p) for n, k, s, d, p in zip(spatial, kernel, stride, dilation, pads))
    if any(o < 1 for o in out):
        raise ValueError(f"{func}: the (dilated) kernel {tuple(effective_kernel(k, d) for k, d in zip(kernel, dilation))} "
                         f"is larger than the padded input {tuple(n + a + b for n, (a, b) in zip(spatial, pads))}; "
                         f"output size would be {out}")
    return ConvSpec(func=func, rank=rank, transposed=False, batched=batched, channels_last=channels_last,
                    batch=batch, in_channels=cin, out_channels=cout, groups=groups, in_spatial=spatial,
                    kernel=kernel, stride=stride, dilation=dilation, pads=pads, output_padding=(0,) * rank,
                    padding_mode=mode, out_spatial=out, dtype=compute_dtype(func, x=x, weight=w, bias=bias))


def conv_transpose_spec(func: str, rank: int, x: np.ndarray, w: np.ndarray, bias: Optional[np.ndarray], stride,
                        padding, output_padding, groups, dilation, output_size, data_format) -> ConvSpec:
    channels_last, stride, dilation, groups = _common_params(func, rank, stride, dilation, groups, padding,
                                                             data_format)
    user_output_padding = per_axis(func, "output_padding", output_padding, rank, minimum=0)
    batched, batch, cin, spatial = _split_input(func, x, rank, channels_last)
    kernel = _check_weight(func, w, rank, transposed=True)
    if cin != w.shape[0]:
        raise ValueError(f"{func}: x has {cin} channels but weight {w.shape} expects {w.shape[0]} (weight is "
                         f"(C_in, C_out/groups, *kernel))")
    if cin % groups:
        raise ValueError(f"{func}: {cin} input channels are not divisible by groups={groups}")
    cout = w.shape[1] * groups
    _check_bias(func, bias, cout)

    pads, implied_op = resolve_transposed_pads(func, padding, kernel, stride, dilation)

    if output_size is not None:
        sizes = _as_sequence(func, "output_size", output_size)
        if len(sizes) == rank + 2 or (len(sizes) == rank + 1 and not batched):
            sizes = sizes[-rank:] if not channels_last else sizes[-rank - 1:-1]
        if len(sizes) != rank:
            raise ValueError(f"{func}: output_size must give {rank} spatial sizes, got {output_size!r}")
        sizes = tuple(as_int(func, "output_size", v, minimum=1) for v in sizes)
        op = []
        for axis, (n, k, s, d, p, want) in enumerate(zip(spatial, kernel, stride, dilation, pads, sizes)):
            smallest = transposed_out_size(n, k, s, d, p, 0)
            largest = smallest + max(s, d) - 1
            if not smallest <= want <= largest:
                raise ValueError(f"{func}: output_size {tuple(sizes)} is unreachable: spatial axis {axis} can be "
                                 f"{smallest}..{largest} for input {n}, kernel {k}, stride {s}, dilation {d}, "
                                 f"padding {p}")
            op.append(want - smallest)
        op = tuple(op)
        if any(user_output_padding) and user_output_padding != op:
            raise ValueError(f"{func}: output_padding={user_output_padding} conflicts with output_size={sizes}")
    else:
        if any(implied_op) and any(user_output_padding):
            raise ValueError(f"{func}: output_padding={user_output_padding} cannot be combined with "
                             f"padding={padding!r} (it already fixes the output size)")
        op = tuple(a + b for a, b in zip(implied_op, user_output_padding))
    out = transposed_out_shape(func, spatial, kernel, stride, dilation, pads, op)
    return ConvSpec(func=func, rank=rank, transposed=True, batched=batched, channels_last=channels_last,
                    batch=batch, in_channels=cin, out_channels=cout, groups=groups, in_spatial=spatial,
                    kernel=kernel, stride=stride, dilation=dilation, pads=pads, output_padding=op,
                    padding_mode="zeros", out_spatial=out, dtype=compute_dtype(func, x=x, weight=w, bias=bias))
