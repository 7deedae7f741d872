"""The huge-size cases of tests/test_errors.py, one subprocess each, for a sanitizer build.

tests/test_errors.py runs its HUGE_MUST_RAISE / HUGE_VALID expressions in forked children under a
1 GiB RLIMIT_AS. AddressSanitizer cannot run under such a limit (it reserves terabytes of shadow
address space up front, so every child aborts before convfast is even called), so
scripts/sanitize.sh deselects those two tests for the ASan run and runs this instead: the same
expressions, each in a fresh interpreter that inherits the sanitizer environment, with the 1 GiB cap
emulated by ASan itself (ASAN_OPTIONS max_allocation_size_mb=1024:allocator_may_return_null=1, so a
larger malloc returns NULL and NumPy / convfast raise MemoryError instead of allocating).

The checks are the tests' own: a HUGE_MUST_RAISE case must raise ValueError or MemoryError; a
HUGE_VALID case must return the expected values or raise a ValueError naming the function and the
parameter. A crash or a sanitizer report fails the case (the report is printed), with one exception
marked "ok*": an allocation through the throwing ``operator new`` (std::vector) above the emulated cap,
which ASan reports and aborts on where the real operator new throws std::bad_alloc (a MemoryError,
as the release build gives under the tests' RLIMIT_AS).

    python scripts/sanitize_huge_cases.py      # with the sanitizer venv's interpreter and environment
"""
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")

WORKER = r"""
import json, sys
import numpy as np
import convfast
from convfast import reference
bc = lambda shape, dt=np.float32: np.broadcast_to(np.ones((), dt), shape)
ns = {"np": np, "convfast": convfast, "reference": reference, "bc": bc}
expr, expected_expr = sys.argv[1], sys.argv[2]
try:
    result = eval(expr, ns)
    rec = {"status": "ok", "shape": list(np.shape(result)),
           "value": np.asarray(result).tolist() if np.size(result) < 100 else None,
           "expected": np.asarray(eval(expected_expr, ns)).tolist() if expected_expr else None}
except BaseException as exc:
    rec = {"status": "raised", "type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
           "msg": str(exc)[:2000]}
print("RESULT " + json.dumps(rec))
"""


def _operator_new_over_cap(stderr: str) -> bool:
    errors = [ln for ln in stderr.splitlines() if "ERROR: AddressSanitizer" in ln]
    frame0 = re.search(r"#0 0x[0-9a-f]+ in (operator new|\S+)", stderr)
    return (len(errors) == 1 and ("allocator is out of memory" in errors[0]
                                  or "requested allocation size" in errors[0])
            and frame0 is not None and frame0.group(1) == "operator new")


def main() -> int:
    sys.path.insert(0, TESTS)
    import numpy as np
    import test_errors  # noqa: E402  (the case lists live with the tests)

    cases = [(i, e, None, None, None) for i, e in test_errors.HUGE_MUST_RAISE]
    cases += [(i, e, x, f, p) for i, f, p, e, x in test_errors.HUGE_VALID]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    asan = "libasan" in env.get("LD_PRELOAD", "")
    if asan:
        opts = env.get("ASAN_OPTIONS", "")
        env["ASAN_OPTIONS"] = ":".join(o for o in (opts, "allocator_may_return_null=1", "max_allocation_size_mb=1024")
                                       if o)
    failures = 0
    t0 = time.time()
    for key, expr, expected_expr, func, param in cases:
        try:
            proc = subprocess.run([sys.executable, "-c", WORKER, expr, expected_expr or ""], capture_output=True,
                                  text=True, timeout=300, env=env)
        except subprocess.TimeoutExpired:
            print(f"FAIL {key}: timed out: {expr}")
            failures += 1
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        # ("WARNING: AddressSanitizer failed to allocate" is a malloc returning NULL: a MemoryError)
        reports = [ln for ln in proc.stderr.splitlines()
                   if "ERROR: AddressSanitizer" in ln or "runtime error:" in ln or "SUMMARY:" in ln]
        if asan and not lines and _operator_new_over_cap(proc.stderr):
            # std::vector & co. asked operator new for more than the emulated 1 GiB cap. ASan's throwing
            # operator new reports and aborts where the real one throws std::bad_alloc (MemoryError in
            # Python, as the release build gives under the tests' RLIMIT_AS): not a memory error.
            size = re.search(r"allocate (0x[0-9a-f]+) bytes", proc.stderr)
            print(f"ok*  {key}: operator new of {int(size.group(1), 16) if size else '?'} bytes over the cap "
                  f"(std::bad_alloc -> MemoryError without ASan)")
            continue
        if proc.returncode != 0 or not lines or reports:
            head = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln or "SUMMARY" in ln or "runtime error" in ln]
            frames = [ln for ln in proc.stderr.splitlines() if "/cpp/" in ln or "/src/module.cpp" in ln][:6]
            print(f"FAIL {key}: exit status {proc.returncode}: {expr}\n  " + "\n  ".join(head + frames))
            failures += 1
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        problem = None
        if expected_expr is None:  # must raise ValueError or MemoryError
            if res["status"] != "raised":
                problem = f"returned shape {res['shape']}"
            elif not ({"ValueError", "MemoryError"} & set(res["mro"])):
                problem = f"raised {res['type']}: {res['msg'][:300]}"
        elif res["status"] == "ok":
            got, want = np.array(res["value"], dtype=float), np.array(res["expected"], dtype=float)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-12, atol=1e-12):
                problem = f"value {res['value']} != expected {res['expected']}"
        elif res["type"] != "ValueError" or func not in res["msg"] or param not in res["msg"]:
            problem = f"raised {res['type']}: {res['msg'][:300]}"
        status = "ok" if problem is None else "FAIL"
        outcome = res["status"] if res["status"] == "ok" else res["type"]
        print(f"{status:4} {key}: {outcome}" + (f" -- {problem}" if problem else ""))
        failures += problem is not None
    print(f"{len(cases) - failures} passed, {failures} failed ({time.time() - t0:.0f} s, "
          f"{'ASan 1 GiB allocation cap' if asan else 'no allocation cap'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
