"""Every result of a fixed set of seeded problems, bit for bit as recorded in
tests/data/bitwise_results.json (scripts/record_bitwise.py), for every forced algorithm setting and
every micro-kernel ISA recorded that this CPU runs: a change of the engine's structure must not change
a result, the algorithm chosen or its blocking. Re-record (and say why) only for an intended change."""
import importlib.util
import json
import os

import pytest

import convfast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
spec = importlib.util.spec_from_file_location("record_bitwise", os.path.join(ROOT, "scripts", "record_bitwise.py"))
record_bitwise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_bitwise)
RECORDED = json.load(open(os.path.join(ROOT, "tests", "data", "bitwise_results.json")))


@pytest.mark.parametrize("isa", sorted(RECORDED))
def test_results_bitwise_identical(isa):
    if isa not in convfast.supported_isas():
        pytest.skip(f"{isa} not supported on this CPU")
    failures = []
    for setting, recorded in RECORDED[isa].items():
        computed = record_bitwise.run_setting(isa, setting)
        assert computed is not None, f"{isa} could not be selected"
        for name, (sha, algorithm) in recorded.items():
            got = computed.get(name)
            if got is None:
                failures.append(f"{setting} {name}: missing")
            elif got[1] != algorithm:
                failures.append(f"{setting} {name}: algorithm {algorithm!r} -> {got[1]!r}")
            elif got[0] != sha:
                failures.append(f"{setting} {name}: result bits changed ({algorithm})")
    assert not failures, "\n".join(failures)
