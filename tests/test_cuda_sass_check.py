"""The GPU kernels compiled for real GPUs (sm_80, sm_90a) without a GPU: scripts/cuda_sass_check.py
compiles the CI subset of kernel variants with the CUDA toolchain from pip wheels (pip install
'.[cuda-check]') and fails on a compile error, local memory in a hot loop, an FMA share below its
floor, or a register count that leaves fewer than two 256-thread blocks per SM.

It takes minutes, so it runs where CONVFAST_SASS_CHECK=1 (.ci/run sets it, once); elsewhere it is
skipped. With the variable set, a missing toolchain is a failure, not a skip."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, os.pardir, "scripts", "cuda_sass_check.py")

pytestmark = pytest.mark.skipif(os.environ.get("CONVFAST_SASS_CHECK") != "1",
                                reason="set CONVFAST_SASS_CHECK=1 (and pip install '.[cuda-check]') to run")


def test_every_ci_kernel_variant_compiles_within_its_budgets(tmp_path):
    report = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, SCRIPT, "--ci", "--report", str(report)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| gemm/") or line.startswith("| wgrad/")]
    # every GEMM row was compiled for both architectures and has a hot loop with FMAs
    assert {r.split("|")[2].strip() for r in rows} == {"sm_80", "sm_90a"}, text[:2000]
    assert all(int(r.split("|")[8]) > 0 for r in rows), text[:2000]
