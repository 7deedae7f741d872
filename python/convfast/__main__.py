"""Command line: ``python -m convfast info`` and ``python -m convfast bench [options]``; without a
command it prints the help."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convfast",
                                     description="convfast: compiled N-D convolutions with a NumPy API")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench}")
    sub.add_parser("info", help="version, ISA (active and supported), micro-kernel tiles, threads, OpenMP, CUDA")
    from . import bench
    bench_parser = sub.add_parser(
        "bench", help="time the layer suite against PyTorch (and NumPy)",
        description="Check every case of the layer suite against PyTorch, then time convfast and PyTorch "
                    "interleaved at the same thread count; print ms, GFLOP/s, % of the FMA peak and the speedup. "
                    "--pass backward times the gradients (grad_input + grad_weight) instead.")
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        return bench.info()
    if args.command == "bench":
        return bench.main(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
