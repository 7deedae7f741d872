"""Latency of single convolutions quiet and with competing busy processes: p50 / p90 for convfast
and PyTorch at the same thread count, and the throughput of Python threads calling at once.

    python scripts/contention_bench.py                     # defaults: 2 threads, 1 busy process
    python scripts/contention_bench.py --env GOMP_SPINCOUNT=1000 --env OMP_WAIT_POLICY=passive
    python scripts/contention_bench.py --throughput-only --repeats 9

Each configuration runs in a fresh subprocess (OpenMP runtimes read their environment when they
load). Quiet and busy phases alternate, several rounds, so that drift in the machine's other load
falls on both. "busy" starts `--busy` processes running `while True: pass` for the phase.

Throughput (`--throughput`): 4 Python threads started together, each making a quarter of the
calls, against the same calls made one after another on one thread; the two alternate (which one
goes first alternates too), `--repeats` times, and the median ratio serial time / threaded time is
reported with its range, for convfast and PyTorch (1.00x: 4 threads do as much as one);
`--throughput-busy` measures it with the `--busy` processes running.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

CASES = {  # name: (batch, channels, size), 3x3, padding 1
    "small 1x32x14x14": (1, 32, 14),
    "large 1x64x56x56": (1, 64, 56),
}
PYTHON_THREADS = 4


@contextlib.contextmanager
def _busy(n: int):
    """n processes running `while True: pass` for the duration."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if hogs:
            time.sleep(0.2)  # let them be scheduled
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def _latency(args, fns) -> dict:
    import numpy as np
    times = {(name, phase): [] for name in CASES for phase in ("quiet", "busy")}
    for _ in range(args.rounds):
        for phase in ("quiet", "busy"):
            with _busy(args.busy if phase == "busy" else 0):
                for name, fn in fns.items():
                    calls = args.calls if name.startswith("small") else max(5, args.calls // 10)
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        fn()
                        times[(name, phase)].append(time.perf_counter() - t0)
    return {f"{name}|{phase}": [float(np.percentile(t, 50)) * 1e3, float(np.percentile(t, 90)) * 1e3]
            for (name, phase), t in times.items()}


def _threaded_seconds(fn, calls: int) -> float:
    """Wall time of PYTHON_THREADS threads, released together, each making calls / PYTHON_THREADS calls."""
    share = calls // PYTHON_THREADS
    start = threading.Barrier(PYTHON_THREADS + 1)

    def body():
        start.wait()
        for _ in range(share):
            fn()

    threads = [threading.Thread(target=body) for _ in range(PYTHON_THREADS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _throughput(fn, calls: int, repeats: int) -> list:
    calls -= calls % PYTHON_THREADS
    ratios = []
    for r in range(repeats):
        timings = {}
        for order in (("serial", "threads") if r % 2 == 0 else ("threads", "serial")):
            if order == "serial":
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                timings[order] = time.perf_counter() - t0
            else:
                timings[order] = _threaded_seconds(fn, calls)
        ratios.append([timings["serial"] / timings["threads"], timings["serial"] / calls * 1e3,
                       timings["threads"] / calls * 1e3])
    return ratios


def _worker(args) -> None:
    import numpy as np
    lib = args.library
    rng = np.random.default_rng(0)
    if lib == "torch":
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(args.threads)
    else:
        import convfast
        convfast.set_num_threads(args.threads)
    fns = {}
    for name, (n, c, s) in CASES.items():
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        if lib == "torch":
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            fns[name] = (lambda xt=xt, wt=wt: F.conv2d(xt, wt, padding=1))
        else:
            fns[name] = (lambda x=x, w=w: convfast.conv2d(x, w, padding=1))
    for fn in fns.values():  # warm up (plans, pages, the thread pool)
        for _ in range(5):
            fn()
    out = {} if args.throughput_only else _latency(args, fns)
    if args.throughput or args.throughput_only:
        _threaded_seconds(fns["small 1x32x14x14"], 40)  # warm up the callers' own OpenMP pools
        with _busy(args.busy if args.throughput_busy else 0):
            out["throughput"] = {name.split()[0]: _throughput(fn, args.throughput_calls if name.startswith("small")
                                                              else max(8, args.throughput_calls // 20), args.repeats)
                                 for name, fn in fns.items()}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=1, help="competing busy processes in the busy phases")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=200, help="calls of the small conv per phase (large: a tenth)")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the convfast worker (repeatable)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--throughput", action="store_true",
                    help=f"also: {PYTHON_THREADS} Python threads calling at once, throughput over serial calls")
    ap.add_argument("--throughput-only", action="store_true", help="only the throughput, no latency phases")
    ap.add_argument("--throughput-busy", action="store_true", help="measure the throughput with --busy processes")
    ap.add_argument("--throughput-calls", type=int, default=400, help="calls of the small conv (large: a 20th)")
    ap.add_argument("--repeats", type=int, default=7, help="throughput measurements (median reported)")
    ap.add_argument("--worker", choices=["convfast", "torch"], dest="library", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.library:
        return _worker(args)
    common = ["--threads", str(args.threads), "--busy", str(args.busy), "--rounds", str(args.rounds),
              "--calls", str(args.calls), "--throughput-calls", str(args.throughput_calls),
              "--repeats", str(args.repeats)]
    common += ["--throughput"] * args.throughput + ["--throughput-only"] * args.throughput_only
    common += ["--throughput-busy"] * args.throughput_busy
    env = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    runs = [("convfast", env)] + ([] if args.no_torch else [("torch", dict(os.environ))])
    print(f"{args.threads} threads, {args.busy} busy process(es), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; convfast env: {' '.join(args.env) or '(defaults)'}")
    if not args.throughput_only:
        print(f"{'library':>9} {'case':>18} | {'quiet p50':>9} {'p90':>7} | {'busy p50':>9} {'p90':>7} | "
              "p90 busy/quiet")
    for lib, e in runs:
        r = subprocess.run([sys.executable, __file__, "--worker", lib] + common, env=e, capture_output=True,
                           text=True, timeout=1800)
        if r.returncode:
            sys.exit(r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if not args.throughput_only:
            for name in CASES:
                q, b = res[f"{name}|quiet"], res[f"{name}|busy"]
                print(f"{lib:>9} {name:>18} | {q[0]:9.3f} {q[1]:7.3f} | {b[0]:9.3f} {b[1]:7.3f} | "
                      f"{b[1] / q[1]:6.2f}x")
        if "throughput" in res:
            print(f"{lib:>9}: {PYTHON_THREADS} Python threads at once, throughput over serial, median [min-max] of "
                  f"{args.repeats} (ms per call serial / threaded, medians)"
                  f"{f', {args.busy} busy process(es)' if args.throughput_busy else ''}:")
            for k, v in res["throughput"].items():
                ratio, serial, threaded = ([r[i] for r in v] for i in range(3))
                print(f"{'':>11}{k:>6} {statistics.median(ratio):.2f}x [{min(ratio):.2f}-{max(ratio):.2f}] "
                      f"({statistics.median(serial):.3f} / {statistics.median(threaded):.3f})")


if __name__ == "__main__":
    main()
