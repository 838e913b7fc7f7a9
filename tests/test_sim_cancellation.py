"""PipeInfer's cancellations in the simulator: noticed when a stage looks, as in the executor."""

from __future__ import annotations

import math
from collections import defaultdict

from pipesim.scenario import load_scenario
from pipesim.sim import simulate
from pipesim.world.profile import HardwareProfile, NodeCoefficients

LAYER_FIXED, LAYER_PER_TOKEN = 1e-3, 2e-4  # per layer of a run of n tokens: LAYER_FIXED + n * LAYER_PER_TOKEN


def _trace(tmp_path, poll=None):
    nodes = {f"n{i}": NodeCoefficients(layer_fixed=LAYER_FIXED, layer_per_token=LAYER_PER_TOKEN, head_fixed=2e-3,
                                       head_per_output=5e-4, draft_fixed=3e-3, draft_per_token=1e-4,
                                       host=f"box{i}") for i in range(4)}
    path = HardwareProfile("llama-2-7b", nodes, {}, verify_overhead=1e-4, poll=poll).save(
        tmp_path / f"p{bool(poll)}.yaml")
    scenario = load_scenario("pipesim/data/default.yaml", [f"cluster.profile={path}", "strategy.name=pipeinfer",
                                                           "workload.generate_tokens=40", "acceptance.alpha=0.3"])
    return simulate(scenario)


def test_a_computing_stage_notices_cancellations_at_layer_boundaries(tmp_path):
    trace = _trace(tmp_path)
    computes = defaultdict(list)
    for r in trace.records:
        if r.kind == "compute" and r.what == "stage":
            computes[r.where].append(r)
    inside = 0
    for seen in (r for r in trace.records if r.kind == "cancel_seen"):
        for c in computes[seen.where]:
            # noticed while computing (an abort ends its record where it noticed): only where a layer ends; at the
            # very end of a forward that ran to completion the stage looks anyway, after its output layer
            if c.t0 < seen.t0 < c.t1 or (seen.t0 == c.t1 and c.aborted):
                layers = (seen.t0 - c.t0) / (LAYER_FIXED + c.n_tokens * LAYER_PER_TOKEN)
                assert math.isclose(layers, round(layers), abs_tol=1e-6) and round(layers) >= 1, (seen, c)
                inside += 1
    assert inside > 0  # the case happened
    for c in (c for cs in computes.values() for c in cs if c.aborted):
        layers = (c.t1 - c.t0) / (LAYER_FIXED + c.n_tokens * LAYER_PER_TOKEN)
        assert math.isclose(layers, round(layers), abs_tol=1e-6), c  # an abort stops at a layer boundary


def test_cancellations_travel_from_the_last_stage_back_to_stage_one(tmp_path):
    trace = _trace(tmp_path)
    seen: dict[int, dict[str, float]] = defaultdict(dict)
    for r in trace.records:
        if r.kind == "cancel_seen":
            seen[r.run_id].setdefault(r.where, r.t0)
    sent = {r.run_id: r.t0 for r in trace.records if r.kind == "cancel_sent"}
    assert sent and set(seen) <= set(sent) and len(seen) > len(sent) // 2  # the last ones may end with the job
    for run_id, at in seen.items():
        assert sent[run_id] < at["n3"] < at["n2"] < at["n1"], (run_id, at)  # each hop crosses a link
