"""A simplified U-Net, forward pass only, built from convfast layers: 3x3 convolutions
with padding=1 (+ NumPy ReLU), 2x2 max-pooling, ``ConvTranspose2d(kernel_size=2, stride=2)``
up-convolutions and skip concatenations. The weights are random (PyTorch's default initialisation),
so the maps show structure, not a segmentation; the point is that every shape works out.

    python examples/unet_forward.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np

import convfast
from _common import max_pool, output_dir, relu, sample_photo, save_figure, show_map

SIZE = 128  # U-Net is usually shown at 256x256; 128 keeps the example to about a second on a laptop


class ConvBlock:
    """Two 3x3 convolutions with padding=1, each followed by ReLU: spatial size unchanged."""

    def __init__(self, in_ch, out_ch, rng):
        self.convs = [convfast.Conv2d(in_ch, out_ch, 3, padding=1, seed=rng),
                      convfast.Conv2d(out_ch, out_ch, 3, padding=1, seed=rng)]

    def __call__(self, x):
        for conv in self.convs:
            x = relu(conv(x))
        return x


class SimpleUNet:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.enc1 = ConvBlock(3, 64, rng)
        self.enc2 = ConvBlock(64, 128, rng)
        self.bridge = ConvBlock(128, 256, rng)
        # k2 s2: every input pixel expands into its own 2x2 block, exactly doubling H and W.
        self.upconv1 = convfast.ConvTranspose2d(256, 128, kernel_size=2, stride=2, seed=rng)
        self.dec1 = ConvBlock(256, 128, rng)
        self.upconv2 = convfast.ConvTranspose2d(128, 64, kernel_size=2, stride=2, seed=rng)
        self.dec2 = ConvBlock(128, 64, rng)
        self.final = convfast.Conv2d(64, 1, kernel_size=1, seed=rng)

    def __call__(self, x, trace):
        """Forward pass; ``trace(name, array)`` is called at every stage and returns the array."""
        enc1 = trace("enc1 (conv block 3->64)", self.enc1(x))
        enc2 = trace("enc2 (conv block 64->128)", self.enc2(trace("pool", max_pool(enc1))))
        bridge = trace("bridge (conv block 128->256)", self.bridge(trace("pool", max_pool(enc2))))
        up1 = trace("upconv1 (transposed k2 s2, 256->128)", self.upconv1(bridge))
        # Skip connection: channels concatenated, so the spatial sizes must match exactly.
        cat1 = trace("concat [up1, enc2]", np.concatenate([up1, enc2], axis=1))
        dec1 = trace("dec1 (conv block 256->128)", self.dec1(cat1))
        up2 = trace("upconv2 (transposed k2 s2, 128->64)", self.upconv2(dec1))
        cat2 = trace("concat [up2, enc1]", np.concatenate([up2, enc1], axis=1))
        dec2 = trace("dec2 (conv block 128->64)", self.dec2(cat2))
        return trace("final (1x1 conv 64->1)", self.final(dec2)), dec2


def photo_batch(size):
    """The sample photograph as a (1, 3, size, size) batch: a centred square crop, area-downsampled by
    a depthwise box filter with stride = the downsampling factor (one convfast call, groups=3)."""
    rgb = sample_photo(gray=False)
    side = min(rgb.shape[:2]) // size * size
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    x = rgb[top:top + side, left:left + side].transpose(2, 0, 1)[None]
    f = side // size
    box = np.full((3, 1, f, f), 1.0 / f**2, np.float32)
    return convfast.conv2d(x, box, stride=f, groups=3)


def main():
    out = output_dir(__doc__)
    x = photo_batch(SIZE)

    def trace(name, a):
        print(f"  {name:<38} {a.shape}")
        return a

    print(f"input {x.shape} (grace_hopper.jpg, cropped and downsampled)")
    y, dec2 = SimpleUNet(seed=0)(x, trace)
    assert y.shape[2:] == x.shape[2:], (y.shape, x.shape)
    print(f"output spatial shape {y.shape[2:]} == input spatial shape {x.shape[2:]}")
    print(f"dec2: {int((dec2[0].max(axis=(1, 2)) > 0).sum())} of {dec2.shape[1]} channels active after ReLU")

    fig, axes = plt.subplots(2, 4, figsize=(13, 6.8))
    show_map(axes[0, 0], x[0].transpose(1, 2, 0), f"input {x.shape}")
    show_map(axes[0, 1], y[0, 0], f"U-Net output {y.shape}", cmap="magma")
    # With random weights many ReLU channels are dead (all zero); show the six most varied ones.
    for ax, c in zip(axes.flat[2:], np.argsort(dec2[0].std(axis=(1, 2)))[::-1][:6]):
        show_map(ax, dec2[0, c], f"dec2 channel {c}", cmap="magma")
    fig.suptitle("Simplified U-Net built from convfast.Conv2d / ConvTranspose2d (random weights)")
    save_figure(fig, out, "unet_forward")


if __name__ == "__main__":
    main()
