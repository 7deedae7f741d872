"""Fuzz target for convfast's compiled entry points (atheris, or a plain random-bytes driver).

The fuzzer's bytes are decoded into one call:

* the public operators ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` (rank 1-3, shapes 0-9 with
  zeros, batched or not, both layouts, several dtypes, contiguous / Fortran / negative-stride /
  sliced / broadcast / misaligned / byte-swapped / read-only / list inputs, bias, ``out=``; stride,
  dilation, padding, output_padding and output_size drawn from small values, zero, negative and
  huge ones (2**31 .. 2**64, 10**20), wrong-length tuples, floats, bools, strings, None;
  every padding string and padding mode plus bad ones; groups),
* ``convfast.pad`` (every mode, pad widths in all of np.pad's forms, constant values),
* the raw binding ``convfast._core.conv`` / ``_core.Plan`` / ``_core.pad`` with arrays whose
  shapes, dtypes and strides need not agree with each other or with the parameters (any y size,
  negative and huge strides / dilations / paddings, bad kind and mode codes, zero-size axes,
  zero-stride, negative-stride and read-only views, a Plan executed on other shapes).

Accepted outcomes: a result, ``ValueError``, ``TypeError`` or ``MemoryError``. Everything else is a
finding: another exception (``OverflowError``, ``IndexError``, ``SystemError``, ...), a wrong result
(successful calls are compared with ``convfast.reference`` / ``np.pad`` for the public API and with a
naive NumPy loop for the raw binding; NaN positions must agree too), a mutated input, and of course
a crash or a sanitizer report, which kills the process (atheris then writes the input to
``<workdir>/crash-*``; the random driver keeps the input being run in ``<workdir>/current.bin``).
Findings other than crashes are recorded, deduplicated by signature, in ``<workdir>/findings.jsonl``
with a reproducer and the fuzzing goes on; ``--strict`` raises instead (atheris then stops).

Usage (see scripts/README.md)::

    python scripts/fuzz_core.py --time 600                  # atheris if importable, else random
    python scripts/fuzz_core.py --engine random --time 600 --seed 1
    python scripts/fuzz_core.py --repro build/fuzz/crash-...  # re-run one input, printing the call
    python scripts/fuzz_core.py --repro-hex 0a1b2c...

Run it under the ASan build of scripts/sanitize.sh to turn silent out-of-bounds reads into reports:
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1
build/asan-venv/bin/python scripts/fuzz_core.py ... (atheris is pip-installed into that venv).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
import traceback

import numpy as np

# ------------------------------------------------------------------------------------------------
# Byte decoding
# ------------------------------------------------------------------------------------------------


class Reader:
    """Deterministic decoder over the fuzzer's bytes; past the end every read returns its minimum."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int(self, lo: int, hi: int) -> int:
        """Uniform-ish integer in [lo, hi]."""
        span = hi - lo + 1
        v = 0
        nbytes = max(1, (span.bit_length() + 7) // 8)
        for _ in range(nbytes):
            v = (v << 8) | self.byte()
        return lo + v % span

    def bool(self, p_true: float = 0.5) -> bool:
        return self.byte() < int(256 * p_true)

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def seed(self) -> int:
        return self.int(0, 2**32 - 1)


HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64, 10**20]
NEG = [-1, -2, -(2**31), -(2**63), -(2**63) - 1]


def small_or_wild(r: Reader, lo: int = 0, hi: int = 4, p_wild: float = 0.15) -> int:
    """Usually a small value in [lo, hi]; sometimes zero, negative or huge."""
    if not r.bool(p_wild):
        return r.int(lo, hi)
    return r.choice([0] + NEG + HUGE + [7, 9, 17])


def wild_param(r: Reader, rank: int, lo: int, hi: int, p_wild: float = 0.1):
    """An int parameter in one of its accepted spellings, or (sometimes) an unacceptable one."""
    kind = r.int(0, 15)
    if kind <= 7:
        return small_or_wild(r, lo, hi, p_wild)
    if kind <= 11:
        return tuple(small_or_wild(r, lo, hi, p_wild) for _ in range(rank))
    if kind == 12:
        return [small_or_wild(r, lo, hi, p_wild) for _ in range(r.choice([1, rank, rank + 1, 0]))]
    if kind == 13:
        return np.array([r.int(lo, hi)] * rank, dtype=r.choice([np.int64, np.int32, np.uint8, np.float64]))
    if kind == 14:
        return np.int64(r.int(lo, hi)) if r.bool() else np.int8(r.int(lo, hi))
    return r.choice([1.0, 2.5, True, False, None, "1", b"2", (1, None), [[1]], float("nan"), 1 + 0j, object()])


def padding_param(r: Reader, rank: int):
    kind = r.int(0, 9)
    if kind <= 2:
        return r.choice(["valid", "same", "same_lower", "SAME", "Same_Upper", "full", "", "same "])
    if kind == 3:  # (before, after) pairs
        return tuple((small_or_wild(r, 0, 3), small_or_wild(r, 0, 3)) for _ in range(rank))
    if kind == 4:
        return [(small_or_wild(r, 0, 3),) * r.choice([1, 2, 3]) for _ in range(r.choice([1, rank, rank + 1]))]
    return wild_param(r, rank, 0, 3)


DTYPES = ["float32", "float64", "float32", "float64", "float16", "int32", "int64", "uint8", "bool",
          ">f4", ">f8", "complex64", "object", "U1", "float32", "float64"]
LAYOUTS = ["c", "c", "c", "f", "neg", "sliced", "broadcast", "misaligned", "readonly", "list", "permuted", "c"]


def make_array(r: Reader, shape, *, dtype=None, layout=None, nan=True):
    """An array of `shape` with the drawn dtype and memory layout (or a list)."""
    dtype = dtype or r.choice(DTYPES)
    layout = layout or r.choice(LAYOUTS)
    rng = np.random.default_rng(r.seed())
    size = int(np.prod(shape)) if shape else 1
    vals = rng.standard_normal(size)
    if r.bool(0.3):
        vals = np.round(vals * 3)
    if nan and size and r.bool(0.05):
        vals[rng.integers(size)] = np.nan
    vals = vals.reshape(shape)
    if dtype == "object":
        return vals.astype(object)
    if dtype == "U1":
        return np.full(shape, "a")
    with np.errstate(invalid="ignore"):
        base = np.nan_to_num(vals, nan=0.0) if np.dtype(dtype).kind in "iub" else vals
        a = base.astype(dtype)
    if layout == "c" or (a.ndim == 0 and layout != "list"):
        return np.ascontiguousarray(a)
    if layout == "f":
        return np.asfortranarray(a)
    if layout == "neg":
        return np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in shape)])[
            tuple(slice(None, None, -1) for _ in shape)]
    if layout == "sliced":
        big = np.zeros(tuple(2 * n + 1 for n in shape), dtype=a.dtype)
        view = big[tuple(slice(1, 1 + 2 * n, 2) for n in shape)]
        view[...] = a
        return view
    if layout == "broadcast" and a.ndim:
        first = a[(slice(None),) * (a.ndim - 1) + (slice(0, 1),)]
        return np.broadcast_to(first, a.shape)
    if layout == "misaligned" and a.dtype.itemsize > 1:
        buf = np.zeros(a.nbytes + 1, np.uint8)
        view = buf[1:].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    if layout == "readonly":
        a = np.ascontiguousarray(a)
        a.flags.writeable = False
        return a
    if layout == "list":
        return a.tolist()
    if layout == "permuted" and a.ndim >= 2:
        perm = list(range(a.ndim))[::-1]
        return np.ascontiguousarray(a.transpose(perm)).transpose(perm)
    return np.ascontiguousarray(a)


# ------------------------------------------------------------------------------------------------
# Outcome bookkeeping
# ------------------------------------------------------------------------------------------------

ACCEPTED = (ValueError, TypeError, MemoryError)
# Crashes found and reported, skipped by default while they were open so that a long run could look
# for others (--no-skip-known runs them too). Both are fixed; the list stays as the mechanism:
# 1. (fixed) _core.conv / _core.Plan.execute, forward, y with a zero-length last spatial axis: SIGFPE.
# 2. (fixed) _core.pad with a destination axis of ~2**31: an int64 index map per destination axis
#    (8 bytes per position) was built first; indices are now computed on the fly.
KNOWN_CRASHES: list = []
MAX_OUT_ELEMENTS = 2_000_000  # a valid call with a larger output is skipped (time and memory)
STATS = {"iterations": 0, "started": time.time()}
FINDINGS: dict = {}
CONFIG = {"workdir": "build/fuzz", "strict": False, "verbose": False, "skip_known": True}
CURRENT = {"data": b"", "call": ""}


class Finding(Exception):
    pass


def count(key: str) -> None:
    STATS[key] = STATS.get(key, 0) + 1


def signature(category: str, target: str, detail: str) -> str:
    detail = detail.splitlines()[0] if detail else ""
    detail = re.sub(r"0x[0-9a-f]+", "0x?", detail)
    detail = re.sub(r"\([^()]*\)", "(..)", detail)
    detail = re.sub(r"-?\d+", "N", detail)[:200]
    return f"{category}|{target}|{detail}"


def record(category: str, target: str, detail: str) -> None:
    count(f"finding:{category}")
    sig = signature(category, target, detail)
    if sig not in FINDINGS:
        entry = {"category": category, "target": target, "detail": detail[:4000], "call": CURRENT["call"][:4000],
                 "input_hex": CURRENT["data"].hex(), "first_at_iteration": STATS["iterations"], "count": 1}
        FINDINGS[sig] = entry
        print(f"\n*** FINDING [{category}] {target}: {detail.splitlines()[-1][:300] if detail else ''}\n"
              f"    call: {CURRENT['call'][:600]}", file=sys.stderr, flush=True)
        os.makedirs(CONFIG["workdir"], exist_ok=True)
        with open(os.path.join(CONFIG["workdir"], "findings.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
    else:
        FINDINGS[sig]["count"] += 1
    if CONFIG["strict"]:
        raise Finding(f"[{category}] {target}: {detail}")


def describe(value) -> str:
    if isinstance(value, np.ndarray):
        return (f"ndarray(shape={value.shape}, dtype={value.dtype}, strides={value.strides}, "
                f"writeable={value.flags.writeable}, aligned={value.flags.aligned})")
    if isinstance(value, list):
        return f"list(shape={np.shape(value) if _rectangular(value) else '?'})"
    if isinstance(value, (tuple,)):
        return "(" + ", ".join(describe(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, object) and type(value) is object:
        return "object()"
    return repr(value)


def _rectangular(value) -> bool:
    try:
        np.shape(value)
        return True
    except Exception:
        return False


def call(target: str, fn, *args, **kwargs):
    """Run fn; returns (ok, result). Accepted exceptions give (False, exc); others are findings."""
    CURRENT["call"] = f"{target}(" + ", ".join([describe(a) for a in args] +
                                                [f"{k}={describe(v)}" for k, v in kwargs.items()]) + ")"
    if CONFIG["verbose"]:
        print("call:", CURRENT["call"], flush=True)
    try:
        result = fn(*args, **kwargs)
    except ACCEPTED as exc:
        count(f"{target}:{type(exc).__name__}")
        if CONFIG["verbose"]:
            print(f"  -> {type(exc).__name__}: {exc}", flush=True)
        return False, exc
    except Finding:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else is what we are looking for
        count(f"{target}:{type(exc).__name__}")
        record(f"exception:{type(exc).__name__}", target,
               f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc(limit=6)))
        return False, exc
    count(f"{target}:ok")
    if CONFIG["verbose"]:
        print(f"  -> ok {describe(result)}", flush=True)
    return True, result


def fingerprint(a):
    if isinstance(a, np.ndarray):
        return (a.shape, a.strides, hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).tobytes()
                                                  if a.dtype != object else repr(a.tolist()).encode()).hexdigest())
    return repr(a)


def compare(target: str, got, expected, reduction: int) -> None:
    count("compared")
    got = np.asarray(got)
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        record("wrong-shape", target, f"shape {got.shape} != reference {expected.shape}")
        return
    if got.dtype.kind != "f":
        record("wrong-dtype", target, f"dtype {got.dtype}")
        return
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    if not np.array_equal(np.isnan(g), np.isnan(e)):
        record("wrong-nan", target, f"NaN positions differ: {int(np.isnan(g).sum())} vs {int(np.isnan(e).sum())}")
        return
    finite = ~np.isnan(e)
    if not finite.any():
        return
    scale = max(1.0, float(np.abs(e[finite]).max()))
    err = float(np.abs(g[finite] - e[finite]).max())
    tol = (1e-12 if got.dtype == np.float64 else 2e-6 * max(1.0, np.sqrt(max(reduction, 1)))) * scale * 4
    if not err <= tol:
        record("wrong-result", target, f"max abs error {err:.3g} > {tol:.3g} (scale {scale:.3g})")


# ------------------------------------------------------------------------------------------------
# Targets: the public operators
# ------------------------------------------------------------------------------------------------


def _spec_output_elements(spec_fn, *args):
    """Output element count from the library's own spec (the op would compute the same), or None."""
    try:
        spec = spec_fn(*args)
        return int(np.prod(spec.output_shape(), dtype=object))
    except Exception:
        return None


def _has_huge(value, limit: int = 2**20) -> bool:
    if isinstance(value, dict):
        return any(_has_huge(v, limit) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_has_huge(v, limit) for v in value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return abs(int(value)) >= limit
    return False


def fuzz_conv(r: Reader) -> None:
    import convfast
    from convfast import _spec, reference

    rank = r.int(1, 3)
    transposed = r.bool()
    name = f"conv_transpose{rank}d" if transposed else f"conv{rank}d"
    groups_value = r.choice([1, 1, 1, 2, 3]) if not r.bool(0.05) else small_or_wild(r, 0, 4, 1.0)
    g = groups_value if isinstance(groups_value, int) and 1 <= groups_value <= 9 else 1
    cin = g * r.int(0, 3) if r.bool(0.9) else r.int(0, 9)
    cout = g * r.int(0, 3) if r.bool(0.9) else r.int(0, 9)
    batch = r.int(0, 3)
    batched = r.bool(0.8)
    channels_last = r.bool(0.3)
    data_format = "channels_last" if channels_last else "channels_first"
    if r.bool(0.03):
        data_format = r.choice(["NHWC", "nchw", "channels_middle", 3, None])
    spatial = [r.int(1, 9) if r.bool(0.95) else 0 for _ in range(rank)]
    kernel = [r.int(1, 4) if r.bool(0.95) else r.choice([0, 9]) for _ in range(rank)]
    if r.bool(0.03):  # wrong rank of x or weight
        spatial = spatial + [2] if r.bool() else spatial[:-1]
    xshape = ([batch] if batched else []) + ([*spatial, cin] if channels_last else [cin, *spatial])
    wshape = [cin, cout // max(g, 1), *kernel] if transposed else [cout, cin // max(g, 1), *kernel]
    if r.bool(0.03):
        wshape[r.int(0, len(wshape) - 1)] += 1
    x = make_array(r, tuple(xshape))
    w = make_array(r, tuple(wshape), dtype=r.choice(DTYPES[:10]), layout=r.choice(LAYOUTS))
    bias = None
    if r.bool(0.5):
        bias = make_array(r, (cout if r.bool(0.95) else cout + 1,), dtype=r.choice(DTYPES[:10]),
                          layout=r.choice(["c", "neg", "sliced", "broadcast", "list"]))
    stride = wild_param(r, rank, 1, 3)
    dilation = wild_param(r, rank, 1, 3)
    padding = padding_param(r, rank)
    kwargs = {"data_format": data_format}
    if transposed:
        output_padding = wild_param(r, rank, 0, 2) if r.bool(0.3) else 0
        if r.bool(0.2):
            kwargs["output_size"] = (tuple(r.int(0, 30) for _ in range(r.choice([rank, rank + 2, 1])))
                                     if r.bool(0.9) else small_or_wild(r, 0, 30, 1.0))
        args = (x, w, bias, stride, padding, output_padding, groups_value, dilation)
    else:
        kwargs["padding_mode"] = r.choice(["zeros", "reflect", "replicate", "circular", "symmetric", "constant",
                                           "edge", "wrap", "REFLECT", "mirror", "", None, 0])
        args = (x, w, bias, stride, padding, dilation, groups_value)
    use_out = r.bool(0.15)

    fn = getattr(convfast, name)
    # Skip valid calls whose output is too large to compute quickly (decided by the library's spec).
    xa = np.asarray(x) if not isinstance(x, np.ndarray) else x
    try:
        xs, ws = _spec.as_array(name, "x", x), _spec.as_array(name, "weight", w)
        bs = None if bias is None else _spec.as_array(name, "bias", bias)
        if transposed:
            elems = _spec_output_elements(_spec.conv_transpose_spec, name, rank, xs, ws, bs, *args[3:],
                                          kwargs.get("output_size"), data_format)
        else:
            elems = _spec_output_elements(_spec.conv_spec, name, rank, xs, ws, bs, stride, padding, dilation,
                                          groups_value, kwargs["padding_mode"], data_format)
    except Exception:
        elems = None
    if elems is not None and elems > MAX_OUT_ELEMENTS:
        count("skipped-large-output")
        return
    if use_out and elems is not None:
        try:
            spec = (_spec.conv_transpose_spec(name, rank, xs, ws, bs, *args[3:], kwargs.get("output_size"),
                                              data_format) if transposed else
                    _spec.conv_spec(name, rank, xs, ws, bs, stride, padding, dilation, groups_value,
                                    kwargs["padding_mode"], data_format))
            shape = spec.output_shape()
            kind = r.int(0, 5)
            if kind == 0:
                out = np.full(shape, 7, spec.dtype)
            elif kind == 1:
                out = np.full(tuple(2 * s for s in shape), 7, spec.dtype)[tuple(slice(None, None, 2) for _ in shape)]
            elif kind == 2:
                out = np.full(shape, 7, spec.dtype)[tuple(slice(None, None, -1) for _ in shape)]
            elif kind == 3:
                out = np.full(shape, 7, np.float64 if spec.dtype == np.float32 else np.float32)
            elif kind == 4:
                out = np.full(tuple(s + 1 for s in shape), 7, spec.dtype)
            else:
                out = xa if isinstance(x, np.ndarray) else [0]
            kwargs["out"] = out
        except Exception:
            pass

    inputs = [a for a in (x, w, bias) if isinstance(a, np.ndarray)]
    if "out" in kwargs and any(kwargs["out"] is a for a in inputs):  # the reference needs the original x
        args = tuple(a.copy() if isinstance(a, np.ndarray) and a is kwargs["out"] else a for a in args)
        ref_args = args
        args = (kwargs["out"],) + args[1:] if kwargs["out"] is x else args
    else:
        ref_args = args
    before = [fingerprint(a) for a in inputs]
    ok, result = call(name, fn, *args, **kwargs)
    after = [fingerprint(a) for a in inputs]
    if before != after and not ("out" in kwargs and any(kwargs["out"] is a for a in inputs)):
        record("input-mutated", name, "an input array changed")
    if not ok:
        return
    if "out" in kwargs and result is not kwargs["out"]:
        record("out-not-returned", name, "out= given but another array was returned")
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "out"}
    try:
        expected = getattr(reference, name)(*ref_args, **ref_kwargs)
    except Exception as exc:  # noqa: BLE001
        if _has_huge(args) or _has_huge(ref_kwargs) or isinstance(exc, MemoryError):
            count("reference-cannot")  # the NumPy oracle materialises huge paddings / outputs
        else:
            record("reference-disagrees", name, f"convfast succeeded, reference raised {type(exc).__name__}: {exc}")
        return
    k = int(np.prod(np.shape(w)[2:], dtype=np.int64)) * max(cin // max(g, 1), 1)
    compare(name, result, expected, k)


def fuzz_pad(r: Reader) -> None:
    import convfast
    from convfast.functional import normalize_pad_width

    ndim = r.int(0, 4)
    shape = tuple(r.int(0, 5) for _ in range(ndim))
    a = make_array(r, shape, dtype=r.choice(["float32", "float64", "int8", "int16", "uint8", "bool", "complex128",
                                             ">i4", "float16", "<U2", "object", "int64"]))
    kind = r.int(0, 6)
    if kind == 0:
        pad_width = small_or_wild(r, 0, 4)
    elif kind == 1:
        pad_width = (small_or_wild(r, 0, 4), small_or_wild(r, 0, 4))
    elif kind == 2:
        pad_width = tuple((small_or_wild(r, 0, 4), small_or_wild(r, 0, 4)) for _ in range(max(ndim, 1)))
    elif kind == 3:
        pad_width = {r.int(-ndim - 1, ndim): small_or_wild(r, 0, 4)}
    elif kind == 4:
        pad_width = np.array([[r.int(0, 3), r.int(0, 3)]] * max(ndim, 1), dtype=r.choice([np.int64, np.uint8]))
    elif kind == 5:
        pad_width = r.choice([1.5, "2", None, [[1, 2, 3]], [(1, 2)] * (ndim + 1), -1, True])
    else:
        pad_width = [small_or_wild(r, 0, 4) for _ in range(max(ndim, 1))]
    mode = r.choice(["constant", "reflect", "edge", "wrap", "symmetric", "zeros", "replicate", "circular",
                     "REFLECT", "linear_ramp", "mean", "bogus", None])
    kwargs = {}
    if mode in ("constant", "zeros") and r.bool(0.5):
        kwargs["constant_values"] = r.choice([0, 1, -3, 2.5, (1, 2), ((1, 2),) * max(ndim, 1), float("nan"), 300,
                                              -(2**70), "x"])
    try:
        widths = normalize_pad_width("fuzz", pad_width, np.ndim(a))
        out_elems = int(np.prod([n + b + c for n, (b, c) in zip(np.shape(a), widths)], dtype=object))
    except Exception:
        out_elems = None
    kernel_mode = isinstance(mode, str) and mode.lower() in ("constant", "reflect", "edge", "wrap", "symmetric",
                                                            "zeros", "replicate", "circular")
    if (out_elems is not None and MAX_OUT_ELEMENTS < out_elems < 2**62) or \
            (out_elems is None and not kernel_mode and _has_huge(pad_width, 1000)):
        count("skipped-large-output")
        return
    before = fingerprint(a)
    # np.pad is the oracle for everything: the same values, or an exception of the same type.
    try:
        with np.errstate(all="ignore"):
            expected = convfast.reference.pad(a, pad_width, mode, **kwargs)
        ref_ok = True
    except Exception as exc:  # noqa: BLE001
        ref_ok, expected = False, exc
    global ACCEPTED
    saved = ACCEPTED
    if not ref_ok:  # raising what np.pad raises is right for a drop-in, whatever the type
        ACCEPTED = ACCEPTED + (type(expected),)
    try:
        ok, result = call("pad", convfast.pad, a, pad_width, mode, **kwargs)
    finally:
        ACCEPTED = saved
    if before != fingerprint(a):
        record("input-mutated", "pad", "the padded array changed")
    if ok and ref_ok:
        count("compared")
        if np.shape(result) != np.shape(expected) or np.asarray(result).dtype != np.asarray(expected).dtype:
            record("pad-mismatch", "pad", f"shape/dtype {np.shape(result)} {np.asarray(result).dtype} vs np.pad "
                                          f"{np.shape(expected)} {np.asarray(expected).dtype}")
        elif np.asarray(result).dtype == object:
            if repr(np.asarray(result).tolist()) != repr(np.asarray(expected).tolist()):
                record("pad-mismatch", "pad", "values differ from np.pad")
        elif not np.array_equal(result, expected, equal_nan=np.asarray(result).dtype.kind in "fc"):
            record("pad-mismatch", "pad", "values differ from np.pad")
    elif ok != ref_ok:
        what = (f"convfast raised {type(result).__name__}: {result}" if not ok else
                f"convfast returned shape {np.shape(result)}, np.pad raised {type(expected).__name__}: {expected}")
        if not (ref_ok is False and isinstance(expected, MemoryError)) and \
                not (ok is False and isinstance(result, MemoryError)):
            record("pad-outcome-differs", "pad", what)


# ------------------------------------------------------------------------------------------------
# Targets: the raw binding (convfast._core), with inconsistent arrays
# ------------------------------------------------------------------------------------------------


def _triple(r: Reader, lo: int, hi: int, p_wild: float):
    return tuple(small_or_wild(r, lo, hi, p_wild) if r.bool(0.97) else r.choice([0, -1, 2**62, -(2**62)])
                 for _ in range(3))


def _raw_array(r: Reader, shape, dtype):
    a = make_array(r, shape, dtype=dtype, layout=r.choice(["c", "c", "f", "neg", "sliced", "broadcast",
                                                           "readonly", "permuted"]), nan=False)
    return a


def _axis_map(n: int, pb: int, length: int, mode: int):
    """Index of the input element read at padded positions -pb .. -pb+length-1 (-1 for zero), via np.pad."""
    names = {0: "constant", 1: "reflect", 2: "edge", 3: "wrap", 4: "symmetric"}
    lo = pb if pb > 0 else 0
    hi = max(0, length - pb - n) if length - pb > n else 0
    idx = np.arange(n)
    if mode == 0:
        padded = np.pad(idx, (lo, hi), mode="constant", constant_values=-1)
    elif mode == 1 and n == 1:
        padded = np.zeros(lo + n + hi, dtype=np.int64)
    else:
        padded = np.pad(idx, (lo, hi), mode=names[mode])
    start = lo - pb
    return padded[start:start + length]


def naive_core(x5, w6, bias, y_shape, kind, stride, dilation, pad_before, mode):
    """Naive float64 computation of what _core.conv writes into y (any geometry)."""
    x = np.asarray(x5, np.float64)
    w = np.asarray(w6, np.float64)
    n, cin = x.shape[:2]
    G, cog, cig = w.shape[:3]
    ksz = w.shape[3:]
    out = y_shape[2:]
    y = np.zeros((n, G, cog) + tuple(out))
    xg = x.reshape((n, G, cig) + x.shape[2:])
    if kind == 0:
        for taps in np.ndindex(*ksz):
            # input coordinate of every output position for this tap, mapped per axis
            maps = []
            for a in range(3):
                pos = np.arange(out[a]) * stride[a] - pad_before[a] + taps[a] * dilation[a]
                lo = int(pos.min()) if out[a] else 0
                length = (int(pos.max()) - lo + 1) if out[a] else 0
                m = _axis_map(x.shape[2 + a], -lo, length, mode) if out[a] else np.zeros(0, np.int64)
                maps.append(m[pos - lo] if out[a] else m)
            valid = [m >= 0 for m in maps]
            sub = xg[:, :, :, np.where(valid[0], maps[0], 0)][:, :, :, :, np.where(valid[1], maps[1], 0)][
                ..., np.where(valid[2], maps[2], 0)]
            mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
            sub = sub * mask
            y += np.einsum("ngcdhw,goc->ngodhw", sub, w[(slice(None),) * 3 + taps])
    else:
        for taps in np.ndindex(*ksz):
            contrib = np.einsum("ngcdhw,goc->ngodhw", xg, w[(slice(None),) * 3 + taps])
            for idx in np.ndindex(*x.shape[2:]):
                o = tuple(idx[a] * stride[a] + taps[a] * dilation[a] - pad_before[a] for a in range(3))
                if all(0 <= o[a] < out[a] for a in range(3)):
                    y[(slice(None),) * 3 + o] += contrib[(slice(None),) * 3 + idx]
    y = y.reshape((n, G * cog) + tuple(out))
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape((1, -1, 1, 1, 1))
    return y


def fuzz_core_conv(r: Reader) -> None:
    from convfast import _core

    dtype = r.choice(["float32", "float64", "float32", "float64", "float16", "int64"])
    G = r.int(1, 3) if r.bool(0.97) else 0
    cog, cig = r.int(0, 3), r.int(0, 3)
    n = r.int(0, 2)
    ksz = tuple(r.int(1, 3) if r.bool(0.9) else 0 for _ in range(3))
    xsp = tuple(r.int(1, 4) if r.bool(0.95) else 0 for _ in range(3))
    kind = r.choice([0, 1, 0, 1, 2, -1])
    mode = r.choice([0, 0, 1, 2, 3, 4, 5, -1]) if kind == 0 else r.choice([0, 0, 0, 1])
    stride = _triple(r, 1, 3, 0.05)
    dilation = _triple(r, 1, 3, 0.05)
    pad_before = _triple(r, -2, 3, 0.05)
    consistent = r.bool(0.5)
    if consistent and all(isinstance(v, int) for v in stride + dilation + pad_before):
        ysp = []
        for a in range(3):
            eff = (ksz[a] - 1) * dilation[a] + 1
            if kind == 1:
                size = (xsp[a] - 1) * stride[a] - pad_before[a] + eff - pad_before[a]
            else:
                size = (xsp[a] + 2 * pad_before[a] - eff) // max(stride[a], 1) + 1
            ysp.append(size if 0 <= size <= 12 else r.int(0, 6))
    else:
        ysp = [r.int(0, 6) for _ in range(3)]
    x_shape = [n, G * cig, *xsp]
    w_shape = [G, cog, cig, *ksz]
    y_shape = [n, G * cog, *ysp]
    if r.bool(0.1):  # break one shape
        which = r.choice([x_shape, w_shape, y_shape])
        which[r.int(0, len(which) - 1)] += r.choice([1, -1]) if which[0] else 1
        for s in (x_shape, w_shape, y_shape):
            s[:] = [max(v, 0) for v in s]
    if r.bool(0.03):
        x_shape = x_shape[:-1]
    dts = [dtype, dtype, dtype]
    if r.bool(0.05):
        dts[r.int(0, 2)] = r.choice(["float32", "float64", "int32"])
    x5 = _raw_array(r, tuple(x_shape), dts[0])
    w6 = _raw_array(r, tuple(w_shape), dts[1])
    y_layout = r.choice(["c", "c", "neg", "sliced", "readonly", "broadcast"])
    y5 = make_array(r, tuple(y_shape), dtype=dts[2], layout=y_layout, nan=False)
    if r.bool(0.03):
        y5 = x5  # aliasing
    bias = None
    if r.bool(0.4):
        bias = _raw_array(r, (y_shape[1] if r.bool(0.95) else y_shape[1] + 1,), r.choice([dtype, dtype, "float16"]))
    use_plan = r.bool(0.25)
    x_before = fingerprint(x5)
    w_before = fingerprint(w6)
    args = (x5, w6, bias, y5, kind, stride, dilation, pad_before, mode)
    if use_plan:
        ok, plan = call("_core.Plan", _core.Plan, x5, w6, y5, kind, stride, dilation, pad_before, mode)
        if not ok:
            return
        if r.bool(0.5):  # execute on other arrays / shapes
            x2 = _raw_array(r, tuple(max(v + r.int(-1, 1), 0) for v in x5.shape), r.choice([dtype, "float32",
                                                                                           "float64"]))
            y2 = make_array(r, tuple(max(v + r.int(-1, 1), 0) for v in y5.shape), dtype=x2.dtype, layout="c",
                            nan=False)
            w2 = _raw_array(r, w6.shape if r.bool(0.8) else tuple(v + 1 for v in w6.shape), x2.dtype)
            call("_core.Plan.execute", plan.execute, x2, w2, bias, y2)
            return
        ok, _ = call("_core.Plan.execute", plan.execute, x5, w6, bias, y5)
    else:
        ok, _ = call("_core.conv", _core.conv, *args)
    if y5 is not x5 and (fingerprint(x5) != x_before or fingerprint(w6) != w_before):
        record("input-mutated", "_core.conv", "x or w changed")
    if not ok or y5 is x5:
        return
    # The result is defined for any geometry when every read position is reachable by np.pad.
    spans = [abs(v) for v in stride + dilation + pad_before]
    if max(spans, default=0) > 50 or np.asarray(y5).dtype.kind != "f" or 0 in np.asarray(y5).strides:
        return
    if x5.shape[1] != G * cig or (bias is not None and bias.shape[0] != y_shape[1]):
        record("accepted-inconsistent", "_core.conv", f"shapes x{x5.shape} w{w6.shape} y{y5.shape} accepted")
        return
    if any(s < 1 for s in stride + dilation):
        record("accepted-bad-param", "_core.conv", f"stride {stride} dilation {dilation} accepted")
        return
    if mode not in (0, 1, 2, 3, 4) or kind not in (0, 1):
        record("accepted-bad-code", "_core.conv", f"kind {kind} mode {mode} accepted")
        return
    if kind == 0 and mode != 0 and 0 in x5.shape[2:]:
        return
    try:
        expected = naive_core(x5, w6, bias, y5.shape, kind, stride, dilation, pad_before, mode)
    except Exception as exc:  # noqa: BLE001 - the naive oracle's own limits (e.g. reflect of n == 0)
        count(f"naive-skip:{type(exc).__name__}")
        return
    compare("_core.conv" if not use_plan else "_core.Plan.execute", y5, expected.astype(y5.dtype),
            int(np.prod(w6.shape[2:])))


def fuzz_core_pad(r: Reader) -> None:
    from convfast import _core

    ndim = r.int(0, 4) if r.bool(0.97) else r.choice([9, 33, 64])
    shape = tuple(r.int(0, 4) if ndim <= 4 else 1 for _ in range(ndim))
    dtype = r.choice(["float32", "float64", "int8", "int16", "complex128", "bool", "V3", "float32"])
    src = make_array(r, shape, dtype=dtype if dtype != "V3" else "uint8",
                     layout=r.choice(["c", "f", "neg", "sliced", "broadcast", "readonly"]) if ndim <= 4 else "c",
                     nan=False)
    if dtype == "V3":
        src = np.zeros(shape, dtype="V3")
    before = [small_or_wild(r, 0, 3, 0.08) for _ in range(ndim)]
    after = [small_or_wild(r, 0, 3, 0.08) for _ in range(ndim)]
    if r.bool(0.05):
        before = before[:-1]
    constant = r.bool(0.4)
    mode = r.choice([0, 1, 2, 3, 4, 1, 2, 3, 4, 5, -1])
    try:
        dshape = [s + b + a for s, b, a in zip(shape, before, after)]
    except Exception:
        dshape = list(shape)
    if r.bool(0.1) and dshape:
        dshape[r.int(0, len(dshape) - 1)] += r.choice([1, -1])
    if any(d < 0 for d in dshape) or int(np.prod(dshape, dtype=object)) > MAX_OUT_ELEMENTS:
        dshape = [max(0, min(d, 8)) for d in dshape]
    if int(np.prod(dshape, dtype=object)) > MAX_OUT_ELEMENTS:
        dshape = [min(d, 1) for d in dshape]
    dst_dtype = src.dtype if r.bool(0.95) else np.dtype("float64")
    dst = np.full(tuple(dshape), 0, dtype=dst_dtype) if dst_dtype != np.dtype("V3") else np.zeros(dshape, "V3")
    if r.bool(0.05) and 0 < dst.ndim <= 4:
        dst = np.zeros(tuple(2 * v for v in dshape), dst.dtype)[tuple(slice(None, None, 2) for _ in dshape)]
    fill_items = 2 * ndim if r.bool(0.9) else r.int(0, 5)
    fill = bytes(r.byte() for _ in range(fill_items * src.dtype.itemsize))
    src_before = fingerprint(src)
    ok, _ = call("_core.pad", _core.pad, src, dst, before, after, constant, mode, fill)
    if fingerprint(src) != src_before:
        record("input-mutated", "_core.pad", "src changed")
    if not ok:
        return
    if dst.shape != tuple(s + b + a for s, b, a in zip(shape, before, after)) or len(before) != ndim:
        record("accepted-inconsistent", "_core.pad", f"src {src.shape} dst {dst.shape} before {before} after {after}")
        return
    if not constant and mode in (1, 2, 3, 4) and src.dtype.kind != "V":
        names = {1: "reflect", 2: "edge", 3: "wrap", 4: "symmetric"}
        try:
            expected = np.pad(src, list(zip(before, after)), mode=names[mode])
        except Exception:
            return
        count("compared")
        if not np.array_equal(dst, expected):
            record("pad-mismatch", "_core.pad", f"values differ from np.pad ({names[mode]})")


def fuzz_misc(r: Reader) -> None:
    import convfast

    which = r.int(0, 3)
    if which == 0:
        n = r.choice([0, -1, 2**31, 2**63, 1.5, True, None, "2", 1, 2])
        old = convfast.get_num_threads()
        try:
            call("set_num_threads", convfast.set_num_threads, n)
        finally:
            convfast.set_num_threads(old)
    elif which == 1:
        name = r.choice(["auto", "baseline", "avx2", "avx512", "AVX2", "", "neon", None, 3, "avx2\x00"])
        old = convfast.get_isa()
        try:
            call("set_isa", convfast.set_isa, name)
        finally:
            convfast.set_isa(old)
    elif which == 2:
        rank = r.int(1, 3)
        call("conv_output_shape", convfast.conv_output_shape,
             tuple(small_or_wild(r, 1, 9) for _ in range(rank)), tuple(small_or_wild(r, 1, 4) for _ in range(rank)),
             stride=wild_param(r, rank, 1, 3), padding=padding_param(r, rank), dilation=wild_param(r, rank, 1, 3))
    else:
        rank = r.int(1, 3)
        call("conv_transpose_output_shape", convfast.conv_transpose_output_shape,
             tuple(small_or_wild(r, 1, 9) for _ in range(rank)), tuple(small_or_wild(r, 1, 4) for _ in range(rank)),
             stride=wild_param(r, rank, 1, 3), padding=padding_param(r, rank),
             output_padding=wild_param(r, rank, 0, 2), dilation=wild_param(r, rank, 1, 3))


TARGETS = [fuzz_conv, fuzz_conv, fuzz_conv, fuzz_core_conv, fuzz_core_conv, fuzz_pad, fuzz_core_pad, fuzz_misc]


def test_one_input(data: bytes) -> None:
    CURRENT["data"] = data
    STATS["iterations"] += 1
    r = Reader(data)
    target = r.choice(TARGETS)
    count(f"target:{target.__name__}")
    if CONFIG.get("current_file"):
        with open(CONFIG["current_file"], "wb") as f:
            f.write(data)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            try:
                target(r)
            except Finding:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug of this harness, not of convfast: count it, go on
                count(f"harness-error:{type(exc).__name__}")
                STATS.setdefault("harness_error_samples", [])
                if len(STATS["harness_error_samples"]) < 5:
                    STATS["harness_error_samples"].append(f"{type(exc).__name__}: {str(exc)[:200]} "
                                                          f"(input {data.hex()})")
    if STATS["iterations"] % 500 == 0 or time.time() - STATS.get("last_dump", 0) > 15:
        dump_stats()


def dump_stats() -> None:
    STATS["last_dump"] = time.time()
    STATS["elapsed_s"] = round(time.time() - STATS["started"], 1)
    STATS["unique_findings"] = len(FINDINGS)
    os.makedirs(CONFIG["workdir"], exist_ok=True)
    with open(os.path.join(CONFIG["workdir"], "stats.json"), "w") as f:
        json.dump(dict(sorted(STATS.items())), f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    ap.add_argument("--time", type=float, default=600, help="seconds to fuzz (default 600)")
    ap.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: no limit)")
    ap.add_argument("--seed", type=int, default=0, help="random engine seed")
    ap.add_argument("--workdir", default="build/fuzz", help="findings, stats, corpus and crash files")
    ap.add_argument("--strict", action="store_true", help="raise on the first finding (atheris then stops)")
    ap.add_argument("--repro", help="run one input from this file, verbosely")
    ap.add_argument("--repro-hex", help="run one input given as hex, verbosely")
    ap.add_argument("--no-skip-known", action="store_true", help="also run inputs that hit KNOWN_CRASHES")
    args, rest = ap.parse_known_args(argv)
    CONFIG.update(workdir=args.workdir, strict=args.strict, skip_known=not args.no_skip_known)
    os.makedirs(args.workdir, exist_ok=True)

    if args.repro or args.repro_hex:
        CONFIG["verbose"] = True
        data = open(args.repro, "rb").read() if args.repro else bytes.fromhex(args.repro_hex)
        test_one_input(data)
        print("findings:", json.dumps(list(FINDINGS.values()), indent=1))
        return 1 if FINDINGS else 0

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    STATS["engine"] = engine
    if engine == "atheris":
        import atheris
        with atheris.instrument_imports(include=["convfast"]):  # coverage feedback from the Python layer
            import convfast
            import convfast.functional  # noqa: F401
            import convfast._spec  # noqa: F401
            import convfast.reference  # noqa: F401
    import convfast
    print(f"fuzzing convfast {convfast.__version__} from {convfast._core.__file__} with {engine} for "
          f"{args.time:.0f} s; isa {convfast.get_isa()}, threads {convfast.get_num_threads()}", flush=True)

    if engine == "atheris":
        import atheris
        corpus = os.path.join(args.workdir, "corpus")
        os.makedirs(corpus, exist_ok=True)
        libfuzzer_args = [sys.argv[0], f"-max_total_time={int(args.time)}", "-max_len=512",
                          f"-artifact_prefix={os.path.join(args.workdir, '')}", "-print_final_stats=1",
                          "-timeout=120", "-rss_limit_mb=0", *rest, corpus]
        if args.runs:
            libfuzzer_args.insert(1, f"-runs={args.runs}")
        atheris.Setup(libfuzzer_args, test_one_input)
        try:
            atheris.Fuzz()
        finally:
            dump_stats()
        return 0

    CONFIG["current_file"] = os.path.join(args.workdir, "current.bin")
    rng = random.Random(args.seed)
    deadline = time.time() + args.time
    while time.time() < deadline and (not args.runs or STATS["iterations"] < args.runs):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 256)))
        test_one_input(data)
    dump_stats()
    print(json.dumps({k: v for k, v in sorted(STATS.items())}, indent=1))
    print(f"{STATS['iterations']} inputs, {len(FINDINGS)} unique findings (see {args.workdir}/findings.jsonl)")
    return 1 if FINDINGS else 0


if __name__ == "__main__":
    sys.exit(main())
