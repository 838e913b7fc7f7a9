"""Metrics-only simulation (``records=False``, ``simulate --no-records``): no records kept, the same metrics.

The tally counts records in batches while the simulation runs and folds busy spans behind a watermark; a wrong
watermark, a span folded out of order, a record kind left out or a span clipped too early would move a metric
here. The expected values are the full-records metrics of the same scenario (one pass over the kept records).
"""

from __future__ import annotations

import json
import math

import pytest

from pipesim.cli import main
from pipesim.metrics import MetricsTally, compute_metrics, token_times
from pipesim.scenario import load_scenario
from pipesim.scheduling.records import COMPUTE, TRANSFER
from pipesim.sim import engine as engine_module
from pipesim.sim.engine import SimulationEngine
from tests.golden import ROOT

CASES = [
    ("scenarios/paper-8node-cpu.yaml", ["strategy.name=pipeinfer", "workload.generate_tokens=200"]),
    ("scenarios/paper-8node-cpu.yaml", ["strategy.name=pipeinfer", "workload.generate_tokens=200",
                                        "acceptance.alpha=0.3", "head.return_mode=topk"]),
    ("scenarios/paper-8node-cpu.yaml", ["strategy.name=iterative", "workload.generate_tokens=100"]),
    ("scenarios/paper-8node-cpu.yaml", ["strategy.name=speculative", "workload.generate_tokens=200"]),
    ("scenarios/local-tiny-speed.yaml", []),  # early exits on the head's own layers
    ("scenarios/local-tiny-speed.yaml", ["strategy.exit_layer=2"]),  # on stage 1: spans nested in its forwards
    ("scenarios/local-tiny.yaml", ["cluster.count=4", "cluster.profile=reports/calibration/profile-tiny-emulated-4.yaml",
                                   "executor.compute=emulated"]),  # shared host, polling, dispatch
    ("scenarios/pipespec-3model.yaml", []),  # a chain: three heads
]
# cases that must exercise a feature, named by a record note their full trace has to hold: PipeInfer's reference
# (relayed KV transactions, one span per run and stage; cancelled runs' full traffic), with and without a shared
# host's dispatch; the draft on a node of its own (its steps recorded ahead of the head's clock, and abandoned
# drafts run on); PipeSpec's reference chain and its synchronous form
FEATURE_CASES = [
    ("scenarios/paper-8node-cpu.yaml", ["strategy.name=pipeinfer", "strategy.variant=reference",
                                        "workload.generate_tokens=120"], "kv"),
    ("scenarios/local-tiny.yaml", ["strategy.variant=reference", "cluster.count=4",
                                   "cluster.profile=reports/calibration/profile-tiny-emulated-4.yaml",
                                   "executor.compute=emulated"], "kv"),
    ("scenarios/paper-8node-cpu-draft-node.yaml", ["workload.generate_tokens=120"], "draft-request"),
    ("scenarios/paper-8node-cpu-draft-node.yaml", ["workload.generate_tokens=120", "acceptance.alpha=0.3"],
     "draft-request"),
    ("scenarios/paper-8node-cpu-draft-node.yaml", ["strategy.name=speculative", "workload.generate_tokens=60"],
     "draft-request"),
    ("scenarios/paper-8node-cpu.yaml", ["strategy.name=pipeinfer", "workload.generate_tokens=120",
                                        "placement.draft_node=3"], "draft-request"),  # the draft beside a stage
    ("scenarios/pipespec-3model.yaml", ["strategy.variant=reference"], None),
    ("scenarios/pipespec-3model.yaml", ["strategy.name=pipespec-sync", "strategy.variant=reference"], None),
]
CASES += [(path, overrides) for path, overrides, _ in FEATURE_CASES]
NEEDS = {(path, tuple(overrides)): note for path, overrides, note in FEATURE_CASES}


class _CheckedTally(MetricsTally):
    """The tally, checking the watermark's promise: no busy span counted after a watermark starts before it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.watermark: float | None = None
        self.early: list[tuple] = []

    def add(self, records, watermark=None, now=None) -> None:
        if self.watermark is not None:
            self.early += [r for r in records if r[0] in (COMPUTE, TRANSFER) and r[1] < self.watermark]
        super().add(records, watermark, now)
        if watermark is not None:
            self.watermark = watermark


@pytest.mark.parametrize("case", CASES, ids=[f"{p.split('/')[-1]}:{';'.join(o)}" for p, o in CASES])
def test_metrics_only_gives_the_metrics_of_the_records(case, monkeypatch):
    path, overrides = case
    monkeypatch.setattr(engine_module, "MetricsTally", _CheckedTally)
    scenario = load_scenario(ROOT / path, overrides)
    full = SimulationEngine(scenario).run()
    note = NEEDS.get((path, tuple(overrides)))
    if note is not None:  # the case exercises what it is here for
        assert any(r.what == note for r in full.records), note
    engine = SimulationEngine(scenario, records=False)
    engine.tally_batch = 1  # count (and fold) at every head step, so spans are folded while work is in progress
    lean = engine.run()
    assert lean.records == [] and len(full.records) > 200
    assert engine.tally.early == [], "records came before the watermark of an earlier count"
    expected, got = compute_metrics(full), compute_metrics(lean)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key == "wasted_compute_fraction":  # summed per run, exactly (fsum), instead of in record order
            assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-15)
        else:
            assert got[key] == value, key
    assert token_times(lean) == token_times(full)
    assert lean.output_tokens == full.output_tokens


def test_simulate_no_records_prints_the_same_json(capsys):
    args = ["simulate", str(ROOT / "scenarios/paper-8node-cpu.yaml"), "--set", "workload.generate_tokens=40", "--json"]
    assert main(args) == 0
    with_records = json.loads(capsys.readouterr().out)
    assert main([*args, "--no-records"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert math.isclose(without.pop("wasted_compute_fraction"), with_records.pop("wasted_compute_fraction"),
                        rel_tol=1e-12)
    assert without == with_records


def test_no_records_refuses_to_write_records(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["simulate", "--no-records", "--records", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--no-records" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _span(kind, t0, t1, where, what=""):
    return (kind, t0, t1, where, 1, 1, 0.0, 0, 0, what, -1, 0, False, False)


def test_the_tally_folds_only_behind_the_watermark():
    from pipesim.trace import Record, RecordKind, Trace

    compute, transfer = RecordKind.COMPUTE, RecordKind.TRANSFER
    # an early exit (5-6) nested in its stage's forward (4-8), which is recorded after it; a message still on the
    # link (6-9) when counted, and one the trace's end (9.5) cuts short (9-10)
    first = [_span(compute, 5.0, 6.0, "n1", "exit"), _span(transfer, 6.0, 9.0, "n1->n0")]
    second = [_span(compute, 4.0, 8.0, "n1", "stage"), _span(transfer, 9.0, 10.0, "n1->n0")]
    trace = Trace("simulated", "x", "s", ["n0", "n1"], 0.0, 9.5, records=[])
    tally = MetricsTally(0.0, in_order=False)
    tally.add(first, watermark=4.0, now=6.5)  # the forward in progress started at 4: nothing before 4 is to come
    tally.add(second, watermark=8.0, now=8.0)
    trace.summary = tally
    got = compute_metrics(trace)
    assert got["node_utilization"] == {"n0": 0.0, "n1": 4.0 / 9.5}  # the union: 4-8
    assert got["link_utilization"] == {"n1->n0": 3.5 / 9.5}  # 6-9 and 9-9.5
    full = Trace("simulated", "x", "s", ["n0", "n1"], 0.0, 9.5,
                 records=[Record(*r) for r in first + second])
    assert compute_metrics(full)["node_utilization"] == got["node_utilization"]
    wrong = MetricsTally(0.0, in_order=False)
    wrong.add(first, watermark=6.5, now=6.5)  # claims nothing before 6.5 is to come: the exit is folded
    with pytest.raises(RuntimeError, match="came after"):
        wrong.add(second, watermark=8.0, now=8.0)
