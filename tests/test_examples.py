"""Run every script in examples/ as a user would, headless: it must exit cleanly and write a PNG.

CONVFAST_EXAMPLES_SMALL=1 asks the scripts that have a big default run (dask_volume.py: a 1 GB
volume) for their small one. Scripts whose optional dependencies are missing are skipped.

The scripts are started together (one process each, one OpenMP thread each, so that they share the
cores instead of oversubscribing them) and each test waits for its own: most of a script's time is
Python and matplotlib start-up, which overlaps well.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 180
# Optional dependencies of some scripts (module names); the others need only matplotlib.
REQUIRES = {"dask_volume.py": ("dask", "distributed"), "train_mnist_cnn.py": ("torch",)}


def _missing(script):
    return [m for m in REQUIRES.get(script, ()) if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "CONVFAST_EXAMPLES_SMALL": "1"}
    started = {}
    for script in SCRIPTS:
        if _missing(script):
            continue
        out = tmp_path_factory.mktemp(Path(script).stem)
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), "--out", str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[script] = (proc, out)
    yield started
    for proc, _ in started.values():  # only left running if a test failed before waiting
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_examples_are_found():
    assert len(SCRIPTS) >= 7, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, runs):
    if _missing(script):
        pytest.skip(f"{script} needs {', '.join(_missing(script))}")
    proc, out = runs[script]
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} ran longer than {TIMEOUT_S} s:\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"{script} failed:\n{stdout}\n{stderr}"
    assert list(out.glob("*.png")), f"{script} wrote no PNG:\n{stdout}"
    # Output into a pipe (not a terminal): no progress text redrawn with carriage returns, and no
    # warnings from a cluster sized too small for the work.
    assert "\r" not in stdout, f"{script} redraws its output with carriage returns:\n{stdout!r}"
    assert "memory usage" not in stderr and "Worker is at" not in stderr, f"{script}:\n{stderr}"
    if script == "dask_volume.py":
        bars = [line for line in stdout.splitlines() if line.startswith("[") and "%" in line]
        assert len(bars) == 1 and "100%" in bars[0], f"expected one finished progress bar:\n{stdout}"
