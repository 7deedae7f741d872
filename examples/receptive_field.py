"""Receptive-field growth with depth and with dilation (the classic receptive-field plots),
from ``convfast.receptive_field``, with a VGG-16 feature stack and the ResNet stem (7x7 stride-2
convolution, then 3x3 stride-2 max-pool). Every field is cross-checked by propagating one output
pixel back to the input with ``convfast.conv_transpose1d``.

    python examples/receptive_field.py [--out DIR]
"""
import matplotlib.pyplot as plt
import numpy as np

import convfast
from _common import output_dir, save_figure


def conv(k, stride=1, padding=0, dilation=1):
    return {"kernel_size": k, "stride": stride, "padding": padding, "dilation": dilation}


def vgg16():
    """VGG-16's convolutional part: 3x3 'same' convolutions in blocks of 2, 2, 3, 3, 3, each block
    followed by a 2x2 stride-2 max-pool."""
    layers, names = [], []
    for block, repeat in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, repeat + 1):
            layers.append(conv(3, padding=1))
            names.append(f"conv{block}_{i}")
        layers.append(conv(2, stride=2))
        names.append(f"pool{block}")
    return names, layers


def resnet_stem():
    """ResNet's stem and a residual block: only the convolution/pooling geometry matters here
    (batch-norm, ReLU and the identity shortcut leave the field unchanged)."""
    names = ["conv1 7x7 s2 p3", "maxpool 3x3 s2 p1", "block conv 3x3 p1", "block conv 3x3 p1"]
    return names, [conv(7, 2, 3), conv(3, 2, 1), conv(3, padding=1), conv(3, padding=1)]


def sizes_through(layers, in_size):
    """Spatial length before the first layer and after each one."""
    sizes = [in_size]
    for layer in layers:
        sizes.append(convfast.conv_output_shape(sizes[-1], layer["kernel_size"], layer["stride"],
                                                layer["padding"], layer["dilation"])[0])
    return sizes


def footprint(layers, in_size, out_index):
    """First and last input pixel that output ``out_index`` of the last layer depends on, found by the adjoint:
    a one-hot output is pushed back through every layer with an all-ones kernel by a transposed
    convolution. A max-pool is not linear, but the pixels it may read are those of a ones-kernel
    convolution of the same geometry, which is all a receptive field is about."""
    sizes = sizes_through(layers, in_size)
    g = np.zeros((1, 1, sizes[-1]))
    g[0, 0, out_index] = 1.0
    for layer, size in zip(reversed(layers), reversed(sizes[:-1])):
        # output_size resolves the ambiguity a stride leaves in the transposed output length.
        g = convfast.conv_transpose1d(g, np.ones((1, 1, layer["kernel_size"])), stride=layer["stride"],
                                      padding=layer["padding"], dilation=layer["dilation"], output_size=(size,))
    hit = np.flatnonzero(g[0, 0])
    return hit[0], hit[-1]


def check(layers, label):
    """The adjoint's footprint of a central output pixel must be exactly [centre - (size-1)/2,
    centre + (size-1)/2] with centre = start + index * jump. The 1-D input is made four fields long
    so that the footprint is never clipped by the border."""
    rf = convfast.receptive_field(layers)[-1]
    in_size = 4 * rf.size
    index = sizes_through(layers, in_size)[-1] // 2
    centre = rf.start + index * rf.jump
    expected = (centre - (rf.size - 1) / 2, centre + (rf.size - 1) / 2)
    got = footprint(layers, in_size, index)
    assert got == expected, (label, got, expected)
    return rf


def print_table(title, names, layers):
    print(title)
    print(f"  {'layer':<20} {'size':>5} {'jump':>5} {'start':>6}")
    for name, r in zip(names, convfast.receptive_field(layers)):
        print(f"  {name:<20} {r.size:>5} {r.jump:>5} {r.start:>6}")


def main():
    out = output_dir(__doc__)
    depth = np.arange(1, 11)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

    ax = axes[0]
    for k in (3, 5, 7):
        sizes = [check([conv(k, padding=k // 2)] * n, f"k{k} x{n}").size for n in depth]
        ax.plot(depth, sizes, marker="o", label=f"{k}x{k}, stride 1")
    ax.set(title="growth with depth: size = 1 + depth * (k - 1)", xlabel="layers", ylabel="receptive field")

    ax = axes[1]
    for label, dilations in (("dilation 1", [1] * 10), ("dilation 2", [2] * 10),
                             ("dilation 2**i (context module)", [2 ** i for i in range(10)])):
        stack = [conv(3, padding=d, dilation=d) for d in dilations]
        sizes = [check(stack[:n], f"{label} x{n}").size for n in depth]
        ax.plot(depth, sizes, marker="o", label=label)
    ax.set(title="3x3 kernels with dilation", xlabel="layers", yscale="log")

    ax = axes[2]
    for title, (names, layers) in (("VGG-16 features", vgg16()), ("ResNet stem + block", resnet_stem())):
        sizes = [check(layers[:n], f"{title} {n}").size for n in range(1, len(layers) + 1)]
        ax.plot(range(1, len(layers) + 1), sizes, marker="o", label=title)
    ax.set(title="real stacks (strides multiply the jump)", xlabel="layers")
    for ax in axes:
        ax.grid(True, alpha=0.4)
        ax.legend()
    save_figure(fig, out, "receptive_field")

    # Padding moves the field (start) but never resizes it: valid-vs-same curves coincide.
    valid = convfast.receptive_field([conv(3)] * 5)[-1]
    same = convfast.receptive_field([conv(3, padding="same")] * 5)[-1]
    print(f"5 x conv3x3: valid {valid}, same {same}")
    print_table("VGG-16 (224x224 input):", *vgg16())
    print_table("ResNet stem:", *resnet_stem())
    names, layers = resnet_stem()
    print("  output size on a 224x224 image: " + " -> ".join(map(str, sizes_through(layers, 224))))
    print("every receptive field matched the transposed-convolution footprint of a central output pixel")


if __name__ == "__main__":
    main()
