"""Closed forms against the simulator: iterative exactly (within 1%), speculative at its deterministic limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesim.metrics import compute_metrics
from pipesim.reports.analytic import PipelineCosts, analytic_columns, expected_tokens_per_verification
from pipesim.scenario import load_scenario
from pipesim.sim import simulate

PAPER = Path(__file__).resolve().parents[1] / "scenarios" / "paper-8node-cpu.yaml"


def paper(*overrides: str):
    return load_scenario(PAPER, ["workload.generate_tokens=48", *overrides])


@pytest.mark.parametrize("overrides", [
    ("network.bandwidth=10Mbit/s",),
    ("network.bandwidth=1Gbit/s",),
    ("network.bandwidth=100Gbit/s", "network.latency=2ms"),
    ("cluster.count=1", "placement.layer_split=null"),
    ("cluster.count=3", "placement.layer_split=null", "head.verify_overhead=5ms", "head.return_mode=topk"),
    ("cluster.overrides=[{index: 2, flops: 100G, memory_bandwidth: 5GB/s}]",),
    ("network.links=[{between: [3, 4], bandwidth: 10Mbit/s}]", "workload.prompt_tokens=500"),
], ids=lambda o: ",".join(o))
def test_iterative_closed_form_matches_the_simulator_within_1_percent(overrides):
    scenario = paper("strategy.name=iterative", *overrides)
    metrics = compute_metrics(simulate(scenario))
    columns = analytic_columns(scenario)
    assert columns["analytic_tokens_per_s"] == pytest.approx(metrics["tokens_per_s"], rel=0.01)
    assert columns["analytic_ttft_s"] == pytest.approx(metrics["ttft_s"], rel=0.01)


@pytest.mark.parametrize("bandwidth", ["30Mbit/s", "10Gbit/s"])
def test_speculative_with_every_draft_rejected_is_one_token_per_iteration(bandwidth):
    scenario = paper("strategy.name=speculative", "acceptance.alpha=0", f"network.bandwidth={bandwidth}")
    metrics = compute_metrics(simulate(scenario))
    assert analytic_columns(scenario)["analytic_tokens_per_s"] == pytest.approx(metrics["tokens_per_s"], rel=0.01)


def test_speculative_with_every_draft_accepted_is_close():
    """α=1: γ+1 tokens per iteration; the simulator pays the draft's prompt pass and a cut-short last iteration."""
    scenario = paper("strategy.name=speculative", "acceptance.alpha=1", "workload.generate_tokens=128")
    metrics = compute_metrics(simulate(scenario))
    rate = analytic_columns(scenario)["analytic_tokens_per_s"]
    assert metrics["tokens_per_s"] < rate < metrics["tokens_per_s"] * 1.08


def test_expected_tokens_per_verification():
    assert expected_tokens_per_verification(0.0, 4) == 1.0
    assert expected_tokens_per_verification(1.0, 4) == 5.0
    assert expected_tokens_per_verification(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_speculative_formula_uses_the_same_costs():
    scenario = paper("strategy.name=speculative")
    costs = PipelineCosts.of(scenario)
    gamma, context = scenario.strategy.gamma, 128 + 24
    iteration = gamma * costs.draft_step(1, context) + costs.pass_time(gamma + 1, context, gamma + 1)
    assert costs.speculative_tokens_per_s() == pytest.approx(expected_tokens_per_verification(0.7, gamma) / iteration)
    assert costs.speculative_tokens_per_s(alpha=0.9) > costs.speculative_tokens_per_s(alpha=0.5)


def test_pipeinfer_has_no_closed_form_but_a_ttft():
    columns = analytic_columns(paper("strategy.name=pipeinfer"))
    assert columns["analytic_tokens_per_s"] is None
    assert columns["analytic_ttft_s"] > 0
