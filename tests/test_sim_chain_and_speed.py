"""PipeSpec chains and SPEED in the simulator: the papers' claims and exact greedy output."""

from __future__ import annotations

import pytest

from pipesim.metrics import compute_metrics
from pipesim.scenario import ScenarioError, load_scenario
from pipesim.sim import simulate
from pipesim.sim.chain_engine import ChainSimulationEngine

CHAIN = "scenarios/pipespec-3model.yaml"
PAPER = "scenarios/paper-8node-cpu.yaml"


def chain(*sets: str):
    return load_scenario(CHAIN, list(sets))


def target_only():
    """The chain's target alone on its own four nodes, decoding iteratively."""
    return chain("strategy.name=iterative", "cluster.count=4", "placement.chain_nodes=null",
                 "models.draft=llama-3.2-1b")


@pytest.fixture(scope="module")
def target_only_run():
    trace = simulate(target_only())
    return compute_metrics(trace)["tokens_per_s"], trace.output_tokens


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("models", [2, 3])
def test_pipespec_is_never_slower_than_the_target_alone(target_only_run, alpha, models):
    rate, reference = target_only_run
    sets = [f"acceptance.chain_alphas={[alpha] * (models - 1)}"]
    if models == 2:
        sets += ["models.chain=[llama-3.2-1b]", "placement.chain_nodes=[[0],[2,3,4,5]]"]
    trace = simulate(chain(*sets))
    assert trace.output_tokens == reference
    assert compute_metrics(trace)["tokens_per_s"] >= rate


def test_asynchronous_chain_beats_the_lockstep_baseline():
    rates = {name: compute_metrics(simulate(chain(f"strategy.name={name}")))["tokens_per_s"]
             for name in ["pipespec", "pipespec-sync"]}
    assert rates["pipespec"] > rates["pipespec-sync"]


def test_pipespec_approaches_the_draft_bound_as_alpha_goes_to_one():
    rates = []
    for alpha in [0.6, 0.9, 1.0]:
        scenario = chain(f"acceptance.chain_alphas=[{alpha},{alpha}]", "workload.generate_tokens=400",
                         "cluster.overrides=[{index: 0, memory_bandwidth: 50GB/s}]")  # a slow draft node
        engine = ChainSimulationEngine(scenario)
        rates.append(compute_metrics(engine.run())["tokens_per_s"])
    draft = engine.levels[0]
    step = draft.cost.stage_cost(engine.nodes[0], draft.cost.spec.n_layers, 1, 64 + 400, 1).total
    assert rates[0] < rates[1] < rates[2] <= 1 / step * 1.001
    assert rates[2] >= 0.97 / step


@pytest.mark.parametrize("bad,message", [
    (["placement.chain_nodes=[[0],[1]]"], "chain_nodes has 2 groups for 3 models"),
    (["placement.chain_nodes=[[0],[0],[2,3]]"], "every model needs nodes of its own"),
    (["acceptance.chain_alphas=[0.9,0.5]"], "must not decrease"),
    (["models.chain=[gpt-x]"], "unknown model 'gpt-x'"),
])
def test_bad_chain_scenarios(bad, message):
    with pytest.raises(ScenarioError, match=message):
        chain(*bad)


def paper(*sets: str):
    return load_scenario(PAPER, ["strategy.name=speed", "strategy.exit_layer=20", *sets])


def test_speed_output_equals_iterative_and_costs_little_at_alpha_zero():
    iterative = simulate(load_scenario(PAPER, ["strategy.name=iterative"]))
    speed = simulate(paper("acceptance.alpha=0.0"))
    assert speed.output_tokens == iterative.output_tokens
    assert compute_metrics(speed)["tokens_per_s"] >= 0.95 * compute_metrics(iterative)["tokens_per_s"]


def test_speed_gains_grow_with_alpha_and_with_an_earlier_exit():
    rates = [compute_metrics(simulate(paper(f"acceptance.alpha={a}")))["tokens_per_s"] for a in [0.3, 0.6, 0.9]]
    assert rates[0] < rates[1] < rates[2]
    early = compute_metrics(simulate(paper("acceptance.alpha=0.9", "strategy.exit_layer=10")))["tokens_per_s"]
    assert early > rates[2]


def test_speed_needs_no_draft_model_and_checks_the_exit_layer():
    scenario = paper("models.draft=null")
    assert compute_metrics(simulate(scenario))["generated_tokens"] == 128
    with pytest.raises(ScenarioError, match="exit_layer=80 is not a layer"):
        paper("strategy.exit_layer=80")


def test_speed_takes_alpha_by_exit_layer_from_the_table():
    table = "acceptance.exit_alphas={4: 0.2, 20: 0.9}"
    assert paper(table, "strategy.exit_layer=12").acceptance_alpha() == pytest.approx(0.55)
    assert paper(table).acceptance_alpha() == 0.9
    assert paper(table, "acceptance.alpha=0.1").acceptance_alpha() == 0.9  # the table wins for speed
    assert load_scenario(PAPER, ["strategy.name=pipeinfer", table]).acceptance_alpha() == 0.7  # others: alpha
    metrics = compute_metrics(simulate(paper(table, "strategy.exit_layer=12", "workload.generate_tokens=2000")))
    assert metrics["acceptance_rate"] == pytest.approx(0.55, abs=0.04)
    with pytest.raises(ScenarioError, match=r"exit_layer=30 lies outside acceptance.exit_alphas \(layers 4..20\)"):
        paper(table, "strategy.exit_layer=30")


def test_early_exit_inside_its_stage_counts_once_in_utilization():
    trace = simulate(paper("acceptance.alpha=0.9", "strategy.exit_layer=3"))  # the exit lies on the head's stage
    exits = [r for r in trace.records if r.kind == "compute" and r.note.startswith("exit")]
    assert exits and all(r.where == "n0" for r in exits)
    assert all(0 < u <= 1 + 1e-9 for u in compute_metrics(trace)["node_utilization"].values())
