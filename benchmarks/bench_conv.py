"""asv benchmarks: the layer suite (conv 1/2/3-D, pointwise, dilated, depthwise/grouped, transposed)
over dtype and layout, padding modes and strided "same" padding, convfast.pad against np.pad, and
the speedup over PyTorch.

Each layer family is one class parametrised by (case, dtype, layout) with
  time_conv      - wall time of one functional call (asv's statistics),
  peakmem_conv   - peak resident memory of the process after setup and one call,
  track_gflops   - GFLOP/s of the best of a few calls (2 x MACs, see layers.flops).

Run here:  asv run --python=same --quick --show-stderr   (benchmarks the installed convfast)
Threads: convfast's default (OMP_NUM_THREADS, else all cores).
"""
import time

import numpy as np

import convfast

from . import layers as L

DTYPES = list(L.DTYPES)
LAYOUTS = list(L.LAYOUTS)


def _best_seconds(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _Layers:
    """Base of the per-family classes; ``families`` selects the cases of the shared suite."""

    families = ()
    param_names = ["case", "dtype", "layout"]
    timeout = 300
    # One call of a case takes 5-100 ms: a few samples are plenty.
    repeat = (1, 5, 10.0)
    number = 1

    def setup(self, case, dtype, layout):
        self.case = L.CASES[case]
        self.inputs = L.make_inputs(self.case, dtype, layout)
        L.run_convfast(self.case, self.inputs)  # warm-up (first-touch of the output, thread pool start)

    def time_conv(self, case, dtype, layout):
        L.run_convfast(self.case, self.inputs)

    def peakmem_conv(self, case, dtype, layout):
        L.run_convfast(self.case, self.inputs)

    def track_gflops(self, case, dtype, layout):
        return L.gflops(self.case, 1e3 * _best_seconds(lambda: L.run_convfast(self.case, self.inputs)))

    track_gflops.unit = "GFLOP/s"


def _family_class(name, families, doc):
    cases = [c.name for c in L.get_suite("full") if c.family in families]
    return type(name, (_Layers,), {"__doc__": doc, "families": families, "params": [cases, DTYPES, LAYOUTS]})


Conv1d = _family_class("Conv1d", ("conv1d",), "1-D convolution (audio).")
Conv2d = _family_class("Conv2d", ("conv2d", "stem"), "2-D 3x3 layers of ResNet/VGG/U-Net and the 7x7 stride-2 stem.")
Pointwise = _family_class("Pointwise", ("pointwise",), "1x1 convolutions, stride 1 and 2.")
Dilated = _family_class("Dilated", ("dilated",), "Dilated (atrous) 3x3 convolutions.")
Depthwise = _family_class("Depthwise", ("depthwise", "grouped"), "Depthwise (stride 1 and 2) and grouped convolutions.")
Conv3d = _family_class("Conv3d", ("conv3d",), "3-D convolutions (C_in=1, stride 1 and 2).")
Transposed = _family_class("Transposed", ("transposed2d", "transposed3d"),
                           "Transposed 2-D (k2s2, k3s2p1op1, k4s2p1) and 3-D (k2s2) convolutions.")


class ConvPadding:
    """A ResNet 3x3 layer (64->64, 56x56, N=2) under every padding mode and strided TF/ONNX "same"."""

    params = [["zeros", "reflect", "replicate", "circular", "symmetric", "same_stride2", "same_lower_stride2"],
              DTYPES]
    param_names = ["padding", "dtype"]

    def setup(self, padding, dtype):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((2, 64, 56, 56)).astype(dtype)
        self.w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(dtype)
        if padding.startswith("same"):
            self.kwargs = dict(stride=2, padding=padding.rsplit("_", 1)[0])
        else:
            self.kwargs = dict(padding=1, padding_mode=padding)
        convfast.conv2d(self.x, self.w, **self.kwargs)

    def time_conv2d(self, padding, dtype):
        convfast.conv2d(self.x, self.w, **self.kwargs)


class Pad:
    """convfast.pad against np.pad: 1-D (64 x 16000), 2-D (8 x 64 x 112 x 112), 3-D (2 x 32 x 48^3) arrays,
    spatial axes padded by 3 on each side."""

    params = [["constant", "reflect", "edge", "wrap", "symmetric"], [1, 2, 3], DTYPES]
    param_names = ["mode", "rank", "dtype"]
    shapes = {1: (64, 16000), 2: (8, 64, 112, 112), 3: (2, 32, 48, 48, 48)}

    def setup(self, mode, rank, dtype):
        shape = self.shapes[rank]
        self.a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        self.width = [(0, 0)] * (len(shape) - rank) + [(3, 3)] * rank

    def time_convfast_pad(self, mode, rank, dtype):
        convfast.pad(self.a, self.width, mode=mode)

    def time_numpy_pad(self, mode, rank, dtype):
        np.pad(self.a, self.width, mode=mode)

    def peakmem_convfast_pad(self, mode, rank, dtype):
        convfast.pad(self.a, self.width, mode=mode)


class VersusTorch:
    """torch_ms / convfast_ms for the small suite, interleaved in one process at the same thread count
    (skipped when PyTorch is not installed). Each case is checked against PyTorch first."""

    params = [L.SUITES["small"], DTYPES]
    param_names = ["case", "dtype"]
    timeout = 300

    def setup(self, case, dtype):
        if not L.torch_available():
            raise NotImplementedError("PyTorch is not installed")
        L.set_threads(convfast.get_num_threads())

    def track_speedup_vs_torch(self, case, dtype):
        r = L.compare_case(L.CASES[case], dtype, against=("torch",), budget_s=1.0)
        if r["ok"] is False:
            raise AssertionError(f"{case} {dtype}: convfast differs from PyTorch (relative error {r['error']:.3g})")
        return r["speedup_vs_torch"]

    track_speedup_vs_torch.unit = "x"
