"""Sobel edge detection on a real photograph (Grace Hopper's portrait, shipped with matplotlib), the
classic edge-detection example with convfast: both Sobel kernels in one ``conv2d`` call, with
stride 1 and 2, dilation 1 and 2, ``padding="same"`` and the reflect padding mode.

    python examples/sobel_edges.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np

import convfast
from _common import output_dir, sample_photo, save_figure, show_map

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)  # responds to vertical edges
# Both kernels as two output channels of one convolution: (C_out=2, C_in=1, 3, 3).
SOBEL = np.stack([SOBEL_X, SOBEL_X.T])[:, None]


def gradients(image, **conv_args):
    """(horizontal-gradient, vertical-gradient, magnitude) maps of an (H, W) image."""
    g = convfast.conv2d(image[None, None], SOBEL, **conv_args)[0]
    return g[0], g[1], np.hypot(g[0], g[1])


def border_mean(a, width=1):
    """Mean over the outermost ``width`` rows and columns: where the padding is read."""
    inner = a[width:-width, width:-width]
    return (a.sum() - inner.sum()) / (a.size - inner.size)


def main():
    out = output_dir(__doc__)
    image = sample_photo(gray=True)
    print(f"image: grace_hopper.jpg from matplotlib's sample data, grayscale {image.shape}, float32")

    gx, gy, mag = gradients(image, padding="same")
    variants = {
        "stride 2": dict(stride=2, padding="same"),
        "dilation 2": dict(dilation=2, padding="same"),
        "stride 2, dilation 2": dict(stride=2, dilation=2, padding="same"),
        "reflect padding": dict(padding="same", padding_mode="reflect"),
    }
    results = {name: gradients(image, **args)[2] for name, args in variants.items()}
    for name, args in variants.items():
        expected = convfast.conv_output_shape(image.shape, 3, args.get("stride", 1), "same", args.get("dilation", 1))
        assert results[name].shape == expected, (name, results[name].shape, expected)
        print(f"  {name:<22} output {results[name].shape}")

    # Strided "same" is SAME_UPPER: for an even size the single padding pixel goes after, so the
    # stride-2 map samples the stride-1 map at odd positions; PyTorch-style padding=1 samples the even
    # ones. Both are exact subsamplings of the stride-1 map.
    pads = convfast.same_padding(image.shape, 3, stride=2)
    np.testing.assert_allclose(results["stride 2"], mag[1::2, 1::2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gradients(image, stride=2, padding=1)[2], mag[::2, ::2], rtol=1e-5, atol=1e-5)
    print(f"stride 2 'same' pads {pads} and equals stride 1 [1::2, 1::2]; padding=1 equals stride 1 [::2, ::2]")

    # Zero padding makes the photograph's border look like a strong edge; reflect padding does not.
    print(f"mean gradient magnitude on the 1-pixel border: zeros {border_mean(mag):.3f}, "
          f"reflect {border_mean(results['reflect padding']):.3f} (interior {mag[1:-1, 1:-1].mean():.3f})")

    vmax = float(np.percentile(mag, 99))
    fig, axes = plt.subplots(2, 4, figsize=(16, 9.5))
    show_map(axes[0, 0], image, f"grayscale input {image.shape}")
    show_map(axes[0, 1], gy, "vertical gradient (horizontal edges)", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    show_map(axes[0, 2], gx, "horizontal gradient (vertical edges)", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    show_map(axes[0, 3], mag, f"magnitude, stride 1, zeros {mag.shape}", vmax=vmax)
    for ax, (name, m) in zip(axes[1], results.items()):
        show_map(ax, m, f"{name} {m.shape}", vmax=vmax)
    fig.suptitle("Sobel edges with convfast.conv2d(image, sobel_xy, padding='same', ...)")
    save_figure(fig, out, "sobel_edges")

    # A close-up of the top-right corner (plain grey background): zero padding draws a bright frame,
    # reflect padding leaves the border as flat as the background.
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    show_map(axes[0], mag[:48, -48:], "padding_mode='zeros' (corner)", vmax=vmax)
    show_map(axes[1], results["reflect padding"][:48, -48:], "padding_mode='reflect' (corner)", vmax=vmax)
    save_figure(fig, out, "sobel_border")


if __name__ == "__main__":
    main()
