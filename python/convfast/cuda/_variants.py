"""Every kernel variant the GPU engine can launch, with the Numba signature of its launches: the
list that scripts/cuda_sass_check.py compiles for sm_80 and sm_90a (no GPU or driver needed).

Each entry is one kernel factory call (the compile-time specialisations: compute dtype, tile,
memory-order flags, padding mode) with the argument types the launch sites in _engine.py and
_backward.py pass when the input already has the compute dtype (another input dtype only changes
the cast on load). ``hot`` names the loop the check reads (see the script): "tile" for the
barrier-separated K-tile loop of a GEMM, "inner" for the innermost loop with the most fused
multiply-adds, None for kernels without a reduction loop. ``floor`` is the FMA share below which
the check fails. Importing this module imports numba (types only; nothing is compiled).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from numba import types as T

from . import _backward_kernels as _bk
from . import _kernels as _k
from ._kernels import CIRCULAR, REFLECT, REPLICATE, SYMMETRIC, ZEROS
from ._plan import TILES

A = T.Array
I32, I64 = T.int32, T.int64
DTYPES = {"float32": T.float32, "float64": T.float64}
MODES = {"zeros": ZEROS, "reflect": REFLECT, "replicate": REPLICATE, "circular": CIRCULAR, "symmetric": SYMMETRIC}

# The FMA-share floors the check enforces (fraction of the hot loop's SASS instructions that are
# FFMA/DFMA). They guard what the kernels reach now (measured minimum over sm_80 / sm_90a, rounded
# down); the targets are 60 % (forward GEMM) and 40 % (weight gradient), see docs/gpu.md. The
# forward GEMM's keys: "gemm_f32*" float32 channels-first with zeros padding per tile, "gemm" and
# "gemm_narrow" the other layouts and float64 with zeros padding, "gemm_mode" / "gemm_narrow_mode"
# the other padding modes; "_i64" the 64-bit-offset variants (inputs of 2**31 elements or more).
# The weight-gradient GEMM's wide tile meets its target in zeros mode (45-49 %); its narrow tile and
# the small (depthwise) kernel do not yet, and the direct kernel has not been rewritten: they are
# held to what they reach. Every hot loop is held to no local memory.
FLOORS = {"gemm_f32": 0.61, "gemm_f32_large": 0.78, "gemm_f32_narrow": 0.45, "gemm": 0.53, "gemm_narrow": 0.28,
          "gemm_mode": 0.18, "gemm_narrow_mode": 0.06,
          "gemm_f32_i64": 0.52, "gemm_f32_large_i64": 0.73, "gemm_f32_narrow_i64": 0.39, "gemm_i64": 0.29,
          "gemm_narrow_i64": 0.24, "gemm_mode_i64": 0.14, "gemm_narrow_mode_i64": 0.06,
          "wgrad": 0.40, "wgrad_mode": 0.34, "wgrad_narrow": 0.17, "direct": 0.0, "wgrad_small": 0.0}


def gemm_floor(dtype: str, tile: str, k_fast: bool, mode: str, idx32: bool = True) -> float:
    """The FMA-share floor of a forward GEMM variant."""
    if mode != "zeros":
        key = "gemm_narrow_mode" if tile == "narrow" else "gemm_mode"
    elif dtype == "float32" and not k_fast:
        key = {"wide": "gemm_f32", "large": "gemm_f32_large", "narrow": "gemm_f32_narrow"}[tile]
    else:
        key = "gemm_narrow" if tile == "narrow" else "gemm"
    return FLOORS[key if idx32 else key + "_i64"]


@dataclass(frozen=True)
class Variant:
    name: str
    factory: Callable[[], object]   # returns the Numba dispatcher
    signature: Tuple
    hot: Optional[str]              # "tile", "inner" or None
    floor: float = 0.0
    threads: int = 256
    local_ok: bool = False          # local memory in the hot loop is reported, not a failure
    max_regs: int = 128             # registers per thread above which a 256-thread kernel fails


def _a(dt, nd, layout="A"):
    return A(dt, nd, layout)


def forward_variants():
    out = []
    for dtype, tile, k_fast, y_n_fast, mode, split, idx32 in itertools.product(
            DTYPES, TILES, (False, True), (False, True), MODES, (False, True), (True, False)):
        if dtype == "float64" and (tile == "large" or split):
            continue  # never launched: _engine.compute runs float64 "large" as "wide", and never splits float64
        dt = DTYPES[dtype]
        sig = (_a(dt, 1, "C"), _a(dt, 1, "C"), _a(dt, 1), _a(dt, 5), _a(I32, 2, "C"), _a(I32, 2, "C"),
               _a(I32, 1, "C")) + (I64,) * 23 + ((_a(dt, 6, "C"), I64, I64) if split else ())
        # "/i64": the 64-bit-offset variant, for inputs or packed weights of 2**31 elements or more
        name = f"gemm/{dtype}/{tile}/{'cl' if k_fast else 'cf'}-{'cl' if y_n_fast else 'cf'}/{mode}" + \
            ("/split" if split else "") + ("" if idx32 else "/i64")
        floor = gemm_floor(dtype, tile, k_fast, mode, idx32)
        out.append(Variant(name, lambda a=(dtype, tile, k_fast, y_n_fast, MODES[mode], split, idx32):
                           _k.gemm_kernel(*a), sig, "tile", floor, max_regs=255 if tile == "large" else 128))
    for dtype in DTYPES:
        dt = DTYPES[dtype]
        sig = (_a(dt, 5), _a(dt, 3, "C"), _a(dt, 1), _a(dt, 5), _a(I32, 2, "C"), _a(I32, 2, "C")) + (I64,) * 14 + \
            (_a(I32, 1, "C"), I64)
        out.append(Variant(f"direct/{dtype}", lambda d=dtype: _k.direct_kernel(d), sig, "inner", FLOORS["direct"],
                           128))
        for mode in MODES:
            out.append(Variant(f"depthwise/{dtype}/{mode}", lambda a=(dtype, MODES[mode]): _k.depthwise_kernel(*a),
                               (_a(dt, 5), _a(dt, 3, "C"), _a(dt, 1), _a(dt, 5)) + (I64,) * 14, "inner",
                               FLOORS["direct"]))
        out.append(Variant(f"pack/{dtype}", lambda d=dtype: _k.pack_kernel(d),
                           (_a(dt, 6), _a(I32, 2, "C"), _a(dt, 3, "C"), _a(I32, 1, "C")), None))
        out.append(Variant(f"copy/{dtype}", lambda: _k.copy_kernel(), (_a(dt, 5), _a(dt, 5)), None))
        out.append(Variant(f"split_finish/{dtype}", lambda d=dtype: _k.split_finish_kernel(d),
                           (_a(dt, 6, "C"), _a(dt, 1), _a(dt, 5), I64, _a(I32, 1, "C"), I64), None))
    out.append(Variant("clear_flag", lambda: _k.clear_flag_kernel(), (_a(I32, 1, "C"),), None))
    return out


def backward_variants():
    out = []
    geometry = (I64,) * 36
    layouts = ((False, False), (False, True), (True, False), (True, True))
    for dtype, tile, (a_cl, b_cl), mode in itertools.product(DTYPES, _bk.WGRAD_TILES, layouts, MODES):
        dt = DTYPES[dtype]
        sig = (_a(dt, 1, "C"), _a(dt, 1, "C"), _a(dt, 2)) + geometry + (I64,) * 4
        name = f"wgrad/{dtype}/{tile}/{'cl' if a_cl else 'cf'}-{'cl' if b_cl else 'cf'}/{mode}"
        floor = FLOORS["wgrad_narrow"] if tile == "narrow" else FLOORS["wgrad" if mode == "zeros" else "wgrad_mode"]
        out.append(Variant(name, lambda a=(dtype, tile, a_cl, b_cl, MODES[mode]): _bk.wgrad_gemm_kernel(*a), sig,
                           "tile", floor))
    for dtype, lanes, mode in itertools.product(DTYPES, (1, 2, 4, 8, 16), MODES):
        dt = DTYPES[dtype]
        out.append(Variant(f"wgrad_small/{dtype}/w{lanes}/{mode}",
                           lambda a=(dtype, _bk.REDUCE_THREADS, MODES[mode], lanes): _bk.wgrad_small_kernel(*a),
                           (_a(dt, 1, "C"), _a(dt, 1, "C"), _a(dt, 2)) + geometry, "inner", FLOORS["wgrad_small"]))
    for dtype in DTYPES:
        dt = DTYPES[dtype]
        out += [Variant(f"bias/{dtype}", lambda d=dtype: _bk.bias_kernel(d), (_a(dt, 5), _a(dt, 2), I64, I64), None),
                Variant(f"split_sum/{dtype}", lambda d=dtype: _bk.split_sum_kernel(d), (_a(dt, 2), _a(dt, 1)), None),
                Variant(f"fill_zero/{dtype}", lambda d=dtype: _bk.fill_zero_kernel(d), (_a(dt, 1),), None),
                Variant(f"fold/{dtype}", lambda d=dtype: _bk.fold_kernel(d), (_a(dt, 5), _a(dt, 5)) + (I64,) * 7,
                        None)]
    return out


def mixed_dtype_variants():
    """Launches whose operands are not in the compute dtype (the kernels cast on load)."""
    f16, f32, f64 = T.float16, T.float32, T.float64
    gemm = (_a(f16, 1, "C"), _a(f32, 1, "C"), _a(f16, 1), _a(f32, 5), _a(I32, 2, "C"), _a(I32, 2, "C"),
            _a(I32, 1, "C")) + (I64,) * 23
    geometry = (I64,) * 36
    return [Variant("gemm/float32/wide/cf-cf/zeros (float16 x)", lambda: _k.gemm_kernel("float32", "wide", False, False,
                                                                                       ZEROS), gemm, "tile",
                    FLOORS["gemm_f32"]),
            Variant("pack/float32 (float16 w)", lambda: _k.pack_kernel("float32"),
                    (_a(f16, 6), _a(I32, 2, "C"), _a(f32, 3, "C"), _a(I32, 1, "C")), None),
            Variant("wgrad/float64/narrow/cl-cf/zeros (float16 a, b)",
                    lambda: _bk.wgrad_gemm_kernel("float64", "narrow", True, False, ZEROS),
                    (_a(f16, 1, "C"), _a(f16, 1, "C"), _a(f64, 2)) + geometry + (I64,) * 4, "tile",
                    FLOORS["wgrad_narrow"]),
            Variant("bias/float64 (float16 gy)", lambda: _bk.bias_kernel("float64"), (_a(f16, 5), _a(f64, 2), I64, I64),
                    None)]


def all_variants():
    return forward_variants() + backward_variants() + mixed_dtype_variants()


def in_ci_set(name: str) -> bool:
    """The subset CI compiles (its time budget): every kernel and tile in both dtypes with the
    default layout and zeros padding (with and without split-K), every layout and every padding
    mode of the float32 wide GEMM, the mixed-dtype launches."""
    if name.startswith("depthwise/"):  # float32 in every padding mode, float64 zeros
        return name.split("/")[1] == "float32" or name.endswith("/zeros")
    if "(" in name or not name.startswith(("gemm/", "wgrad/", "wgrad_small/")):
        return True
    parts = name.split("/")
    if parts[-1] == "i64":  # the 64-bit-offset GEMMs: every dtype and tile, default layout, zeros padding
        return parts[3:] == ["cf-cf", "zeros", "i64"]
    if parts[0] == "wgrad_small":  # float32: every lane width in zeros mode, every mode at 16 lanes
        return parts[3] == "zeros" or parts[2] == "w16" if parts[1] == "float32" else parts[2:] == ["w16", "zeros"]
    # the GEMMs: every dtype and tile with the default layout and zeros padding; every layout and
    # every padding mode of the float32 wide tile
    default = parts[3] == "cf-cf" and parts[4] == "zeros"
    if parts[-1] == "split":  # split-K changes the epilogue only: every tile and dtype, default layout
        return default
    return default or parts[1:3] == ["float32", "wide"] and (parts[3] == "cf-cf" or parts[4] == "zeros")

__all__ = ["Variant", "FLOORS", "gemm_floor", "all_variants", "in_ci_set", "mixed_dtype_variants", "forward_variants", "backward_variants"]
