"""``python -m convfast bench``: the layer suite against PyTorch (and NumPy), with a table and a chart.

Importable without asv, matplotlib or PyTorch: PyTorch is used when it is installed (and asked
for), matplotlib only for ``--plot``.

Every case is first checked against PyTorch (or, without it, against convfast.reference for small
cases); then convfast and the comparators are timed interleaved in this process at the same thread
count (median of the rounds after warm-up). The "% peak" column divides convfast's GFLOP/s by the
FMA peak *measured* at the start of the run: one thread runs the active GEMM micro-kernel on
L1-resident panels (``convfast._core.ukernel_peak_gflops``), times the thread count; it follows the
host's clock and ISA. ``--peak`` or ``CONVFAST_PEAK_GFLOPS`` gives a float32 figure instead
(float64 is then taken as half).

``--compare ort`` adds onnxruntime (a one-node ONNX model per case, float32, channels_first, forward);
with both peers the table shows the speedup over the faster one. ``--networks`` times whole networks
instead (``convfast._bench_networks``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import List, Optional, Sequence

import convfast
from . import _bench_suite as suite

def measured_peak(dtype: str, rounds: int = 8, seconds: float = 0.15) -> float:
    """FMA peak in GFLOP/s at the current thread count: one thread's rate of the active micro-kernel on
    L1-resident panels (the best of a few short rounds, as a peak should be: one round catches clock
    ramps and neighbours' bursts) times the threads, as a per-core peak times cores is quoted."""
    one = max(convfast._core.ukernel_peak_gflops(dtype == "float64", seconds) for _ in range(rounds))
    return one * convfast.get_num_threads()


def peak_override(given: Optional[float]) -> Optional[float]:
    """The float32 peak the user gave (--peak, else CONVFAST_PEAK_GFLOPS), or None to measure it."""
    if given is None and os.environ.get("CONVFAST_PEAK_GFLOPS"):
        return float(os.environ["CONVFAST_PEAK_GFLOPS"])
    return given


def peak_gflops(dtype: str, override: Optional[float] = None) -> float:
    """FMA peak in GFLOP/s for dtype at the current thread count (override = the float32 figure)."""
    override = peak_override(override)
    if override is not None:
        return override / 2 if dtype == "float64" else override
    return measured_peak(dtype)


def default_threads() -> int:
    """OMP_NUM_THREADS if set, else every core this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_OPENMP_VERSIONS = {200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0", 201511: "4.5", 201811: "5.0",
                    202011: "5.1", 202111: "5.2", 202411: "6.0"}


def openmp_runtime() -> str:
    """The OpenMP runtime library loaded into this process (Linux: from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.rsplit("/", 1)[-1].strip() for line in f if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return "unknown"
    return ", ".join(sorted(libs)) or "unknown"


class ContentionMeter:
    """How much of the machine other processes (and the hypervisor: steal time) used between
    start() and stop(), as a fraction of all cores: this process's CPU time is subtracted from the
    busy time in /proc/stat. On a shared machine OpenMP threads that find their core taken wait for
    each other, so timings taken under contention say little. None where /proc/stat is missing."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _busy_seconds():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        guest = sum(fields[8:10]) if len(fields) > 9 else 0       # already counted in user/nice
        return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        busy = self._busy_seconds()
        t = os.times()
        self._start = None if busy is None else (busy, t.user + t.system, time.perf_counter())

    def stop(self) -> Optional[float]:
        busy = self._busy_seconds()
        if busy is None or self._start is None:
            return None
        t = os.times()
        busy0, own0, wall0 = self._start
        wall = time.perf_counter() - wall0
        others = (busy - busy0) - (t.user + t.system - own0)
        cores = os.cpu_count() or 1
        return max(0.0, others / (wall * cores)) if wall > 0 else None


def machine_info() -> dict:
    info = dict(convfast.config())
    info["supported_isas"] = list(info.get("supported_isas", ()))
    info.update(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version())
    try:
        import torch
        info["torch"] = torch.__version__
    except Exception:
        info["torch"] = None
    return info


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

CONTENTION_LIMIT = 0.05  # share of the machine used by others above which a row is marked


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_bench(suite_name: str = "small", dtypes: Sequence[str] = ("float32",), threads: Optional[int] = None,
              compare: Sequence[str] = ("torch",), layout: str = "channels_first", budget_s: float = 2.0,
              peak: Optional[float] = None, progress=_progress, pass_: str = "forward") -> dict:
    """Runs the suite and returns a JSON-serialisable report (see ``format_table``). ``pass_`` is
    "forward" (the convolution) or "backward" (grad_input + grad_weight, against PyTorch's
    convolution_backward with the same output_mask)."""
    if pass_ not in suite.PASSES:
        raise ValueError(f"pass_ must be one of {suite.PASSES}, got {pass_!r}")
    cases = suite.get_suite(suite_name)
    threads = threads or default_threads()
    compare = [c for c in compare if c]
    notes = []
    if pass_ == "backward" and "numpy" in compare:
        compare = [c for c in compare if c != "numpy"]
        notes.append("the NumPy reference has no backward pass: --compare numpy ignored for --pass backward")
    if "torch" in compare and not suite.torch_available():
        compare = [c for c in compare if c != "torch"]
        notes.append("PyTorch is not importable: no comparison with it (pip install torch)")
    if "ort" in compare:
        if not suite.ort_available():
            compare = [c for c in compare if c != "ort"]
            notes.append("onnxruntime is not importable: no comparison with it (pip install onnxruntime)")
        elif pass_ == "backward":
            compare = [c for c in compare if c != "ort"]
            notes.append("onnxruntime has no convolution backward: --compare ort ignored for --pass backward")
        elif layout != "channels_first":
            compare = [c for c in compare if c != "ort"]
            notes.append("onnxruntime's Conv takes channels_first (NCHW) only: --compare ort ignored for "
                         "--layout channels_last")
        else:
            notes.append("ort = onnxruntime running a one-node ONNX model of the layer (weights as initializers, "
                         "all graph optimisations, the same intra-op thread count, thread-pool spinning off)")
    if "numpy" in compare:
        notes.append("numpy = convfast.reference (pure NumPy, float64 accumulation), timed only for cases of "
                      "at most 2e8 FLOP")
    if "torch" in compare:
        import torch  # noqa: F401  (imported now so that set_threads reaches it)
    previous = convfast.get_num_threads()
    previous_torch = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    suite.set_threads(threads)
    report = {"suite": suite_name, "pass": pass_, "layout": layout, "threads": threads, "compare": list(compare),
              "machine": machine_info(), "peak_source": "measured" if peak_override(peak) is None else "given",
              "peak_gflops": {dt: peak_gflops(dt, override=peak) for dt in dtypes},
              "notes": notes, "results": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    report["load_average_at_start"] = load
    jobs = [(case, dt) for dt in dtypes for case in cases]
    t_start = time.perf_counter()
    meter = ContentionMeter()
    try:
        for i, (case, dt) in enumerate(jobs, 1):
            if progress:
                done = (i - 1) * 20 // len(jobs)
                progress(f"[{'#' * done}{'.' * (20 - done)}] {i:>2}/{len(jobs)} {case.name} {dt} ...")
            meter.start()
            r = suite.compare_case(case, dt, layout, threads=None, against=compare, budget_s=budget_s, pass_=pass_)
            r["others_cpu_share"] = meter.stop()
            r["peak_gflops"] = report["peak_gflops"][dt]
            if "convfast_gflops" in r:
                r["percent_of_peak"] = 100.0 * r["convfast_gflops"] / r["peak_gflops"]
            report["results"].append(r)
            if progress:
                if r["ok"] is False:
                    progress(f"        MISMATCH against {r['checked_against']}: relative error {r['error']:.3g}")
                else:
                    line = f"        convfast {r['convfast_ms']:.2f} ms"
                    if "torch_ms" in r:
                        line += f", torch {r['torch_ms']:.2f} ms, speedup {r['speedup_vs_torch']:.2f}"
                    if r["others_cpu_share"] is not None:
                        line += f"  (others used {r['others_cpu_share']:.0%} of the CPU)"
                    progress(line)
    finally:
        convfast.set_num_threads(previous)
        if previous_torch is not None:
            sys.modules["torch"].set_num_threads(previous_torch)
    busy = [f"{r['case']} {r['dtype']}" for r in report["results"]
            if (r.get("others_cpu_share") or 0) > CONTENTION_LIMIT]
    if busy:
        notes.append(f"* other processes used more than {CONTENTION_LIMIT:.0%} of the CPU while these were timed, "
                     f"so their timings (and ratios) are unreliable; re-run them on a quiet machine: " + ", ".join(busy))
    unchecked = [f"{r['case']} {r['dtype']}" for r in report["results"] if r["checked_against"] is None]
    if unchecked:
        notes.append("not checked (PyTorch not compared, and too large for the NumPy reference): "
                     + ", ".join(unchecked))
    report["seconds"] = time.perf_counter() - t_start
    report["summary"] = summarise(report["results"], dtypes)
    return report


def summarise(results: List[dict], dtypes: Sequence[str]) -> dict:
    summary = {}
    for name in ("torch", "ort", "best", "numpy"):
        key = f"speedup_vs_{name}"
        per_dtype = {}
        for dt in list(dtypes) + ["all"]:
            values = [r[key] for r in results if key in r and (dt == "all" or r["dtype"] == dt)]
            if values:
                per_dtype[dt] = {"geomean": suite.geometric_mean(values), "min": min(values), "count": len(values)}
        if per_dtype:
            summary[key] = per_dtype
    summary["mismatches"] = [f"{r['case']} {r['dtype']}" for r in results if r["ok"] is False]
    return summary


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(report: dict) -> str:
    results = report["results"]
    has_torch = any("torch_ms" in r for r in results)
    has_numpy = any("numpy_ms" in r for r in results) or "numpy" in report["compare"]
    has_ort = "ort" in report["compare"]
    has_best = any("speedup_vs_best" in r for r in results)
    header = ["case", "dtype", "ms convfast"]
    if has_torch:
        header.append("ms torch")
    if has_ort:
        header.append("ms ort")
    if has_numpy:
        header.append("ms numpy")
    header += ["GFLOP/s", "% peak"]
    if has_torch:
        header.append("speedup")
    if has_ort:
        header.append("vs ort")
    if has_best:
        header.append("vs best peer")
    if has_numpy:
        header.append("vs numpy")
    rows = []
    for r in results:
        if r["ok"] is False:
            row = [r["case"], r["dtype"], f"MISMATCH vs {r['checked_against']} (rel. error {r['error']:.2g})"]
            rows.append(row + [""] * (len(header) - len(row)))
            continue
        busy = (r.get("others_cpu_share") or 0) > CONTENTION_LIMIT
        row = [r["case"] + (" *" if busy else ""), r["dtype"], _fmt(r.get("convfast_ms"), ".2f")]
        if has_torch:
            row.append(_fmt(r.get("torch_ms"), ".2f"))
        if has_ort:
            row.append(_fmt(r.get("ort_ms"), ".2f") if "ort_ms" in r else "skip")
        if has_numpy:
            row.append(_fmt(r.get("numpy_ms"), ".1f") if "numpy_ms" in r else "skip")
        row += [_fmt(r.get("convfast_gflops"), ".1f"), _fmt(r.get("percent_of_peak"), ".0f")]
        if has_torch:
            row.append(_fmt(r.get("speedup_vs_torch"), ".2f"))
        if has_ort:
            row.append(_fmt(r.get("speedup_vs_ort"), ".2f"))
        if has_best:
            row.append(f"{r['speedup_vs_best']:.2f} ({r['best_peer']})" if "speedup_vs_best" in r else "-")
        if has_numpy:
            row.append(_fmt(r.get("speedup_vs_numpy"), ".1f"))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    left = {0, 1}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append("")
    m = report["machine"]
    peaks = ", ".join(f"{dt} {p:.0f}" for dt, p in report["peak_gflops"].items())
    with_torch = "torch" in report["compare"]
    if report.get("pass", "forward") == "backward":
        out.append(f"pass: backward = grad_input + grad_weight (output_mask {list(suite.BACKWARD_MASK)}); "
                   f"torch = torch.ops.aten.convolution_backward; GFLOP/s counts 2x the forward's FLOPs")
    out.append(f"machine: {m['cpu']} ({m['cores']} logical cores), ISA {m['isa']}, {report['threads']} threads"
               + (" for convfast and torch alike" if with_torch else "") + f", layout {report['layout']}, "
               f"convfast {m['version']}" + (f", torch {m['torch']}" if with_torch else ""))
    out.append(f"peak {report['peak_source']}: {peaks} GFLOP/s "
               + ("(one thread's GEMM micro-kernel on L1-resident panels x threads, at the start; --peak to override)"
                  if report["peak_source"] == "measured" else ""))
    for key, label in (("speedup_vs_torch", "torch_ms / convfast_ms"), ("speedup_vs_ort", "ort_ms / convfast_ms"),
                       ("speedup_vs_best", "min(torch_ms, ort_ms) / convfast_ms"),
                       ("speedup_vs_numpy", "numpy_ms / convfast_ms")):
        if key in report["summary"]:
            parts = [f"{dt} {v['geomean']:.2f} (min {v['min']:.2f}, {v['count']} cases)"
                     for dt, v in report["summary"][key].items() if dt != "all" or len(report["summary"][key]) > 2]
            out.append(f"geometric-mean speedup ({label}): " + "; ".join(parts))
    if report["summary"]["mismatches"]:
        out.append("MISMATCHES (not timed): " + ", ".join(report["summary"]["mismatches"]))
    for note in report["notes"]:
        out.append(f"note: {note}")
    skipped = {}
    for r in results:
        if "ort_skipped" in r:
            skipped.setdefault(r["ort_skipped"], []).append(f"{r['case']} {r['dtype']}")
    for reason, cases in skipped.items():
        out.append(f"note: ort not timed ({reason}): " + ", ".join(cases))
    return "\n".join(out)


def write_plot(report: dict, path: str) -> Optional[str]:
    """A PNG bar chart of the speedups over PyTorch (or NumPy); returns an error message or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib is not importable: no chart written (pip install matplotlib)"
    key = next((k for k in ("speedup_vs_torch", "speedup_vs_numpy") if any(k in r for r in report["results"])), None)
    if key is None:
        return "nothing to plot: no comparison was timed"
    rows = [r for r in report["results"] if key in r]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    height = 0.8 / len(dtypes)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(cases) * len(dtypes) + 1.8))
    for j, dt in enumerate(dtypes):
        values = {r["case"]: r[key] for r in rows if r["dtype"] == dt}
        ys = [i + j * height for i, c in enumerate(cases) if c in values]
        ax.barh(ys, [values[c] for c in cases if c in values], height=height, label=dt)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + height * (len(dtypes) - 1) / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases, fontsize=8)
    ax.margins(y=0.01)
    ax.invert_yaxis()
    other = key.rsplit("_", 1)[1]
    ax.set_xlabel(f"speedup of convfast over {other} (higher is better)")
    m = report["machine"]
    ax.set_title(f"convfast {m['version']} vs {other}: {m['cpu']}, {report['threads']} threads, {report['layout']}",
                 fontsize=9)
    for patch in ax.patches:
        ax.annotate(f"{patch.get_width():.2f}", (patch.get_width(), patch.get_y() + patch.get_height() / 2),
                    xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="small",
                        help="'small' (default, about a minute), 'full', or comma-separated case names (see --list)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "both"])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for convfast and torch alike (default: OMP_NUM_THREADS, else all cores)")
    parser.add_argument("--compare", default=None,
                        help="comma-separated: torch, ort (onnxruntime), numpy, or none (default: torch and ort, "
                             "those importable)")
    parser.add_argument("--layout", default="channels_first", choices=list(suite.LAYOUTS))
    parser.add_argument("--json", metavar="FILE", help="write the full report (machine, timings, samples) as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speedups (needs matplotlib)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed rounds per case and dtype, all libraries together (default 2)")
    parser.add_argument("--peak", type=float, default=None,
                        help="float32 FMA peak in GFLOP/s at this thread count (default: measured at the start)")
    parser.add_argument("--pass", dest="pass_", default="forward", choices=list(suite.PASSES),
                        help="forward (default) or backward: grad_input + grad_weight against PyTorch's "
                             "convolution_backward with the same output_mask")
    parser.add_argument("--list", action="store_true", help="list the cases and suites, then exit")
    parser.add_argument("--networks", nargs="?", const="all", default=None, metavar="NAMES",
                        help="time whole networks (torch.nn models with every convolution swapped for "
                             "convfast.torch) against the unmodified models instead of the layer suite: all, or "
                             "comma-separated names (see --list --networks); uses --threads, --dtype, --batch, "
                             "--quick, --budget (seconds per mode), --json")
    parser.add_argument("--batch", type=int, default=8,
                        help="--networks: batch size of the batched forward and of the training step (default 8)")
    parser.add_argument("--quick", action="store_true",
                        help="--networks: 0.5 s and at least 2 rounds per mode, one instrumented run")


def short_spin_for_mixed_runtimes() -> Optional[str]:
    """Whole networks run PyTorch's OpenMP runtime and convfast's in one process, op after op. With
    libgomp's default wait (300000 spins), PyTorch's worker threads keep spinning after each of its
    ops on the cores convfast's threads need next, and the reverse (ResNet-18 at batch 8 on 2 cores:
    the 7x7 stem took 16 ms inside the network against 5.7 ms alone). The wait policy is read when a
    runtime loads, so GOMP_SPINCOUNT=1000 (libgomp's own value for oversubscribed cores) is set
    here, before PyTorch is imported, unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY. Returns
    the setting in force, for the report."""
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        if key in os.environ:
            return f"{key}={os.environ[key]} (set by the user)"
    if "torch" in sys.modules:
        return None  # too late: PyTorch's runtime has read its environment
    os.environ["GOMP_SPINCOUNT"] = "1000"
    return "GOMP_SPINCOUNT=1000 for both runtimes (set by the benchmark, see README: Troubleshooting)"


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"report written to {path}")


def main_networks(args: argparse.Namespace) -> int:
    """``python -m convfast bench --networks``."""
    spin = short_spin_for_mixed_runtimes()
    from . import _bench_networks as networks
    if args.list:
        for net in networks.get_networks():
            print(f"{net.name:<16} {net.title:<20} {net.note}")
        return 0
    if not suite.torch_available():
        print("convfast bench: --networks needs PyTorch (pip install torch)", file=sys.stderr)
        return 2
    try:
        networks.get_networks(args.networks)
    except ValueError as exc:
        print(f"convfast bench: {exc}", file=sys.stderr)
        return 2
    if (args.threads is not None and args.threads < 1) or args.batch < 1:
        print("convfast bench: --threads and --batch must be >= 1", file=sys.stderr)
        return 2
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    budget = None if args.quick else args.budget
    # onnxruntime joins the forward modes unless --compare leaves it out (PyTorch is always timed:
    # the networks are torch models).
    wanted = None if args.compare is None else [c.strip().lower() for c in args.compare.split(",")]
    peers = ("ort",) if wanted is None or "ort" in wanted or "onnxruntime" in wanted else ()
    report = networks.run_networks(args.networks, dtypes, args.threads, args.batch, args.quick, budget,
                                   progress=_progress, peers=peers)
    report["openmp_wait"] = spin
    print(networks.format_report(report))
    print(f"openmp wait: {spin or 'libgomp defaults (PyTorch was imported before the benchmark set GOMP_SPINCOUNT)'}")
    if args.json:
        write_json(report, args.json)
    return 1 if report["summary"]["mismatches"] else 0


def main(args: argparse.Namespace) -> int:
    if getattr(args, "networks", None) is not None:
        return main_networks(args)
    if args.list:
        for case in suite.get_suite("full"):
            tags = [s for s, names in suite.SUITES.items() if case.name in names]
            print(f"{case.name:<28} {case.describe():<60} {suite.flops(case) / 1e9:6.2f} GFLOP  "
                  f"[{', '.join(tags)}]  {case.note}")
        return 0
    try:
        suite.get_suite(args.suite)
    except ValueError as exc:
        print(f"convfast bench: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("convfast bench: --threads must be >= 1", file=sys.stderr)
        return 2
    if args.compare is None:
        peers = (("torch", suite.torch_available(), "PyTorch"), ("ort", suite.ort_available(), "onnxruntime"))
        compare = [name for name, there, _ in peers if there]
        missing = [label for _, there, label in peers if not there]
        if missing:  # said first, so that a table without a peer's column is not a surprise
            print(f"convfast bench: not comparing with {' or '.join(missing)} (not installed); "
                  f'pip install ".[bench]" (or: pip install torch onnxruntime) adds the comparison', file=sys.stderr)
    else:
        compare = [c.strip().lower() for c in args.compare.split(",") if c.strip() and c.strip().lower() != "none"]
        compare = ["ort" if c == "onnxruntime" else c for c in compare]
        bad = [c for c in compare if c not in ("torch", "ort", "numpy")]
        if bad:
            print(f"convfast bench: --compare takes torch, ort (onnxruntime), numpy or none, got {', '.join(bad)}",
                  file=sys.stderr)
            return 2
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    report = run_bench(args.suite, dtypes, args.threads, compare, args.layout, args.budget, args.peak,
                       pass_=getattr(args, "pass_", "forward"))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        problem = write_plot(report, args.plot)
        print(problem if problem else f"chart written to {args.plot}")
    return 1 if report["summary"]["mismatches"] else 0


def info() -> int:
    """``python -m convfast info``."""
    cfg = machine_info()
    rows = [
        ("convfast", cfg["version"]),
        ("isa (active)", cfg["isa"]),
        ("isa (supported)", ", ".join(cfg["supported_isas"])),
        ("micro-kernel tiles", ", ".join(f"{k} {v}" for k, v in cfg["ukernel_tiles"].items()) + " (MR x NR)"),
        ("threads", f"{cfg['threads']} (convfast.set_num_threads / OMP_NUM_THREADS)"),
        ("OpenMP", f"{_OPENMP_VERSIONS.get(cfg['openmp'], '?')} (_OPENMP {cfg['openmp']}), runtime {openmp_runtime()}"),
        ("algorithm", cfg.get("algorithm", "")),
        ("CUDA", cfg["cuda"]),
        ("CPU", f"{cfg['cpu']} ({cfg['cores']} logical cores)"),
        ("numpy", cfg["numpy"]),
        ("torch", cfg["torch"] or "not installed (only needed for the benchmark comparison)"),
        ("python", f"{cfg['python']} on {cfg['platform']}"),
        ("CONVFAST_ISA", os.environ.get("CONVFAST_ISA", "(unset: best supported)")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}: {value}")
    return 0
