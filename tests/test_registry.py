"""The algorithm registry as CONVFAST_VERBOSE=1 reports it: every plan (forward) and every weight
gradient lists each algorithm of its table as a candidate, then the winner, and the winner is the
algorithm that ran (layer.algorithm(x) for a layer, last_algorithm() for a weight gradient)."""
import os
import re
import subprocess
import sys

import convfast

FORWARD = ["scatter", "winograd", "planes", "lanes", "gemv", "direct", "gemm"]
WEIGHT_GRAD = ["planes", "lanes", "depthwise", "channel_rows", "winograd", "rows", "gemm"]

SCRIPT = r"""
import sys
import numpy as np
import convfast as cf
from convfast import _core

rng = np.random.default_rng(0)
layers = [
    (cf.Conv2d(32, 32, 3, padding=1), (2, 32, 24, 24)),            # winograd
    (cf.Conv2d(32, 32, 3, padding=1, groups=32), (1, 32, 14, 14)),  # depthwise planes
    (cf.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), (1, 32, 12, 12)),  # channel lanes
    (cf.Conv2d(3, 16, 3, padding=1), (1, 3, 20, 20)),               # direct
    (cf.Conv2d(16, 24, 3, stride=2, padding=1), (8, 16, 7, 7)),     # gemm
    (cf.Conv2d(64, 32, 1), (1, 64, 1, 1)),                          # gemv
    (cf.ConvTranspose2d(64, 32, 4, stride=2, padding=1), (1, 64, 2, 2)),  # scatter
]
for layer, shape in layers:
    x = rng.standard_normal(shape).astype(np.float32)
    layer(x)
    print("LAYER " + layer.algorithm(x), file=sys.stderr, flush=True)
for x_shape, w_shape, groups, pad in (((8, 3, 10, 10), (3, 1, 3, 3), 3, 1), ((2, 32, 10, 10), (32, 1, 3, 3), 32, 1),
                                      ((2, 8, 10, 10), (16, 1, 3, 3), 8, 1),
                                      ((2, 16, 12, 12), (48, 16, 1, 1), 1, 0), ((2, 64, 12, 12), (64, 64, 3, 3), 1, 1),
                                      ((2, 3, 20, 20), (16, 3, 3, 3), 1, 1), ((2, 16, 10, 10), (24, 16, 3, 3), 1, 1)):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    gy = np.ones(cf.conv2d(x, w, padding=pad, groups=groups).shape, np.float32)
    cf.conv2d_backward(gy, x, w, padding=pad, groups=groups, needs=(False, True, False))
    print("WGRAD " + _core.last_algorithm(), file=sys.stderr, flush=True)
"""


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVFAST_")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return proc.stderr.splitlines()


def _blocks(lines):
    """(kind, candidates, winner name, winner description) per plan or weight gradient, in order,
    and the LAYER / WGRAD markers between them."""
    out, current = [], None
    for line in lines:
        if line.startswith("convfast: plan ") or line.startswith("convfast: weight_grad "):
            current = {"kind": "plan" if " plan " in line else "wgrad", "candidates": []}
        elif current is not None and (m := re.match(r"convfast:   winner (\w+): (.*)$", line)):
            current.update(name=m.group(1), description=m.group(2))
            out.append(current)
            current = None
        elif current is not None and (m := re.match(r"convfast:   (\w+)\s+applies=(yes|no)", line)):
            current["candidates"].append(m.group(1))
        elif line.startswith("LAYER ") or line.startswith("WGRAD "):
            out.append({"kind": "marker", "description": line[6:]})
    return out


def test_verbose_lists_every_candidate_and_the_winner_that_ran():
    blocks = _blocks(_run({"CONVFAST_VERBOSE": "1"}))
    markers = [i for i, b in enumerate(blocks) if b["kind"] == "marker"]
    assert len(markers) == 14
    winners = set()
    for i in markers:
        plans = [b for b in blocks[:i] if b["kind"] != "marker"]
        assert plans, "no plan reported before a call"
        last = plans[-1]
        table = FORWARD if last["kind"] == "plan" else WEIGHT_GRAD
        assert last["candidates"] == table
        ran = blocks[i]["description"].split(" threads=")[0]
        assert last["description"].split(" threads=")[0] == ran
        winners.add((last["kind"], last["name"]))
    assert {name for kind, name in winners if kind == "plan"} == set(FORWARD)
    if convfast.supported_isas()[0] != "baseline":  # the rows kernels: the child's (best) ISA has them
        assert {name for kind, name in winners if kind == "wgrad"} == set(WEIGHT_GRAD)


def test_forced_algorithm_wins_where_it_applies():
    blocks = _blocks(_run({"CONVFAST_VERBOSE": "1", "CONVFAST_ALGO": "gemm"}))
    plans = [b for b in blocks if b["kind"] == "plan"]
    assert plans and all(b["name"] == "gemm" for b in plans)


def test_silent_without_verbose():
    assert not [line for line in _run({}) if line.startswith("convfast:")]
