"""Transposed convolution, step by step: the classic 4x4 -> 8x8 example (kernel 3, stride 2,
padding 1, output_padding 1), the same shape through ``output_size=`` and ``padding="same"``, how
these relate to the uncropped ("valid") output, and the defining property: conv_transpose is the
adjoint of conv, <conv(x), y> == <x, conv_transpose(y)>.

    python examples/transposed_walkthrough.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np

import convfast
from _common import output_dir, save_figure, show_map

K, S, P, OP = 3, 2, 1, 1


def shapes(x, w):
    n = x.shape[-1]
    print(f"input {x.shape}, kernel {K}x{K}, stride {S}, padding {P}, output_padding {OP}")
    print(f"  (in - 1)*stride - 2*padding + (k - 1) + 1 + output_padding = "
          f"({n} - 1)*{S} - 2*{P} + {K - 1} + 1 + {OP} = {(n - 1) * S - 2 * P + K + OP}")
    print(f"  conv_transpose_output_shape: {convfast.conv_transpose_output_shape(x.shape[2:], K, S, P, OP)}")

    layer = convfast.ConvTranspose2d.from_weights(w, stride=S, padding=P, output_padding=OP)
    y = layer(x)
    print(f"  ConvTranspose2d layer: {y.shape}")

    # output_padding only resolves an ambiguity: with stride 2, inputs of size 7 and 8 both convolve
    # down to 4, so the transpose needs to be told which one to give back.
    by_size = convfast.conv_transpose2d(x, w, stride=S, padding=P, output_size=(8, 8))
    np.testing.assert_array_equal(by_size, y)
    seven = convfast.conv_transpose2d(x, w, stride=S, padding=P, output_size=(7, 7))
    print(f"  output_size=(8, 8): {by_size.shape} (== output_padding=1);  output_size=(7, 7): {seven.shape}")
    for m in (7, 8):
        print(f"    conv of a {m}x{m} input with k{K} s{S} p{P} -> "
              f"{convfast.conv_output_shape((m, m), K, S, P)}")

    # Every cropping convention is a window on the full, uncropped output ((4-1)*2 + 3 = 9 per axis).
    full = convfast.conv_transpose2d(x, w, stride=S, padding="valid")
    same = convfast.conv_transpose2d(x, w, stride=S, padding="same")
    np.testing.assert_allclose(y, full[..., 1:9, 1:9], rtol=1e-6)
    np.testing.assert_allclose(same, full[..., 0:8, 0:8], rtol=1e-6)
    np.testing.assert_allclose(seven, full[..., 1:8, 1:8], rtol=1e-6)
    print(f"  padding='valid' (nothing cropped): {full.shape}")
    print(f"  padding='same' -> {same.shape} = in * stride: full[0:8], the odd pixel cropped after (as Keras)")
    print("  padding=1, output_padding=1 -> full[1:9];  output_size=(7, 7) -> full[1:8]")
    return y, full


def adjointness():
    """<conv(x), y> == <x, conv_transpose(y)> with the same weights, for several geometries."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3, K, K))  # conv: 3 -> 5 channels; its transpose: 5 -> 3
    for label, conv_args, extra in (("stride 2, padding 1", dict(stride=S, padding=P), dict(output_padding=OP)),
                                    ("stride 2, 'same'", dict(stride=S, padding="same"), {}),
                                    ("stride 2, dilation 2, padding 2", dict(stride=S, padding=2, dilation=2),
                                     dict(output_padding=1))):
        x = rng.standard_normal((2, 3, 8, 8))
        cx = convfast.conv2d(x, w, **conv_args)
        y = rng.standard_normal(cx.shape)
        ty = convfast.conv_transpose2d(y, w, **conv_args, **extra)
        assert ty.shape == x.shape, (ty.shape, x.shape)
        lhs, rhs = float(np.vdot(cx, y)), float(np.vdot(x, ty))
        assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), 1.0), (label, lhs, rhs)
        print(f"  {label:<32} <conv(x), y> = {lhs:+.10f}   <x, conv_transpose(y)> = {rhs:+.10f}")


def main():
    out = output_dir(__doc__)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    w = rng.standard_normal((1, 1, K, K)).astype(np.float32)
    y, full = shapes(x, w)
    print("adjointness (float64):")
    adjointness()

    # One input pixel "stamps" the kernel into the output at stride spacing; all-ones input and
    # kernel count how many stamps cover each output pixel: k=3 with s=2 overlaps unevenly, the
    # checkerboard artefact of transposed convolutions (Odena et al., 2016).
    one = np.zeros_like(x)
    one[0, 0, 1, 2] = 1.0
    stamp = convfast.conv_transpose2d(one, w, stride=S, padding=P, output_padding=OP)
    overlap = convfast.conv_transpose2d(np.ones_like(x), np.ones_like(w), stride=S, padding=P, output_padding=OP)
    print(f"stamps covering each output pixel (ones in, ones kernel): {np.unique(overlap).astype(int).tolist()}")

    fig, axes = plt.subplots(1, 5, figsize=(18, 4))
    for ax, a, title in ((axes[0], x, "input 4x4"), (axes[1], full, "padding='valid': 9x9 (uncropped)"),
                         (axes[2], y, "k3 s2 p1 op1: 8x8"),
                         (axes[3], stamp, "input pixel (1, 2) alone: the kernel, stamped")):
        # A symmetric colour scale, so that zero is white in every panel.
        m = float(np.abs(a).max())
        show_map(ax, a[0, 0], title, cmap="RdBu_r", vmin=-m, vmax=m)
    show_map(axes[4], overlap[0, 0], "stamps per output pixel", cmap="viridis")
    for (i, j), v in np.ndenumerate(overlap[0, 0]):
        axes[4].text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 3 else "black")
    fig.suptitle("convfast.conv_transpose2d: 4x4 -> 8x8 with kernel 3, stride 2, padding 1, output_padding 1")
    save_figure(fig, out, "transposed_walkthrough")


if __name__ == "__main__":
    main()
