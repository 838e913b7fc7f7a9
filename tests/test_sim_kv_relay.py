"""The simulator's relay of PipeInfer's reference KV transactions: pipelined as ggml-mpi.c relays them (a rank
passes each transaction on before applying it), or serial (each stage the whole burst when the run reaches it).
Expected times are closed forms from the scenario's figures (transaction time, link latency and bandwidth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesim.scenario import load_scenario
from pipesim.sim import simulate

PAPER = Path(__file__).resolve().parents[1] / "scenarios" / "paper-8node-cpu.yaml"
EACH = 1e-3  # s per transaction: large, so the bursts dominate and the figures are easy to read
LATENCY = 2e-4
BANDWIDTH = 1e9 / 8  # 1 Gbit/s in bytes/s
TX_BYTES = 24  # what one transaction adds to a hop (the engine's documented KV_TRANSACTION_BYTES)


def kv_records(relay: str):
    scenario = load_scenario(PAPER, ["strategy.name=pipeinfer", "workload.generate_tokens=6",
                                     f"cluster.kv_transaction_time={EACH}", f"cluster.kv_relay={relay}",
                                     f"network.latency={LATENCY}", "network.bandwidth=1Gbit/s"])
    records = [r for r in simulate(scenario).records if r.kind == "compute" and r.what == "kv"]
    nodes = [f"n{i}" for i in range(8)]
    return records, nodes


def first_burst(records, nodes):
    """The first run with relayed transactions: the single-token run after the synchronous prefill, which meets
    every stage idle. Its kv record on each node, in pipeline order."""
    run_id = min(r.run_id for r in records)
    by_node = {r.where: r for r in records if r.run_id == run_id}
    return [by_node[node] for node in nodes]


def test_a_pipelined_burst_ends_one_hop_and_one_transaction_later_at_each_stage():
    records, nodes = kv_records("pipelined")
    burst = first_burst(records, nodes)
    n = burst[0].n_tokens
    assert n == 1000 + 2  # begin_async_run's seq_rm of sequences 0..max_seq (max_seq = 1000 + 1)
    hop = LATENCY + TX_BYTES / BANDWIDTH
    begin = burst[0].t0
    assert burst[0].t1 == pytest.approx(begin + n * EACH)
    for i, record in enumerate(burst[1:], start=1):  # idle stages: begun a hop after the previous one began
        assert record.t0 == pytest.approx(begin + i * hop, abs=1e-12)
        assert record.t1 == pytest.approx(begin + n * EACH + i * (hop + EACH), abs=1e-12)
    # all eight stages together take about one burst, not eight
    assert burst[-1].t1 - begin < 1.01 * n * EACH


def test_a_serial_burst_takes_the_whole_time_at_every_stage_after_the_run_arrives():
    records, nodes = kv_records("serial")
    burst = first_burst(records, nodes)
    n = burst[0].n_tokens
    for record in burst:
        assert record.t1 - record.t0 == pytest.approx(n * EACH)
    for before, after in zip(burst, burst[1:], strict=False):
        assert after.t0 > before.t1  # the run (behind the burst) is computed and sent on first
    assert burst[-1].t1 - burst[0].t0 > 8 * n * EACH


def test_the_relay_is_named_in_errors():
    from pipesim.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="cluster.kv_relay"):
        load_scenario(PAPER, ["cluster.kv_relay=parallel"])
