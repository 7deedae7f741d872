"""Convolve a 3-D volume larger than a worker's memory, chunk by chunk, on a dask.distributed cluster
with convfast.dask.conv3d: a 640^3 float32 volume (1.05 GB, generated lazily with dask.array.random)
through a 1 -> 2 channel 5x5x5 filter bank (Gaussian smoothing and a difference-of-Gaussians blob
detector, reflect padding, "same" output) on a local cluster of worker processes (one per core, at
most 2), each limited to less memory than the volume (800 MB, less on a machine with little memory).
The 2.1 GB result is written to a Zarr store when zarr is installed, else reduced to per-channel
statistics; either way no process ever holds the volume. One progress bar shows the blocks as they
finish (in a terminal, distributed's bar; otherwise a bar that grows on one line).

The example checks itself: one corner of the result (crossing chunk borders and the reflect-padded
outer border) is compared bit for bit with an in-memory convfast.conv3d of the same input region.

    python examples/dask_volume.py [--out DIR] [--small] [--size N] [--workers N] [--memory-limit 800MB]
                                   [--no-zarr]

``--small`` (or the environment variable CONVFAST_EXAMPLES_SMALL=1, which tests/test_examples.py
sets) runs a 96^3 volume in a few seconds; the default is the real 1 GB run (about a minute or two
on 2 cores). Needs dask[array] and distributed (pip install "convfast[dask]"); zarr is optional.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import convfast
import convfast.dask as cfd
import dask.array as da
from distributed import Client, LocalCluster, futures_of, progress
from distributed.diagnostics.progressbar import TextProgressBar

from _common import save_figure, show_map

SIGMAS = (1.0, 2.0)
KERNEL = 5
SEED = 0


def parse_args():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG (and the Zarr store)")
    small_env = os.environ.get("CONVFAST_EXAMPLES_SMALL", "") not in ("", "0")
    parser.add_argument("--small", action="store_true", default=small_env,
                        help="a 96^3 volume (a few seconds): what tests/test_examples.py runs")
    parser.add_argument("--size", type=int, default=None,
                        help="edge of the cubic volume (default 640, 96 with --small)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one thread each (default: one per core, at most 2)")
    parser.add_argument("--memory-limit", default=None,
                        help="memory limit of each worker (default 800MB, or less where the machine's memory "
                             "divided among the workers is smaller)")
    parser.add_argument("--no-zarr", action="store_true", help="reduce the result even when zarr is installed")
    args = parser.parse_args()
    if args.size is None:
        args.size = 96 if args.small else 640
    if args.memory_limit is None:
        args.memory_limit = default_memory_limit(args.workers)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="convfast-examples-"))
        print(f"no --out given: writing into {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def default_memory_limit(workers: int) -> str:
    """800 MB per worker (below the 1 GB volume, well above a worker's own ~200 MB of Python, NumPy and
    distributed), or half the machine's memory shared among the workers where that is less. A limit
    near a worker's idle footprint makes distributed warn "Worker is at 80% memory usage" over and
    over and spill or pause for nothing."""
    import psutil  # a dependency of distributed
    share = psutil.virtual_memory().total // 2 // max(workers, 1)
    return f"{min(800_000_000, share) // 1_000_000}MB"


class LineProgressBar(TextProgressBar):
    """distributed's text progress bar for a stdout that is not a terminal (a log file, a pipe): the
    bar grows on one line, ``#`` by ``#``, instead of being redrawn with carriage returns."""

    def __init__(self, keys, **kwargs):
        self._shown = 0
        sys.stdout.write("[")
        super().__init__(keys, **kwargs)

    def _draw_bar(self, remaining, all, **kwargs):
        done = int(self.width * ((1 - remaining / all) if all else 1.0))
        if done > self._shown:
            sys.stdout.write("#" * (done - self._shown))
            sys.stdout.flush()
            self._shown = done

    def _draw_stop(self, **kwargs):
        sys.stdout.write("#" * (self.width - self._shown) + f"] 100% in {self.elapsed:.1f} s\n"
                         if kwargs.get("status") != "error" else "] stopped by an error\n")
        sys.stdout.flush()


def show_progress(futures) -> None:
    """One progress bar over all the blocks behind ``futures``; blocks until they are done."""
    if sys.stdout.isatty():
        progress(futures, multi=False)
    else:
        LineProgressBar(futures_of(futures))


def filter_bank() -> np.ndarray:
    """(2, 1, 5, 5, 5) float32: a normalised Gaussian (sigma 1) and a zero-mean difference of
    Gaussians (sigma 1 minus sigma 2), which responds to blobs of a few voxels."""
    r = np.arange(KERNEL) - KERNEL // 2
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    g1, g2 = (np.exp(-d2 / (2 * s * s)) for s in SIGMAS)
    g1, g2 = g1 / g1.sum(), g2 / g2.sum()
    return np.stack([g1, g1 - g2])[:, None].astype(np.float32)


def _add_waves(block, n, block_info=None):
    """Smooth waves added to one chunk of noise, from the chunk's position in the volume."""
    (z0, z1), (y0, y1), (x0, x1) = block_info[0]["array-location"]
    z, y, x = (np.arange(a, b, dtype=np.float32) * np.float32(2 * np.pi / n)
               for a, b in ((z0, z1), (y0, y1), (x0, x1)))
    waves = np.sin(3 * z)[:, None, None] + np.cos(5 * y)[None, :, None] * np.sin(2 * x)[None, None, :]
    return block + 2 * waves


def lazy_volume(n: int, chunks) -> "da.Array":
    """(1, 1, n, n, n) float32: noise plus smooth waves, generated chunk by chunk on the workers."""
    noise = da.random.default_rng(SEED).standard_normal((n, n, n), chunks=chunks, dtype=np.float32)
    return noise.map_blocks(_add_waves, n, dtype=np.float32)[None, None]


def main():
    args = parse_args()
    n = args.size
    # Slabs with whole rows along the last, contiguous axis (the kernels' fast case; short rows cost
    # per-row overhead): 32 x 64 x 640 float32 = 5 MB per chunk, 200 chunks, so that a task's
    # working set (its chunk, the halo from 8 neighbours, the gathered block, 2 output channels)
    # is a few tens of MB, well inside a worker's limit next to its own footprint.
    chunks = (max(n // 20, 16), max(n // 10, 24), n)
    x = lazy_volume(n, chunks)
    w = filter_bank()
    y = cfd.conv3d(x, w, padding="same", padding_mode="reflect")
    print(f"input  {x.shape} {x.dtype}: {x.nbytes / 1e9:.2f} GB in {x.npartitions} chunks of {x.chunksize}")
    print(f"output {y.shape} {y.dtype}: {y.nbytes / 1e9:.2f} GB in {y.npartitions} chunks of {y.chunksize}")

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=None) as cluster, Client(cluster) as client:
        limit = min(ws["memory_limit"] for ws in client.scheduler_info()["workers"].values())
        print(f"{args.workers} workers, memory limit {limit / 1e6:.0f} MB each "
              f"(the input alone is {x.nbytes / limit:.1f}x that)")
        # Everything this script computes goes to the scheduler in ONE compute call: dask's graph
        # optimisation fuses tasks differently for different requests, and resubmitting a key with
        # another definition in a later call is what dask/dask#9888 warns about.
        half = KERNEL // 2
        m = max(1, min(chunks[0] + 16, n - 2 * half))  # the corner checked against the in-memory call
        mid = n // 2
        checks = [x[..., :m + 2 * half, :m + 2 * half, :m + 2 * half], y[..., :m, :m, :m],
                  x[0, 0, mid], y[0, 0, mid], y[0, 1, mid]]
        try:
            if args.no_zarr:
                raise ImportError
            import zarr  # noqa: F401
            store = args.out / "filtered.zarr"
            job = y.to_zarr(str(store), overwrite=True, compute=False)
            what = f"wrote {store}"
        except ImportError:  # no zarr: reduce instead (per-channel mean, std, min, max)
            axes = (0, 2, 3, 4)
            job = da.stack([y.mean(axis=axes, dtype=np.float64), y.std(axis=axes, dtype=np.float64),
                            y.min(axis=axes).astype(np.float64), y.max(axis=axes).astype(np.float64)])
            what = "reduced to statistics (install zarr to write the result to a Zarr store)"
        t0 = time.perf_counter()
        futures = client.compute([job] + checks)
        show_progress(futures)
        result, region, corner, *planes = client.gather(futures)
        seconds = time.perf_counter() - t0
        print(f"{what} in {seconds:.1f} s: {n ** 3 / seconds / 1e6:.1f} M voxels/s (both channels, input "
              f"generation included)")
        if isinstance(result, np.ndarray) and result.shape == (4, 2):
            for c, name in enumerate(("gaussian", "DoG")):
                mean, std, lo, hi = result[:, c]
                print(f"  {name:>8}: mean {mean:+.4f}  std {std:.4f}  min {lo:+.3f}  max {hi:+.3f}")
            # The difference of Gaussians sums to 0 (and reflect padding adds no zeros), so its mean is ~0.
            assert np.isfinite(result).all() and abs(result[0, 1]) < 0.05, result

    # The corner [0, m)^3 from one in-memory call: the input region plus the kernel's half-width,
    # reflect-padded at the lower border only, reads exactly the values the whole call reads.
    expected = convfast.conv3d(region, w, padding=[(half, 0)] * 3, padding_mode="reflect")[..., :m, :m, :m]
    assert np.array_equal(corner, expected), f"max |difference| {np.abs(corner - expected).max()}"
    print(f"corner {m}^3 (across chunk borders and the reflect border) equals the in-memory call bit for bit")

    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    titles = ("input (noise + waves)", "Gaussian, sigma 1", "difference of Gaussians")
    for ax, plane, title in zip(axes, planes, titles):
        show_map(ax, plane, f"{title}, z = {mid}")
    fig.suptitle(f"convfast.dask.conv3d on a {n}^3 volume, {y.npartitions} chunks, {args.workers} workers "
                 f"of {args.memory_limit}", fontsize=10)
    save_figure(fig, args.out, "dask_volume")


if __name__ == "__main__":  # required: the worker processes re-import this module
    main()
