"""Output size against input size: "valid", padding=1 and "same", for strides 1, 2 and 3 (the
classic output-size plots), computed with ``convfast.conv_output_shape`` and confirmed by running
``convfast.conv2d`` on every input size.

    python examples/output_size.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np

import convfast
from _common import output_dir, save_figure

KERNEL = 3
STRIDES = (1, 2, 3)
# "same" here is TF/ONNX SAME_UPPER, defined for every stride (out = ceil(in / stride)); PyTorch's
# padding="same" exists only for stride 1, which is why PyTorch code often pads by hand.
PADDINGS = (("valid", "valid"), ("padding=1", 1), ("same", "same"))
SIZES = range(5, 51)


def measured_size(n, stride, padding):
    """Spatial size of a real convolution of an n x n image."""
    x = np.zeros((1, 1, n, n), np.float32)
    w = np.zeros((1, 1, KERNEL, KERNEL), np.float32)
    return convfast.conv2d(x, w, stride=stride, padding=padding).shape[-1]


def main():
    out = output_dir(__doc__)

    fig, axes = plt.subplots(1, len(PADDINGS), figsize=(5 * len(PADDINGS), 4.2), sharey=True)
    calls = 0
    for ax, (label, padding) in zip(axes, PADDINGS):
        for stride in STRIDES:
            formula = [convfast.conv_output_shape(n, KERNEL, stride=stride, padding=padding)[0] for n in SIZES]
            measured = [measured_size(n, stride, padding) for n in SIZES]
            calls += len(measured)
            # The shape arithmetic and the operator share one definition; show that they agree.
            assert formula == measured, (label, stride, formula, measured)
            ax.plot(SIZES, formula, marker="o", ms=3, label=f"stride {stride}")
        ax.plot(SIZES, SIZES, "k:", lw=1, label="output = input")
        ax.set_title(f"{KERNEL}x{KERNEL} kernel, {label}")
        ax.set_xlabel("input size")
        ax.grid(True, alpha=0.4)
        ax.legend()
    axes[0].set_ylabel("output size")
    save_figure(fig, out, "output_size")
    print(f"conv_output_shape == conv2d(...).shape for {calls} (input, stride, padding) combinations")
    print(f"with a {KERNEL}x{KERNEL} kernel, padding=1 and 'same' coincide at every stride: "
          "floor((n - 1) / s) + 1 == ceil(n / s)")

    # Common layer cases on a 28x28 input, plus the strided "same" PyTorch lacks.
    print("28x28 input, 3x3 kernel:")
    for label, stride, padding in (("no padding, stride 1", 1, 0), ("padding 1, stride 1", 1, 1),
                                   ("padding 1, stride 2", 2, 1), ("'same', stride 2", 2, "same"),
                                   ("'same', stride 3", 3, "same")):
        n = measured_size(28, stride, padding)
        print(f"  {label:<22} -> {n}x{n}")
    print("formula: floor((in + before + after - dilation*(k-1) - 1) / stride) + 1;  'same': ceil(in / stride)")
    print(f"'same' padding for a 28x28 input, stride 2: {convfast.same_padding((28, 28), KERNEL, stride=2)} "
          "(before, after) per axis: the odd pixel goes after")


if __name__ == "__main__":
    main()
