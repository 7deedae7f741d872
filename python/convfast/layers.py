"""Layer objects: parameters validated once at construction, weights held, ``y = layer(x)``.

Constructor signatures follow torch.nn.Conv{1,2,3}d / ConvTranspose{1,2,3}d, plus convfast's
extras (strided "same", "same_lower", every padding mode, channels_last, dtype) and ``seed`` (an int
or a ``numpy.random.Generator``) for PyTorch's default initialisation U(-1/sqrt(fan_in),
1/sqrt(fan_in)). The weights are read-only arrays: replace them with ``layer.weight = new`` (the
compiled plans cache a packed copy), or build a layer around existing ones with ``from_weights``.
``layer.to("cuda")`` keeps a device copy of the weights for GPU calls (see docs/gpu.md).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ._layer_params import LayerParams, concrete_layers
from ._spec import as_array, conv_spec, conv_transpose_spec, normalize_data_format
from ._interop import output_wrapper, to_numpy
from .cuda._dispatch import cuda_backend, normalize_device, select_device
from . import _config, _core
from .functional import _kernel_params, _kernel_views, _plain, run_spec


def _frozen(value, dtype) -> np.ndarray:
    """The layer's own read-only copy: the compiled plans pack the weights once, so they must only
    change through the ``weight`` / ``bias`` setters (``layer.weight = new``), never in place."""
    a = np.array(value, dtype=dtype)
    a.flags.writeable = False
    return a


class _ConvLayer(LayerParams):
    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
               padding_mode, output_padding, data_format, dtype, seed):
        name = type(self).__name__
        self._set_params(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                         output_padding)
        self.data_format = normalize_data_format(name, data_format)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: dtype must be float32 or float64, got {self.dtype}")
        shape = self._weight_shape()
        # PyTorch's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        rng = np.random.default_rng(seed)
        bound = self._init_bound(shape)
        self._calls = {}  # input signature -> _core.Call holding a plan with the weights packed
        self._device = None  # None: run where x lives; "cpu" / "cuda" after .to()
        self._gpu = None     # the device copy of weight and bias (convfast.cuda._engine.LayerState)
        self._weight = _frozen(rng.uniform(-bound, bound, shape), self.dtype)
        self._bias = _frozen(rng.uniform(-bound, bound, self.out_channels), self.dtype) if bias else None

    @property
    def weight(self) -> np.ndarray:
        return self._weight

    @weight.setter
    def weight(self, value):
        value = as_array(type(self).__name__, "weight", value)
        if value.shape != self._weight.shape:
            raise ValueError(f"{type(self).__name__}: weight must have shape {self._weight.shape}, got {value.shape}")
        self._weight = _frozen(value, self.dtype)
        self._calls = {}  # the kept plans hold the old weights, packed
        self._refresh_gpu()

    @property
    def bias(self):
        return self._bias

    @bias.setter
    def bias(self, value):
        if value is None:
            self._bias = None
        else:
            value = as_array(type(self).__name__, "bias", value)
            if value.shape != (self.out_channels,):
                raise ValueError(f"{type(self).__name__}: bias must have shape ({self.out_channels},), "
                                 f"got {value.shape}")
            self._bias = _frozen(value, self.dtype)
        self._calls = {}
        self._refresh_gpu()

    # -- device placement ---------------------------------------------------------------------

    @property
    def device(self):
        """None (default: each call runs where its x lives), "cpu" or "cuda" (set by ``to``)."""
        return self._device

    def to(self, device):
        """``to("cuda")``: keep a device copy of weight and bias (uploaded now, packed once per input
        geometry) and run every call on the GPU (host inputs come back as host arrays);
        ``to("cpu")``: drop the device copy and run on the CPU (GPU inputs are then an error);
        ``to(None)``: drop it, and run each call where its x lives. Returns the layer."""
        name = type(self).__name__
        key = normalize_device(name, device)
        if key == "cuda":
            self._gpu = cuda_backend(name).LayerState(self._weight, self._bias)
        else:
            self._gpu = None
        self._device = key
        return self

    def _refresh_gpu(self):
        # new weights: the device copy (and its packed weights) is stale
        if getattr(self, "_gpu", None) is not None:
            self._gpu = cuda_backend(type(self).__name__).LayerState(self._weight, self._bias)

    def _run_gpu(self, x, out, make_spec):
        name = type(self).__name__
        backend = cuda_backend(name)
        if self._gpu is None:  # a GPU input to a layer that was not moved: the copy is kept for later calls
            self._gpu = backend.LayerState(self._weight, self._bias)
        return backend.run_layer(name, x, self._gpu, make_spec, out)

    @classmethod
    def from_weights(cls, weight, bias=None, **params):
        """Build a layer around existing weights (layout as the functional op's)."""
        weight = as_array(cls.__name__, "weight", weight)
        if weight.ndim != cls._rank + 2:
            raise ValueError(f"{cls.__name__}: weight must be {cls._rank + 2}-D, got shape {weight.shape}")
        cin, cout = cls._channels_of(weight.shape, params.get("groups", 1))
        params.setdefault("dtype", np.float64 if weight.dtype == np.float64 else np.float32)
        layer = cls(cin, cout, weight.shape[2:], bias=bias is not None, **params)
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        return layer

    def spec(self, x):
        name = type(self).__name__
        if self._transposed:
            return conv_transpose_spec(name, self._rank, x, self._weight, self._bias, self.stride, self.padding,
                                       self.output_padding, self.groups, self.dilation, None, self.data_format)
        return conv_spec(name, self._rank, x, self._weight, self._bias, self.stride, self.padding, self.dilation,
                         self.groups, self.padding_mode, self.data_format)

    def _input_key(self, x, extra=None):
        """The signature of a call with input x (None: not a plain NumPy call), for self._calls."""
        if type(x) is not np.ndarray or self._device is not None:
            return None
        return (x.shape, x.strides, x.dtype, _core.active_isa(), extra)

    def _run(self, x, out, key, make_spec):
        name = type(self).__name__
        if out is None:
            call = self._calls.get(key)
            if call is not None:
                y = call.run(x, self._weight, self._bias)
                if y is not None:
                    return y
        if select_device(name, self._device, x, out=out) == "cuda":
            return self._run_gpu(x, out, make_spec)
        wrap = output_wrapper(x)
        x = as_array(name, "x", x)
        spec = make_spec(x)
        y = run_spec(spec, x, self._weight, self._bias, to_numpy(name, "out", out), self._calls, key, planned=True)
        if _config._BENCHMARK and out is None and key in self._calls:
            self._calls[key] = call = self._fastest_call(spec, x, y)
            y = call.run(x, self._weight, self._bias)  # this call too gets the kept algorithm's bits
        return wrap(y)

    _BENCHMARK_ALGORITHMS = ("", "gemm", "gemv", "direct", "winograd", "planes", "lanes", "scatter")

    def _fastest_call(self, spec, x, y):
        """set_benchmark(True): a planned Call per algorithm that can run this signature (forced ones
        that cannot fall back to another, which dedupes by description), the fastest of three timed
        runs after a warm-up each."""
        x5, w6, y5 = _kernel_views(spec, x, self._weight, y)
        params = _kernel_params(spec)
        calls = {}
        for algorithm in self._BENCHMARK_ALGORITHMS:
            call = _core.Call(x5, w6, y5, *params, x, self._weight, self._bias, y, True, algorithm)
            calls.setdefault(call.describe(), call)

        def seconds(call):
            call.run(x, self._weight, self._bias)
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                call.run(x, self._weight, self._bias)
                best = min(best, time.perf_counter() - start)
            return best

        return min(calls.values(), key=seconds)

    def algorithm(self, x) -> str:
        """The algorithm this layer keeps for input ``x``'s signature (after a call with it), or ''."""
        call = self._calls.get(self._input_key(x))
        return "" if call is None else call.describe()

    def __call__(self, x, *, out=None):
        return self._run(x, out, self._input_key(x), self.spec)

    forward = __call__

    def __getstate__(self):
        # The kept plans and the device copy hold engine objects, which neither pickle nor deepcopy:
        # a copy of the layer rebuilds them on its first call.
        state = self.__dict__.copy()
        state["_calls"] = {}
        state["_gpu"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for a in (self._weight, self._bias):  # unpickled and deep-copied arrays come back writeable
            if a is not None:
                a.flags.writeable = False

    def __repr__(self):
        extra = f", output_padding={self.output_padding}" if self._transposed else f", padding_mode={self.padding_mode!r}"
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self._bias is not None}{extra}, data_format={self.data_format!r}, dtype={self.dtype})")


class _Conv(_ConvLayer):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", *, data_format="channels_first", dtype=np.float32, seed=None):
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, 0,
                    data_format, dtype, seed)


class _ConvTranspose(_ConvLayer):
    _transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", *, data_format="channels_first", dtype=np.float32,
                 seed=None):
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                    output_padding, data_format, dtype, seed)

    def __call__(self, x, *, output_size=None, out=None):
        name = type(self).__name__

        def make_spec(x):
            return conv_transpose_spec(name, self._rank, x, self._weight, self._bias, self.stride, self.padding,
                                       0 if output_size is not None else self.output_padding, self.groups,
                                       self.dilation, output_size, self.data_format)

        key = self._input_key(x, output_size) if _plain(output_size) else None
        return self._run(x, out, key, make_spec)

    forward = __call__


Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = concrete_layers(
    __name__, _Conv, _ConvTranspose, "{rank}-D {kind} layer ({torch_name} signature).")
