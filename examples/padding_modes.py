"""Padding modes: the usual zero / reflect / edge padding figure, extended to every mode
convfast has (circular and symmetric too), first with ``convfast.pad`` (an ``np.pad`` drop-in) and
then applied inside ``convfast.conv2d`` with ``padding_mode=``.

    python examples/padding_modes.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

import convfast
from _common import output_dir, save_figure, show_map

# (np.pad name, convolution name) for the same rule: convfast.pad takes the first, conv2d either.
MODES = [("constant", "zeros"), ("reflect", "reflect"), ("edge", "replicate"),
         ("wrap", "circular"), ("symmetric", "symmetric")]


def pad_figure(out):
    # Distinct values (rather than a 0/1 picture) so that every padded cell shows which
    # source pixel it copies: reflect and symmetric differ only in whether the edge repeats.
    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    p = 2
    fig, axes = plt.subplots(1, len(MODES) + 1, figsize=(3 * (len(MODES) + 1), 3.3))
    panels = [("original 5x5", image, 0)] + [(f"{name} / {conv}", convfast.pad(image, p, mode=name), p)
                                              for name, conv in MODES]
    for ax, (title, a, offset) in zip(axes, panels):
        show_map(ax, a, title, cmap="viridis", vmin=0, vmax=24)
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 12 else "black")
        # Outline the original pixels so the padded ring stands out.
        ax.add_patch(Rectangle((offset - 0.5, offset - 0.5), 5, 5, fill=False, edgecolor="red", lw=2))
    fig.suptitle(f"convfast.pad(image, {p}, mode=...)")
    save_figure(fig, out, "padding_modes")

    for name, _ in MODES:
        # convfast.pad must be an exact np.pad drop-in, bit for bit.
        np.testing.assert_array_equal(convfast.pad(image, p, mode=name), np.pad(image, p, mode=name))
    print(f"convfast.pad == np.pad for {', '.join(n for n, _ in MODES)} (pad {p} on a 5x5 image)")


def conv_figure(out):
    # A smooth ramp with a bright square: a 7x7 box blur with "same" padding then shows at a glance
    # how each mode invents the pixels beyond the border (zeros darken it, circular wraps the far side in).
    n, k = 32, 7
    yy, xx = np.mgrid[0:n, 0:n]
    image = (xx / (n - 1)).astype(np.float32)
    image[8:16, 20:28] = 1.0
    x = image[None, None]
    w = np.full((1, 1, k, k), 1.0 / k**2, np.float32)

    fig, axes = plt.subplots(1, len(MODES) + 1, figsize=(3 * (len(MODES) + 1), 3.3))
    show_map(axes[0], image, "input 32x32", vmin=0, vmax=1)
    print(f"7x7 box blur, padding='same', on a {n}x{n} ramp; mean of the right-most output column (input: 1.0):")
    for ax, (np_name, conv_name) in zip(axes[1:], MODES):
        y = convfast.conv2d(x, w, padding="same", padding_mode=conv_name)[0, 0]
        # The mode is applied inside the kernel; it must equal padding a copy first, then a valid conv.
        via_pad = convfast.conv2d(convfast.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)),
                                               mode=np_name), w)[0, 0]
        np.testing.assert_allclose(y, via_pad, rtol=1e-5, atol=1e-6)
        show_map(ax, y, f"padding_mode={conv_name!r}", vmin=0, vmax=1)
        print(f"  {conv_name:>9}: {y[:, -1].mean():.3f}  (in-kernel padding == pad-then-conv)")
    fig.suptitle("convfast.conv2d(x, box7, padding='same', padding_mode=...)")
    save_figure(fig, out, "padding_modes_conv2d")


def main():
    out = output_dir(__doc__)
    pad_figure(out)
    conv_figure(out)


if __name__ == "__main__":
    main()
