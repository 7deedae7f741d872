#!/usr/bin/env python3
"""Compile every convfast GPU kernel variant for sm_80 and sm_90a WITHOUT a GPU or driver, and
report what the compiled code looks like.

Toolchain: Numba's CUDA target lowers each kernel to PTX through libNVVM (from the nvidia-nvvm
wheel, or a CUDA toolkit); ptxas (nvidia-cuda-nvcc wheel) compiles the PTX to SASS with -v
(registers, shared memory, stack / spills); nvdisasm (nvidia-cuda-nvdisasm wheel) disassembles it.
``pip install ".[cuda-check]"`` installs the pinned versions. No system toolkit, no driver.

For each variant (convfast.cuda._variants: every factory specialisation the engine launches, with
its launch signature) the report gives registers per thread, static shared memory, local memory
(stack frame and spills), the number of blocks per SM that the registers allow, and for the kernels
with a reduction loop the instruction mix of the *hot loop* in the SASS:

* "tile" kernels (the GEMMs): the innermost loop (backward branch) that contains both a barrier
  (BAR.SYNC) and fused multiply-adds: one K tile (two for the forward GEMM, whose K loop is
  unrolled by two tiles);
* "inner" kernels: the innermost loop holding the most FMAs.

Counts are static (each instruction of the loop once): a loop nested inside the hot loop is
reported in the ``nested`` column, its body counted once (a not-unrolled inner loop therefore shows
as a low FMA share). FMA = FFMA or DFMA.

Fails (exit 1) on: a compile error; any local-memory instruction (LDL/STL) inside a hot loop; a
hot loop whose FMA share is below the variant's floor; more than 128 registers for a 256-thread
kernel (two blocks per SM need 2 x 256 x 128 = 65536 registers, the register file of an SM),
except where the variant lists a larger budget (the forward "large" tile). The floors are per
variant (convfast.cuda._variants.FLOORS: forward and weight-gradient GEMMs, per tile and padding
mode). The table's "blocks/SM" column shows what every variant gets.

Usage: python scripts/cuda_sass_check.py [--ci] [--report FILE] [--update-doc docs/gpu.md] [--jobs N]
       [--only SUBSTRING] [--keep DIR]
(--ci: the subset CI compiles; without it, every variant: about 35 minutes on 2 cores.)
"""
from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ARCHS = ("sm_80", "sm_90a")
PTX_CC = (8, 0)   # one PTX per variant (NVVM is the slow step); ptxas compiles it for each arch
REG_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90)
MAX_REGS_256 = 128
DOC_BEGIN = "<!-- cuda-sass-check:begin -->"
DOC_END = "<!-- cuda-sass-check:end -->"


# ----------------------------------------------------------------------------------------------
# Toolchain discovery (pip wheels first, then CUDA_HOME / CUDA_PATH, then PATH)
# ----------------------------------------------------------------------------------------------

def _wheel_roots():
    roots = []
    for entry in sys.path:
        for sub in ("cu13", "cu12"):
            root = os.path.join(entry, "nvidia", sub)
            if os.path.isdir(root):
                roots.append(root)
        for pkg in ("cuda_nvcc", "cuda_nvdisasm"):  # CUDA 12 wheel layout
            root = os.path.join(entry, "nvidia", pkg)
            if os.path.isdir(root):
                roots.append(root)
    return roots


def find_tool(name: str) -> str:
    candidates = [os.path.join(r, "bin", name) for r in _wheel_roots()]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", name))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (pip install '.[cuda-check]' installs it)")


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# Compilation (in worker processes: Numba's compiler is not re-entrant across threads)
# ----------------------------------------------------------------------------------------------

def _init_worker():
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    import numba.cuda.dispatcher as dispatcher

    class _Device:  # device functions ask the current device for its compute capability
        compute_capability = PTX_CC

    dispatcher.get_current_device = lambda: _Device()


def _load_variants(spec, ci=False):
    if spec:
        import importlib.util
        s = importlib.util.spec_from_file_location("_variants_override", spec)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
        return module.all_variants()
    from convfast.cuda import _variants
    found = _variants.all_variants()
    return [v for v in found if _variants.in_ci_set(v.name)] if ci else found


def _compile_one(job):
    index, variants_spec, ci, workdir, ptxas, nvdisasm = job
    from numba import cuda
    v = _load_variants(variants_spec, ci)[index]
    result = {"name": v.name, "hot": v.hot, "floor": v.floor, "threads": v.threads,
              "local_ok": getattr(v, "local_ok", False), "max_regs": getattr(v, "max_regs", MAX_REGS_256),
              "archs": {}}
    t0 = time.time()
    try:
        dispatcher = v.factory()
        ptx, _ = cuda.compile_ptx(dispatcher.py_func, v.signature, cc=PTX_CC,
                                  launch_bounds=getattr(dispatcher, "convfast_launch_bounds", None))
    except Exception as exc:
        result["error"] = f"NVVM/Numba: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return result
    result["nvvm_s"] = time.time() - t0
    stem = os.path.join(workdir, f"k{index:03d}")
    with open(stem + ".ptx", "w") as f:
        f.write(ptx)
    for arch in ARCHS:
        cubin = f"{stem}.{arch}.cubin"
        proc = subprocess.run([ptxas, f"-arch={arch}", "-O3", "-v", stem + ".ptx", "-o", cubin],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            result["error"] = f"ptxas {arch}: {proc.stderr.strip()[-500:]}"
            return result
        info = parse_ptxas(proc.stderr)
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
        if sass.returncode != 0:
            result["error"] = f"nvdisasm {arch}: {sass.stderr.strip()[-500:]}"
            return result
        with open(f"{stem}.{arch}.sass", "w") as f:
            f.write(sass.stdout)
        info.update(hot_loop(sass.stdout, v.hot))
        result["archs"][arch] = info
    return result


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

def parse_ptxas(text: str) -> dict:
    def num(pattern, default=0):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else default
    return {"regs": num(r"Used (\d+) registers"), "smem": num(r"(\d+) bytes smem"),
            "stack": num(r"(\d+) bytes stack frame"), "spill_st": num(r"(\d+) bytes spill stores"),
            "spill_ld": num(r"(\d+) bytes spill loads")}


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.A-Z0-9_]*)\s*(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
FMA_OPS = ("FFMA", "DFMA")


def parse_sass(text: str):
    """[(address, opcode, modifiers, operands)], {label: address} of the first function."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3), m.group(4)))
    return instrs, labels


def loops(instrs, labels):
    """[(start, end)] address spans of the backward branches (end = the branch's address)."""
    spans = set()
    for addr, op, _, operands in instrs:
        if op in ("BRA", "JMP", "BRX"):
            m = _TARGET.search(operands)
            if m and m.group(1) in labels and labels[m.group(1)] < addr:
                spans.add((labels[m.group(1)], addr))
    return sorted(spans, key=lambda s: s[1] - s[0])


def hot_loop(sass: str, kind) -> dict:
    instrs, labels = parse_sass(sass)
    info = {"instructions": len(instrs)}
    if not kind:
        return info
    spans = loops(instrs, labels)

    def body(span):
        return [i for i in instrs if span[0] <= i[0] <= span[1]]

    chosen = None
    if kind == "tile":
        for span in spans:  # innermost first
            ops = [i[1] for i in body(span)]
            if "BAR" in ops and any(o in FMA_OPS for o in ops):
                chosen = span
                break
    else:
        best = 0
        for span in spans:
            fma = sum(i[1] in FMA_OPS for i in body(span))
            if fma > best:
                best, chosen = fma, span
    if chosen is None:
        info["hot_error"] = "no hot loop found"
        return info
    b = body(chosen)
    ops = [i[1] for i in b]
    lds = [i for i in b if i[1] == "LDS"]
    info.update({
        "loop_instr": len(b),
        "fma": sum(o in FMA_OPS for o in ops),
        "lds": len(lds),
        "lds_vec": sum(".64" in i[2] or ".128" in i[2] for i in lds),
        "ldg": sum(o in ("LDG", "LD") for o in ops),
        "local": sum(o in ("LDL", "STL") for o in ops),
        "calls": sum(o.startswith("CALL") for o in ops),
        "nested": sum(1 for s in spans if s != chosen and chosen[0] <= s[0] and s[1] <= chosen[1]),
    })
    info["share"] = info["fma"] / max(1, info["loop_instr"])
    return info


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def blocks_per_sm(regs: int, threads: int) -> int:
    per_thread = max(regs, 1)
    per_warp = -(-per_thread * 32 // 256) * 256  # allocation granularity: 256 registers per warp
    warps = -(-threads // 32)
    return max(0, REG_FILE // (per_warp * warps))


def failures(result) -> list:
    out = []
    if "error" in result:
        return [result["error"]]
    for arch, info in result["archs"].items():
        if result["threads"] == 256 and info["regs"] > result["max_regs"]:
            out.append(f"{arch}: {info['regs']} registers > {result['max_regs']} (fewer than 2 blocks per SM)")
        if result["hot"]:
            if "hot_error" in info:
                out.append(f"{arch}: {info['hot_error']}")
                continue
            if info["local"] and not result["local_ok"]:
                out.append(f"{arch}: {info['local']} local-memory instructions in the hot loop")
            if info["share"] < result["floor"]:
                out.append(f"{arch}: FMA share {info['share']:.0%} < floor {result['floor']:.0%}")
    return out


def table(results) -> str:
    head = ("| kernel | arch | regs | blocks/SM | smem B | stack/spill B | hot loop: instr | FMA | share | floor "
            "| LDS (vector) | LDG | local | nested loops | calls |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | - | compile error: {r['error'][:80]} |")
            continue
        for arch, i in r["archs"].items():
            spill = f"{i['stack']}/{i['spill_st'] + i['spill_ld']}"
            if r["hot"] and "share" in i:
                hot = (f"{i['loop_instr']} | {i['fma']} | {i['share']:.0%} | {r['floor']:.0%} | {i['lds']} ({i['lds_vec']}) "
                       f"| {i['ldg']} | {i['local']} | {i['nested']} | {i['calls']}")
            else:
                hot = "- | - | - | - | - | - | - | - | -"
            lines.append(f"| {r['name']} | {arch} | {i['regs']} | {blocks_per_sm(i['regs'], r['threads'])} | "
                         f"{i['smem']} | {spill} | {hot} |")
    return "\n".join(lines)


def update_doc(path: str, text: str) -> None:
    with open(path) as f:
        doc = f.read()
    if DOC_BEGIN not in doc or DOC_END not in doc:
        raise SystemExit(f"{path}: markers {DOC_BEGIN} / {DOC_END} not found")
    head, rest = doc.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    with open(path, "w") as f:
        f.write(head + DOC_BEGIN + "\n" + text.rstrip() + "\n" + DOC_END + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", help="write the Markdown report here")
    ap.add_argument("--update-doc", help="replace the report section of this Markdown file")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", default="", help="only variants whose name contains this")
    ap.add_argument("--ci", action="store_true", help="the CI subset (convfast.cuda._variants.in_ci_set)")
    ap.add_argument("--keep", help="keep the PTX / cubin / SASS files in this folder")
    ap.add_argument("--variants", help=argparse.SUPPRESS)  # a file defining all_variants() (comparisons)
    args = ap.parse_args(argv)

    ptxas, nvdisasm = find_tool("ptxas"), find_tool("nvdisasm")
    variants = _load_variants(args.variants, args.ci)
    indices = [i for i, v in enumerate(variants) if args.only in v.name]
    workdir = args.keep or tempfile.mkdtemp(prefix="cuda-sass-")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    jobs = [(i, args.variants, args.ci, workdir, ptxas, nvdisasm) for i in indices]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_init_worker) as pool:
        results = pool.map(_compile_one, jobs, chunksize=1)
    elapsed = time.time() - t0
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)

    import numba
    import numba_cuda
    header = (f"{len(results)} kernel variants x {len(ARCHS)} architectures ({', '.join(ARCHS)}); PTX from "
              f"Numba {numba.__version__} / numba-cuda {numba_cuda.__version__} (libNVVM, cc {PTX_CC[0]}.{PTX_CC[1]}), "
              f"ptxas {tool_version(ptxas)}, nvdisasm {tool_version(nvdisasm)}; no GPU, no driver.")
    failed = [(r["name"], f) for r in results for f in failures(r)]
    text = header + "\n\n" + table(results) + "\n"
    if failed:
        text += "\nFailures:\n\n" + "\n".join(f"- {n}: {f}" for n, f in failed) + "\n"
    print(text)
    print(f"({elapsed:.0f} s)", file=sys.stderr)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    if args.update_doc:
        update_doc(args.update_doc, text)
    if failed:
        print(f"FAILED: {len(failed)} check(s)", file=sys.stderr)
        return 1
    print(f"OK: {len(results)} variants compiled for {', '.join(ARCHS)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
