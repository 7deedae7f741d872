"""asv benchmarks: the cost of chunking. convfast.dask.conv3d on the threaded scheduler against one
in-memory convfast.conv3d call of the same volume (which fits in memory), in output voxels per
second, so that the overhead of the block plan (halo gathering, task scheduling, smaller kernel
calls) is known.

Cases (float32, padding="same", padding_mode="reflect", N = 1):
  smooth5  - 1 -> 1 channel, 5x5x5 kernel, 192^3 volume (the examples/dask_volume.py filter)
  feat3    - 8 -> 8 channels, 3x3x3 kernel, 96^3 volume (a small 3-D CNN layer)
Chunks: 32^3 and 64^3 cubes, and "slab" (size/4, size/4, size): blocks whose last, contiguous axis
is the whole row, which the kernels prefer (short rows cost per-row overhead in the direct path);
"threads" = dask scheduler threads x convfast (OpenMP) threads per call.
The dask input is dask.array.from_array of an in-memory volume, so input generation is not timed;
compute() materialises the whole result, like the in-memory call.

asv:     asv run --python=same --quick --show-stderr --bench bench_dask
script:  python -m benchmarks.bench_dask [--repeats 3]   (prints one table; run from the repository root)
"""
import argparse
import os
import platform

import numpy as np

import convfast

from .bench_conv import _best_seconds

try:
    import dask
    import dask.array as da
    import convfast.dask as cfd
except ImportError:  # asv skips a benchmark whose setup raises NotImplementedError
    da = None

CASES = {
    "smooth5": dict(channels=(1, 1), kernel=5, size=192),
    "feat3": dict(channels=(8, 8), kernel=3, size=96),
}
CHUNKS = ["32^3", "64^3", "slab"]
# (dask threads, convfast threads per call); the in-memory call uses all cores.
THREADS = {"1x2": (1, 2), "2x1": (2, 1)}
CONV_KW = dict(padding="same", padding_mode="reflect")


def make_inputs(case):
    c = CASES[case]
    rng = np.random.default_rng(0)
    cin, cout = c["channels"]
    n, k = c["size"], c["kernel"]
    x = rng.standard_normal((1, cin, n, n, n), dtype=np.float32)
    w = (rng.standard_normal((cout, cin, k, k, k), dtype=np.float32) / (cin * k ** 3))
    return x, w


def chunk_shape(case, chunk):
    n = CASES[case]["size"]
    if chunk == "slab":
        return (n // 4, n // 4, n)
    return (int(chunk.split("^")[0]),) * 3


class DaskConv3d:
    """Chunked (threaded scheduler) against in-memory conv3d."""

    params = [list(CASES), CHUNKS, list(THREADS)]
    param_names = ["case", "chunk", "threads"]
    timeout = 300
    repeat = (1, 3, 30.0)
    number = 1

    def setup(self, case, chunk, threads):
        if da is None:
            raise NotImplementedError("dask is not installed")
        self.x, self.w = make_inputs(case)
        self.dask_threads, self.cf_threads = THREADS[threads]
        self.saved_threads = convfast.get_num_threads()
        cin = self.x.shape[1]
        self.y = cfd.conv3d(da.from_array(self.x, chunks=(1, cin) + chunk_shape(case, chunk)), self.w, **CONV_KW)
        self.voxels = int(np.prod(self.y.shape[2:]))
        self.run_chunked()  # warm-up

    def teardown(self, case, chunk, threads):
        convfast.set_num_threads(self.saved_threads)

    def run_chunked(self):
        convfast.set_num_threads(self.cf_threads)
        with dask.config.set(scheduler="threads", num_workers=self.dask_threads):
            return self.y.compute()

    def run_in_memory(self):
        convfast.set_num_threads(self.dask_threads * self.cf_threads)
        return convfast.conv3d(self.x, self.w, **CONV_KW)

    def time_chunked(self, case, chunk, threads):
        self.run_chunked()

    def time_in_memory(self, case, chunk, threads):
        self.run_in_memory()

    def track_voxels_per_second_chunked(self, case, chunk, threads):
        return self.voxels / _best_seconds(self.run_chunked, 3)

    track_voxels_per_second_chunked.unit = "voxels/s"

    def track_chunked_over_in_memory(self, case, chunk, threads):
        """Throughput ratio (1.0 = no overhead)."""
        return _best_seconds(self.run_in_memory, 3) / _best_seconds(self.run_chunked, 3)

    track_chunked_over_in_memory.unit = "x"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args()
    if da is None:
        raise SystemExit("dask is not installed: pip install 'convfast[dask]'")
    print(f"convfast {convfast.__version__} isa={convfast.get_isa()} cores={os.cpu_count()} "
          f"dask {dask.__version__} numpy {np.__version__} {platform.processor() or platform.machine()}")
    print(f"{'case':<8} {'chunk':>5} {'threads':>7} {'blocks':>6} {'in-memory Mvox/s':>17} "
          f"{'chunked Mvox/s':>15} {'ratio':>6} {'bitwise':>7}")
    bench = DaskConv3d()
    for case in CASES:
        for chunk in CHUNKS:
            for threads in THREADS:
                bench.setup(case, chunk, threads)
                try:
                    # Correctness first: the benchmark compares equal work (bitwise expected, see
                    # docs/dask.md; float32 bound otherwise).
                    got, ref = bench.run_chunked(), bench.run_in_memory()
                    bitwise = bool(np.array_equal(got, ref))
                    assert bitwise or np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), (case, chunk)
                    t_mem = _best_seconds(bench.run_in_memory, args.repeats)
                    t_chunk = _best_seconds(bench.run_chunked, args.repeats)
                finally:
                    bench.teardown(case, chunk, threads)
                print(f"{case:<8} {chunk:>5} {threads:>7} {bench.y.npartitions:>6} {bench.voxels / t_mem / 1e6:>17.1f} "
                      f"{bench.voxels / t_chunk / 1e6:>15.1f} {t_mem / t_chunk:>6.2f} {str(bitwise):>7}")


if __name__ == "__main__":
    main()
