"""Records (or checks) a SHA-256 of every result of a fixed set of seeded problems, per forced
algorithm setting and per micro-kernel ISA, so that a change of the engine's structure can be shown
to leave every result bit for bit as it was (tests/test_bitwise_stability.py).

    python scripts/record_bitwise.py            # writes tests/data/bitwise_results.json
    python scripts/record_bitwise.py --check    # recomputes and compares (exit status 1 on a difference)

Each (ISA, setting) runs in its own process (the settings are environment variables read by the
engine). Besides the hashes it records each forward problem's algorithm description (without the
thread count), so that a changed choice or blocking shows up by name.
"""
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "..", "tests", "data", "bitwise_results.json")

# name -> environment (besides CONVFAST_ISA); every other CONVFAST_* variable is removed.
SETTINGS = {
    "default": {},
    "winograd": {"CONVFAST_ALGO": "winograd"},
    "gemm": {"CONVFAST_ALGO": "gemm"},
    "gemm_no_pixel_lanes": {"CONVFAST_ALGO": "gemm", "CONVFAST_PIXEL_LANES": "0"},
    "direct": {"CONVFAST_ALGO": "direct"},
    "direct_rows": {"CONVFAST_ALGO": "direct", "CONVFAST_DIRECT": "rows"},
    "lanes": {"CONVFAST_ALGO": "lanes"},
    "scatter": {"CONVFAST_ALGO": "scatter"},
    "scatter_knob": {"CONVFAST_SCATTER": "1"},
    "pixel_lanes": {"CONVFAST_PIXEL_LANES": "1"},
    "weights_in_place": {"CONVFAST_WEIGHTS_IN_PLACE": "1"},
    "wgrad_gemm": {"CONVFAST_WGRAD_GEMM": "1"},
}


def _problems():
    """(name, thunk) pairs; each thunk returns the list of arrays (results) computed by convfast, or
    (arrays, algorithm descriptions)."""
    import numpy as np
    import convfast as cf
    from convfast import _core

    def data(seed, shape, dtype):
        return np.random.default_rng(seed).standard_normal(shape).astype(dtype)

    out = []

    def fwd(name, fn, x_shape, w_shape, dtype, bias=True, **kw):
        def run():
            x = data(1, x_shape, dtype)
            w = data(2, w_shape, dtype)
            b = data(3, (w_shape[1] * kw.get("groups", 1) if fn.startswith("conv_transpose") else w_shape[0],),
                     dtype) if bias else None
            return [getattr(cf, fn)(x, w, b, **kw)]
        out.append((name, run))

    for dt, tag in ((np.float32, "f32"), (np.float64, "f64")):
        fwd(f"conv1d_{tag}", "conv1d", (2, 6, 40), (8, 6, 5), dt, padding=2)
        fwd(f"conv1d_reflect_s2_{tag}", "conv1d", (2, 6, 33), (8, 6, 3), dt, stride=2, padding=1,
            padding_mode="reflect")
        fwd(f"conv2d_stem_{tag}", "conv2d", (1, 3, 20, 20), (16, 3, 3, 3), dt, padding=1)
        fwd(f"conv2d_gemm_s2_{tag}", "conv2d", (2, 16, 15, 15), (24, 16, 3, 3), dt, stride=2, padding=1)
        fwd(f"conv2d_winograd_{tag}", "conv2d", (2, 32, 24, 24), (32, 32, 3, 3), dt, padding=1)
        fwd(f"conv2d_winograd_small_{tag}", "conv2d", (1, 16, 10, 10), (16, 16, 3, 3), dt, padding=1)
        fwd(f"conv2d_dilated_{tag}", "conv2d", (1, 8, 18, 18), (12, 8, 3, 3), dt, padding=2, dilation=2)
        fwd(f"conv2d_grouped_{tag}", "conv2d", (2, 16, 12, 12), (24, 4, 3, 3), dt, padding=1, groups=4)
        fwd(f"conv2d_depthwise_{tag}", "conv2d", (2, 32, 12, 12), (32, 1, 3, 3), dt, padding=1, groups=32)
        fwd(f"conv2d_depthwise_s2_{tag}", "conv2d", (1, 48, 13, 13), (48, 1, 3, 3), dt, stride=2, padding=1,
            groups=48)
        fwd(f"conv2d_depthwise_few_{tag}", "conv2d", (1, 4, 30, 30), (4, 1, 5, 5), dt, padding=2, groups=4)
        fwd(f"conv2d_multiplier_{tag}", "conv2d", (1, 8, 11, 11), (16, 1, 3, 3), dt, padding=1, groups=8)
        fwd(f"conv2d_1x1_{tag}", "conv2d", (1, 32, 10, 10), (16, 32, 1, 1), dt)
        fwd(f"conv2d_1x1_large_w_{tag}", "conv2d", (1, 512, 3, 3), (1024, 512, 1, 1), dt)
        fwd(f"conv2d_3x3_large_w_{tag}", "conv2d", (2, 256, 4, 4), (512, 256, 3, 3), dt, padding=1)
        fwd(f"conv2d_same_s2_{tag}", "conv2d", (1, 5, 17, 16), (7, 5, 4, 3), dt, stride=2, padding="same")
        fwd(f"conv2d_circular_{tag}", "conv2d", (1, 6, 9, 11), (5, 6, 3, 3), dt, padding=1,
            padding_mode="circular")
        fwd(f"conv2d_replicate_{tag}", "conv2d", (1, 6, 9, 11), (5, 6, 3, 5), dt, padding=(1, 2),
            padding_mode="replicate", bias=False)
        fwd(f"conv2d_channels_last_{tag}", "conv2d", (1, 9, 9, 6), (8, 6, 3, 3), dt, padding=1,
            data_format="channels_last")
        fwd(f"conv2d_batch_small_{tag}", "conv2d", (8, 16, 7, 7), (24, 16, 3, 3), dt, padding=1)
        fwd(f"conv3d_{tag}", "conv3d", (1, 4, 8, 9, 10), (6, 4, 3, 3, 3), dt, padding=1)
        fwd(f"conv3d_s2_{tag}", "conv3d", (1, 8, 9, 9, 9), (8, 8, 3, 3, 3), dt, stride=2, padding=1)
        fwd(f"conv3d_winograd_{tag}", "conv3d", (1, 16, 12, 12, 12), (32, 16, 3, 3, 3), dt, padding=1)
        fwd(f"conv_transpose1d_{tag}", "conv_transpose1d", (2, 6, 20), (6, 4, 4), dt, stride=2, padding=1)
        fwd(f"conv_transpose1d_s1_{tag}", "conv_transpose1d", (1, 32, 50), (32, 32, 3), dt, padding=1)
        fwd(f"conv1d_s1_{tag}", "conv1d", (1, 32, 50), (32, 32, 3), dt, padding=1)
        fwd(f"conv_transpose2d_{tag}", "conv_transpose2d", (1, 8, 9, 9), (8, 6, 3, 3), dt, stride=2, padding=1,
            output_padding=1)
        fwd(f"conv_transpose2d_k2s2_{tag}", "conv_transpose2d", (1, 16, 12, 12), (16, 8, 2, 2), dt, stride=2)
        fwd(f"conv_transpose2d_small_{tag}", "conv_transpose2d", (1, 64, 2, 2), (64, 32, 4, 4), dt, stride=2,
            padding=1)
        fwd(f"conv_transpose2d_grouped_{tag}", "conv_transpose2d", (1, 8, 7, 7), (8, 3, 3, 3), dt, stride=2,
            groups=2, dilation=2)
        fwd(f"conv_transpose2d_s1_{tag}", "conv_transpose2d", (1, 16, 6, 6), (16, 16, 3, 3), dt, padding=1)
        fwd(f"conv_transpose2d_gap_{tag}", "conv_transpose2d", (1, 4, 5, 5), (4, 4, 1, 1), dt, stride=3)
        fwd(f"conv_transpose3d_{tag}", "conv_transpose3d", (1, 8, 4, 4, 4), (8, 4, 2, 2, 2), dt, stride=2)

        def nonfinite(dt=dt):
            x = data(1, (1, 6, 5, 5), dt)
            w = data(2, (6, 4, 3, 3), dt)
            w[1, 2, 1, 1] = np.inf
            w[3, 0, 0, 2] = np.nan
            return [cf.conv_transpose2d(x, w, None, stride=2, padding=1)]
        out.append((f"conv_transpose2d_nonfinite_{tag}", nonfinite))

        def bwd(name, fn, x_shape, w_shape, dt=dt, **kw):
            def run():
                x = data(4, x_shape, dt)
                w = data(5, w_shape, dt)
                y = getattr(cf, fn.replace("_backward", ""))(x, w, None, **kw)
                gy = data(6, y.shape, dt)
                gx = getattr(cf, fn)(gy, x, w, None, **kw, needs=(True, False, False)).grad_input
                algo = _core.last_algorithm().split(" threads=")[0]
                gw = getattr(cf, fn)(gy, x, w, None, **kw, needs=(False, True, False)).grad_weight
                return [gx, gw], algo + "; " + _core.last_algorithm().split(" threads=")[0]
            out.append((name, run))

        bwd(f"conv2d_backward_{tag}", "conv2d_backward", (2, 16, 12, 12), (24, 16, 3, 3), padding=1)
        bwd(f"conv2d_backward_winograd_{tag}", "conv2d_backward", (2, 64, 12, 12), (64, 64, 3, 3), padding=1)
        bwd(f"conv2d_backward_stem_{tag}", "conv2d_backward", (2, 3, 16, 16), (16, 3, 3, 3), padding=1, stride=2)
        bwd(f"conv2d_backward_rows_{tag}", "conv2d_backward", (2, 3, 20, 20), (16, 3, 3, 3), padding=1)
        bwd(f"conv2d_backward_depthwise_{tag}", "conv2d_backward", (2, 32, 10, 10), (32, 1, 3, 3), padding=1,
            groups=32)
        bwd(f"conv2d_backward_multiplier_{tag}", "conv2d_backward", (2, 8, 10, 10), (16, 1, 3, 3), padding=1,
            groups=8)
        bwd(f"conv2d_backward_1x1_{tag}", "conv2d_backward", (2, 16, 12, 12), (48, 16, 1, 1))
        bwd(f"conv2d_backward_1x1_s2_{tag}", "conv2d_backward", (2, 16, 10, 10), (32, 16, 1, 1), stride=2)
        bwd(f"conv2d_backward_reflect_{tag}", "conv2d_backward", (1, 6, 9, 9), (6, 6, 3, 3), padding=1,
            padding_mode="reflect", dilation=2)
        bwd(f"conv1d_backward_{tag}", "conv1d_backward", (2, 5, 30), (7, 5, 4), stride=2, padding=1)
        bwd(f"conv3d_backward_{tag}", "conv3d_backward", (1, 32, 6, 6, 6), (32, 32, 3, 3, 3), padding=1)
        bwd(f"conv_transpose2d_backward_{tag}", "conv_transpose2d_backward", (1, 8, 6, 6), (8, 6, 4, 4),
            stride=2, padding=1)

        def layer(dt=dt, tag=tag):
            results = []
            for cls, args, kw, x_shape in (
                    (cf.Conv2d, (16, 32, 3), dict(padding=1), (2, 16, 14, 14)),
                    (cf.Conv2d, (32, 32, 3), dict(padding=1, groups=32), (1, 32, 9, 9)),
                    (cf.ConvTranspose2d, (16, 8, 4), dict(stride=2, padding=1), (1, 16, 5, 5)),
                    (cf.Conv2d, (512, 512, 3), dict(padding=1), (8, 512, 4, 4)),  # kept: Winograd on few tiles
                    (cf.Conv2d, (512, 1024, 1), {}, (1, 512, 3, 3))):  # kept: weights packed, not in place
                m = cls(*args, **kw, dtype=dt, seed=7)
                x = data(8, x_shape, dt)
                results += [m(x), m(x)]
            return results
        out.append((f"layers_{tag}", layer))
    return out


def _digest(arrays):
    import numpy as np
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def child():
    """Runs every problem in this process's setting: prints {isa, results: {name: [sha, algorithm]}}."""
    import convfast as cf
    from convfast import _core
    cf.set_num_threads(2)
    results = {}
    for name, thunk in _problems():
        arrays = thunk()
        algo = _core.last_algorithm().split(" threads=")[0]
        if isinstance(arrays, tuple):
            arrays, algo = arrays
        results[name] = [_digest(arrays), algo]
    print(json.dumps({"isa": cf.get_isa(), "results": results}))


def run_setting(isa, setting):
    """{name: [sha, algorithm]} for one ISA and setting, computed in a child process (None: the
    requested ISA cannot run here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVFAST_")}
    env.update(SETTINGS[setting])
    env["CONVFAST_ISA"] = isa
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, capture_output=True,
                          text=True, check=True)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["results"] if data["isa"] == isa else None


def main(argv):
    import convfast as cf
    path = DEFAULT_PATH
    if "--child" in argv:
        return child()
    check = "--check" in argv
    recorded = json.load(open(path)) if check else {}
    computed, failures = {}, []
    for isa in cf.supported_isas():
        if check and isa not in recorded:
            continue
        computed[isa] = {}
        for setting in SETTINGS:
            results = run_setting(isa, setting)
            if results is None:
                continue
            computed[isa][setting] = results
            if check:
                for name, value in recorded[isa][setting].items():
                    if results.get(name) != value:
                        failures.append(f"{isa} {setting} {name}: {value} -> {results.get(name)}")
    if check:
        print("\n".join(failures) or "all results bitwise identical")
        return 1 if failures else 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(computed, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}: {sum(len(s) for s in computed.values())} settings")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
