"""Helpers shared by the example scripts: command line, output folder, figures, the sample photograph
and the NumPy pieces (ReLU, max-pooling) that convfast deliberately does not provide.

Every script runs as ``python examples/NAME.py [--out DIR]``; Python puts ``examples/`` first on
``sys.path``, which is how the scripts find this module without it being installed.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

# Select the non-interactive backend before pyplot is imported anywhere, so that the examples run on
# machines without a display (CI, containers) and never block on a window.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def output_dir(doc: str) -> Path:
    """Parse ``--out DIR`` and return the folder, created. Without ``--out`` a fresh temporary folder is
    used (and printed), so running an example never writes into the source tree. ``doc`` is the
    script's docstring; its first paragraph is the ``--help`` description."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the PNG files (default: a new temporary folder, printed)")
    args = parser.parse_args()
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="convfast-examples-"))
        print(f"no --out given: writing the figures to {out}")
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig, out: Path, name: str) -> Path:
    """Write ``fig`` as ``out/name.png``, close it (figures are otherwise kept alive by pyplot) and
    print where it went."""
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def sample_photo(gray: bool = True) -> np.ndarray:
    """Grace Hopper's portrait, shipped with matplotlib (mpl-data/sample_data), as float32 in [0, 1]:
    (H, W) when ``gray``, else (H, W, 3). A real photograph gives the edge detectors real structure."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb = plt.imread(f, format="jpg").astype(np.float32) / 255.0
    if not gray:
        return rgb
    # ITU-R BT.601 luma weights: the usual "convert to grayscale".
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


def max_pool(x: np.ndarray, size: int = 2) -> np.ndarray:
    """Non-overlapping max-pooling over every spatial axis of a channels-first (N, C, *spatial) array,
    by reshaping each axis into (n // size, size); trailing rows that do not fill a window are dropped,
    as in torch's MaxPool with kernel_size == stride."""
    spatial = x.shape[2:]
    trimmed = x[(slice(None), slice(None)) + tuple(slice(0, n - n % size) for n in spatial)]
    shape = list(x.shape[:2])
    for n in spatial:
        shape += [n // size, size]
    return trimmed.reshape(shape).max(axis=tuple(range(3, 2 + 2 * len(spatial), 2)))


def show_map(ax, image, title: str, cmap: str = "gray", **kwargs) -> None:
    """imshow without ticks: the examples' panels are pictures, not plots."""
    ax.imshow(image, cmap=cmap, **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
