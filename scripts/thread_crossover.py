"""1 vs 2 threads, work threshold lifted, batch-1 2-D layers (3x3, 1x1, depthwise), forward and both
gradients: the minimum of interleaved calls per thread count (python scripts/thread_crossover.py [float64]).
Use it to re-measure convfast/threads.hpp's work threshold on a quiet machine."""
import time, sys, numpy as np, convfast as cf
from convfast import _core
rng = np.random.default_rng(0)
_core.set_min_work_per_thread(0)
dtype = np.dtype(sys.argv[1]) if len(sys.argv) > 1 else np.float32
sizes = [(16, 14), (32, 14), (16, 28), (32, 28), (64, 14), (128, 14), (64, 28), (32, 56), (64, 56)]
print(f"{'case':>14} {'MACs':>9} {'f1':>7} {'f2':>7} {'r':>5} | {'gi1':>7} {'gi2':>7} {'r':>5} | {'gw1':>7} {'gw2':>7} {'r':>5}")
for C, H in sizes:
    for kind in ("3x3", "1x1", "dw"):
        x = rng.standard_normal((1, C, H, H)).astype(dtype)
        if kind == "3x3": w = rng.standard_normal((C, C, 3, 3)).astype(dtype); kw = dict(padding=1); macs = C*C*9*H*H
        elif kind == "1x1": w = rng.standard_normal((C, C, 1, 1)).astype(dtype); kw = {}; macs = C*C*H*H
        else: w = rng.standard_normal((C, 1, 3, 3)).astype(dtype); kw = dict(padding=1, groups=C); macs = C*9*H*H
        gy = np.ones_like(cf.conv2d(x, w, **kw))
        fns = {"f": lambda: cf.conv2d(x, w, **kw),
               "gi": lambda: cf.conv2d_backward(gy, x, w, needs=(True, False, False), **kw),
               "gw": lambda: cf.conv2d_backward(gy, x, w, needs=(False, True, False), **kw)}
        reps = max(10, min(200, int(1e8 / macs)))
        row = []
        for name, fn in fns.items():
            acc = {1: [], 2: []}
            for r in range(12):
                for n in (1, 2):
                    cf.set_num_threads(n)
                    for _ in range(reps // 6 + 2):
                        t0 = time.perf_counter(); fn(); acc[n].append(time.perf_counter() - t0)
            a, b = np.min(acc[1]), np.min(acc[2])
            row.append((a, b))
        print(f"{C:>4}x{H:<3}{kind:>4} {macs/1e6:>8.2f}M " + " | ".join(f"{a*1e6:7.1f} {b*1e6:7.1f} {a/b:5.2f}" for a, b in row), flush=True)
