"""The state that ``convfast.Conv*`` (layers.py) and ``convfast.torch.Conv*`` (torch.py) share,
written once: :class:`LayerParams`, the base of both, validates the constructor's arguments (in
one order) and holds them normalised; it knows the weight's layout (its shape from the channels,
and the channels from a weight) and PyTorch's default initialisation bound; and
:func:`concrete_layers` makes each module's six classes (Conv1d ... ConvTranspose3d) from its two
bases. Each module keeps what differs: the storage of weight and bias (read-only NumPy arrays and
kept plans in layers.py, ``nn.Parameter`` in torch.py), the random source of the initialisation
(NumPy's Generator there, torch's global one here, draw for draw as torch.nn) and the repr text
(every argument there, torch.nn's ``extra_repr`` here)."""
from __future__ import annotations

import math

from ._spec import as_int, normalize_padding, normalize_padding_mode, per_axis


class LayerParams:
    """A convolution layer's parameters: ``_rank`` spatial axes, ``_transposed`` or not (class
    attributes), and the instance attributes ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``dilation``, ``output_padding``, ``groups``, ``padding`` (normalize_padding's form)
    and ``padding_mode``, set by :meth:`_set_params`. Errors name the layer's class."""

    _rank = 0
    _transposed = False

    def _set_params(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                    output_padding) -> None:
        """Validates the arguments and sets them on the layer."""
        name = type(self).__name__
        rank = self._rank
        self.in_channels = as_int(name, "in_channels", in_channels, minimum=1)
        self.out_channels = as_int(name, "out_channels", out_channels, minimum=1)
        self.kernel_size = per_axis(name, "kernel_size", kernel_size, rank, minimum=1)
        self.stride = per_axis(name, "stride", stride, rank, minimum=1)
        self.dilation = per_axis(name, "dilation", dilation, rank, minimum=1)
        self.output_padding = per_axis(name, "output_padding", output_padding, rank, minimum=0)
        self.groups = as_int(name, "groups", groups, minimum=1)
        self.padding = normalize_padding(name, padding, rank)
        self.padding_mode = normalize_padding_mode(name, padding_mode)
        if self._transposed and self.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode must be 'zeros' for a transposed convolution, got {padding_mode!r}")

    def _weight_shape(self) -> tuple:
        """Checks that the channel counts divide into the groups; the weight's shape (torch.nn's
        layout: (C_out, C_in/G, *k), transposed (C_in, C_out/G, *k))."""
        name = type(self).__name__
        for label, c in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if c % self.groups:
                raise ValueError(f"{name}: {label}={c} is not divisible by groups={self.groups}")
        if self._transposed:
            return (self.in_channels, self.out_channels // self.groups) + self.kernel_size
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    @classmethod
    def _channels_of(cls, weight_shape: tuple, groups) -> tuple:
        """(in_channels, out_channels) of a layer whose weight has ``weight_shape`` (the inverse of
        _weight_shape)."""
        g = as_int(cls.__name__, "groups", groups, minimum=1)
        if cls._transposed:
            return weight_shape[0], weight_shape[1] * g
        return weight_shape[1] * g, weight_shape[0]

    @staticmethod
    def _init_bound(weight_shape: tuple) -> float:
        """PyTorch's default initialisation draws weight and bias from U(-bound, bound) with
        bound = 1/sqrt(fan_in), fan_in = weight_shape[1] * prod(kernel) (``kaiming_uniform_`` with
        a=sqrt(5) reduces to this bound)."""
        return 1.0 / math.sqrt(math.prod(weight_shape[1:]))


def concrete_layers(module: str, conv: type, transpose: type, doc: str) -> tuple:
    """Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d: the subclasses of
    ``conv`` and ``transpose`` for ranks 1 to 3, named as torch.nn's and living in ``module`` (so
    that pickling finds them). Each one's docstring is ``doc`` formatted with ``rank``, ``kind``
    ("convolution" or "transposed convolution") and ``torch_name`` ("torch.nn.Conv2d", ...)."""
    classes = []
    for base, prefix, kind in ((conv, "Conv", "convolution"), (transpose, "ConvTranspose", "transposed convolution")):
        for rank in (1, 2, 3):
            name = f"{prefix}{rank}d"
            body = {"__module__": module, "__qualname__": name, "_rank": rank,
                    "__doc__": doc.format(rank=rank, kind=kind, torch_name=f"torch.nn.{name}")}
            classes.append(type(name, (base,), body))
    return tuple(classes)
