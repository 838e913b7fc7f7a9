"""The simulator reproduces its golden traces (``tests/golden_traces.json``; see ``tests/golden.py``)."""

from __future__ import annotations

import json
import math

import pytest

from tests.golden import CASES, GOLDEN_FILE, golden_entry

GOLDEN = json.loads(GOLDEN_FILE.read_text())


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_golden_trace_reproduces(case):
    expected = GOLDEN[case[0]]
    got = golden_entry(case)
    for key, value in expected["metrics"].items():
        assert _close(got["metrics"][key], value), f"{key}: {got['metrics'][key]} != golden {value}"
    for node, value in expected["node_utilization"].items():
        assert _close(got["node_utilization"][node], value), f"utilization of {node}"
    assert got["record_counts"] == expected["record_counts"]
    assert got["output_digest"] == expected["output_digest"]
    assert got["records_digest"] == expected["records_digest"]


def test_every_strategy_has_a_golden_case():
    from pipesim.scenario import STRATEGY_NAMES, load_scenario
    from tests.golden import ROOT

    covered = {load_scenario(ROOT / path, overrides).strategy.name for _name, path, overrides in CASES}
    assert covered == set(STRATEGY_NAMES)
