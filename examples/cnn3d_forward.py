"""A small 3-D CNN (video / medical-volume style), forward pass only, with convfast.Conv3d:
conv 32 -> pool -> conv 64 -> pool -> conv 64 -> flatten -> dense 64 -> dense 1 (sigmoid), with
"valid" and "same" padding, on a synthetic 64^3 volume. Every convolution's output shape is checked
against ``convfast.conv_output_shape``. Weights are random.

    python examples/cnn3d_forward.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np

import convfast
from _common import max_pool, output_dir, relu, save_figure, show_map

SIZE = 64


def synthetic_volume(n, seed=0):
    """A bright ball and a dimmer box in a noisy (1, 1, n, n, n) volume: 3-D structure for the filters
    to respond to."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n, 0:n, 0:n] / n
    vol = ((x - 0.35) ** 2 + (y - 0.4) ** 2 + (z - 0.5) ** 2 < 0.2 ** 2).astype(np.float32)
    vol[int(0.4 * n):int(0.7 * n), int(0.6 * n):int(0.9 * n), int(0.55 * n):int(0.85 * n)] = 0.6
    vol += 0.1 * rng.standard_normal(vol.shape).astype(np.float32)
    return vol[None, None]


class CNN3D:
    def __init__(self, padding, in_size, seed=0):
        rng = np.random.default_rng(seed)
        self.padding = padding
        self.convs = [convfast.Conv3d(1, 32, 3, padding=padding, seed=rng),
                      convfast.Conv3d(32, 64, 3, padding=padding, seed=rng),
                      convfast.Conv3d(64, 64, 3, padding=padding, seed=rng)]
        # The dense layer's width depends on the padding through the flattened size, which is why the
        # "valid" and "same" models differ in parameter count.
        spatial = (in_size,) * 3
        for i, conv in enumerate(self.convs):
            spatial = convfast.conv_output_shape(spatial, conv.kernel_size, padding=padding)
            if i < 2:
                spatial = tuple(s // 2 for s in spatial)
        flat = 64 * int(np.prod(spatial))
        self.dense1 = (rng.standard_normal((flat, 64), np.float32) / np.sqrt(flat), np.zeros(64, np.float32))
        self.dense2 = (rng.standard_normal((64, 1), np.float32) / 8.0, np.zeros(1, np.float32))

    def parameters(self):
        convs = sum(c.weight.size + c.bias.size for c in self.convs)
        return convs + sum(w.size + b.size for w, b in (self.dense1, self.dense2))

    def __call__(self, x):
        """Forward pass, printing every stage; returns the probability and the three conv outputs."""
        print(f"  {'input':<14} {x.shape}")
        features = []
        for i, conv in enumerate(self.convs):
            expected = convfast.conv_output_shape(x.shape[2:], conv.kernel_size, padding=self.padding)
            x = relu(conv(x))
            assert x.shape[2:] == expected, (x.shape, expected)
            features.append(x)
            print(f"  {f'conv3d {i + 1}':<14} {x.shape}  (conv_output_shape: {expected})")
            if i < 2:
                x = max_pool(x)
                print(f"  {'maxpool 2':<14} {x.shape}")
        x = x.reshape(x.shape[0], -1)
        print(f"  {'flatten':<14} {x.shape}")
        x = relu(x @ self.dense1[0] + self.dense1[1])
        print(f"  {'dense 64':<14} {x.shape}")
        logit = x @ self.dense2[0] + self.dense2[1]
        p = 1.0 / (1.0 + np.exp(-logit))
        print(f"  {'dense 1':<14} {p.shape}  sigmoid -> {p.ravel()[0]:.4f}")
        return p, features


def main():
    out = output_dir(__doc__)
    vol = synthetic_volume(SIZE)

    # Keras' Conv3D is channels-last (N, D, H, W, C); convfast reads that layout in place. Check once
    # that it agrees with the channels-first layer on the same weights.
    first = convfast.Conv3d(1, 8, 3, padding="same", seed=1)
    last = convfast.Conv3d.from_weights(first.weight, first.bias, padding="same", data_format="channels_last")
    np.testing.assert_allclose(last(vol.transpose(0, 2, 3, 4, 1)), first(vol).transpose(0, 2, 3, 4, 1),
                               rtol=1e-5, atol=1e-5)
    print("channels_last (Keras layout) == channels_first, transposed")

    fig, axes = plt.subplots(2, 4, figsize=(13, 6.8))
    for row, padding in zip(axes, ("valid", "same")):
        model = CNN3D(padding, SIZE)
        print(f"padding={padding!r}: {model.parameters():,} parameters")
        p, features = model(vol)
        mid = SIZE // 2
        show_map(row[0], vol[0, 0, mid], f"input, slice {mid} of {vol.shape[2:]}")
        for ax, (i, f) in zip(row[1:], enumerate(features, start=1)):
            # The most active channel's middle slice: what the layer picked up in the volume.
            c = int(f[0].reshape(f.shape[1], -1).std(axis=1).argmax())
            show_map(ax, f[0, c, f.shape[2] // 2], f"{padding}: conv {i}, ch {c}, {f.shape[2:]}", cmap="magma")
    fig.suptitle("3-D CNN with convfast.Conv3d: middle slices (random weights)")
    save_figure(fig, out, "cnn3d_forward")


if __name__ == "__main__":
    main()
