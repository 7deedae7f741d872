"""Latency of single convolutions quiet and with competing busy processes: p50 / p90 for convfast
and PyTorch at the same thread count, and the throughput of Python threads calling convfast at once.

    python scripts/contention_bench.py                     # defaults: 2 threads, 1 busy process
    python scripts/contention_bench.py --env GOMP_SPINCOUNT=1000 --env OMP_WAIT_POLICY=passive

Each configuration runs in a fresh subprocess (OpenMP runtimes read their environment when they
load). Quiet and busy phases alternate, several rounds, so that drift in the machine's other load
falls on both. "busy" starts `--busy` processes running `while True: pass` for the phase.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {  # name: (batch, channels, size), 3x3, padding 1
    "small 1x32x14x14": (1, 32, 14),
    "large 1x64x56x56": (1, 64, 56),
}


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
    times = {(name, phase): [] for name in CASES for phase in ("quiet", "busy")}
    for _ in range(args.rounds):
        for phase in ("quiet", "busy"):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)] \
                if phase == "busy" else []
            try:
                if hogs:
                    time.sleep(0.2)  # let them be scheduled
                for name, fn in fns.items():
                    calls = args.calls if name.startswith("small") else max(5, args.calls // 10)
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        fn()
                        times[(name, phase)].append(time.perf_counter() - t0)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    out = {f"{name}|{phase}": [float(np.percentile(t, 50)) * 1e3, float(np.percentile(t, 90)) * 1e3]
           for (name, phase), t in times.items()}
    if lib == "convfast" and args.throughput:
        import concurrent.futures
        fn = fns["small 1x32x14x14"]
        big = fns["large 1x64x56x56"]
        res = {}
        for label, f, k in (("small", fn, 400), ("large", big, 40)):
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            serial = time.perf_counter() - t0
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda _: f(), range(k)))
                threaded = time.perf_counter() - t0
            res[label] = serial / threaded
        out["throughput"] = res
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
                    help="also: 4 Python threads calling convfast at once, throughput over serial calls")
    ap.add_argument("--worker", choices=["convfast", "torch"], dest="library", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.library:
        return _worker(args)
    common = ["--threads", str(args.threads), "--busy", str(args.busy), "--rounds", str(args.rounds),
              "--calls", str(args.calls)] + (["--throughput"] if args.throughput else [])
    env = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    runs = [("convfast", env)] + ([] if args.no_torch else [("torch", dict(os.environ))])
    print(f"{args.threads} threads, {args.busy} busy process(es), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; convfast env: {' '.join(args.env) or '(defaults)'}")
    print(f"{'library':>9} {'case':>18} | {'quiet p50':>9} {'p90':>7} | {'busy p50':>9} {'p90':>7} | p90 busy/quiet")
    for lib, e in runs:
        r = subprocess.run([sys.executable, __file__, "--worker", lib] + common, env=e, capture_output=True,
                           text=True, timeout=1800)
        if r.returncode:
            sys.exit(r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        for name in CASES:
            q, b = res[f"{name}|quiet"], res[f"{name}|busy"]
            print(f"{lib:>9} {name:>18} | {q[0]:9.3f} {q[1]:7.3f} | {b[0]:9.3f} {b[1]:7.3f} | {b[1] / q[1]:6.2f}x")
        if "throughput" in res:
            print("  4 Python threads at once, throughput over serial: " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in res["throughput"].items()))


if __name__ == "__main__":
    main()
