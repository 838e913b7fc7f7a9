"""The draft on any node (``placement.draft_node``): validation, memory, the exchange's cost, greedy equivalence.

The draft on a node of its own as PipeInfer's script runs it (7 target ranks + 1 draft rank), in the simulator
and in the executor with emulated compute on 8 ranks.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from pipesim import cli
from pipesim.executor.errors import ExecutorSetupError
from pipesim.executor.plan import make_plan
from pipesim.executor.protocol import TAG_DRAFT, describe, frame
from pipesim.executor.remote_draft import decode_reply, decode_request, encode_reply, encode_request
from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.sim import simulate
from pipesim.world.memory import MemoryFitError, check_memory_fit, memory_plan

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper-8node-cpu.yaml"
DRAFT_NODE = ROOT / "scenarios" / "paper-8node-cpu-draft-node.yaml"
SPLIT7 = [0.1, 0.15, 0.15, 0.15, 0.15, 0.15, 0.15]


def small(*sets: str) -> list[str]:
    return ["workload.prompt_tokens=8", "workload.generate_tokens=24", *sets]


# -- the scenario ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sets, message", [
    (["placement.draft_node=8"], "placement.draft_node=8 is not a node (cluster.count=8: nodes 0..7)"),
    (["placement.layer_split=[0, 0.2, 0.1, 0.1, 0.1, 0.2, 0.2, 0.1]", "placement.draft_node=0"],
     "placement.layer_split[0]=0: the head (node 0) holds the first target layers"),
    (["placement.layer_split=[0.1, 0.15, 0, 0.15, 0.15, 0.15, 0.15, 0.15]", "placement.draft_node=7"],
     "placement.layer_split[2]=0: only the draft node (placement.draft_node=7) may hold no target layers"),
    (["placement.layer_split=[0.1, 0.15, 0.15, 0.15, 0.15, 0.15, 0.15, -0.1]"], "placement.layer_split.7=-0.1"),
])
def test_bad_draft_placement_is_one_line_naming_the_field(sets, message, capsys):
    argv = ["simulate", str(PAPER)]
    for assignment in sets:
        argv += ["--set", assignment]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_draft_node_with_no_layers_is_not_a_stage():
    scenario = load_scenario(DRAFT_NODE)
    assert scenario.placement.draft_node == 7 and scenario.target_nodes() == list(range(7))
    trace = simulate(load_scenario(DRAFT_NODE, small()))
    # 80 layers over 0.1 + 6 x 0.15: rounded cumulative boundaries 8, 20, 32, 44, 56, 68 (by hand)
    assert [tuple(r) for r in trace.meta["layer_ranges"]] == [(0, 8), (8, 20), (20, 32), (32, 44), (44, 56),
                                                              (56, 68), (68, 80)]
    stage_nodes = {r.where for r in trace.records if r.kind == "compute" and r.what == "stage"}
    assert stage_nodes == {f"n{i}" for i in range(7)}
    draft_nodes = {r.where for r in trace.records if r.kind == "compute" and r.what == "draft"}
    assert draft_nodes == {"n7"} and trace.meta["draft_node"] == 7


# -- memory ----------------------------------------------------------------------------------------------

def test_moving_the_draft_off_the_head_moves_exactly_its_memory():
    on_head = load_scenario(PAPER, ["cluster.count=7", f"placement.layer_split={SPLIT7}"])
    own_node = load_scenario(DRAFT_NODE)
    head_plan, own_plan = memory_plan(on_head), memory_plan(own_node)
    assert [n.layers for n in own_plan[:7]] == [n.layers for n in head_plan]
    assert own_plan[7].layers == (0, 0) and own_plan[7].needed > 0
    for k in ("weights", "kv_cache", "activations"):
        assert getattr(head_plan[0], k) == pytest.approx(getattr(own_plan[0], k) + getattr(own_plan[7], k))
    for a, b in zip(head_plan[1:], own_plan[1:7], strict=True):
        assert a.needed == b.needed
    # TinyLlama-1.1B at q4_k_m is well under a gigabyte of weights and well over 100 MB
    assert 1e8 < own_plan[7].weights < 1e9


def test_a_draft_node_too_small_is_named():
    scenario = load_scenario(DRAFT_NODE, ["cluster.overrides=[{index: 7, memory: 100MB}]"])
    with pytest.raises(MemoryFitError, match=r"node n7 \(no target layers\) needs"):
        check_memory_fit(scenario)


# -- the exchange's cost in the simulator ----------------------------------------------------------------

def _speculative_on_draft_node(link: str, *extra: str):
    sets = small("strategy.name=speculative", "strategy.gamma=4", "acceptance.alpha=1.0",
                 f"network.links=[{{between: [0, 7], {link}}}]", *extra)
    return simulate(load_scenario(DRAFT_NODE, sets))


def test_each_draft_pays_the_head_draft_link_latency_twice():
    """Synchronous speculation, every draft accepted: each draft sends one request to the draft node and
    waits for the last step's reply; the steps run back to back on the draft node, so a draft costs the head
    the request's and the last reply's latency once each (2 x 10 ms more at 10 ms than at 0)."""
    fast, slow = _speculative_on_draft_node("latency: 0us"), _speculative_on_draft_node("latency: 10ms")
    assert fast.output_tokens == slow.output_tokens
    drafts = sum(1 for r in slow.records if r.kind == "transfer" and r.what == "draft-request")
    assert drafts == compute_metrics(slow)["runs_speculative"] > 0  # one draft per verified run
    assert slow.t_end - fast.t_end == pytest.approx(drafts * 2 * 10e-3, rel=1e-6)


def test_the_draft_request_carries_the_tokens_the_draft_has_not_seen():
    """At a slow head-draft link the first request costs its bytes: it carries the prompt and the token the prefill
    sampled, 8 bytes each after the 3-value frame prefix and the 6-value header."""
    one, two = (_speculative_on_draft_node("latency: 0us, bandwidth: 1MB/s", f"workload.prompt_tokens={n}")
                for n in (8, 108))
    first = [next(r for r in t.records if r.kind == "transfer" and r.what == "draft-request") for t in (one, two)]
    assert [r.nbytes for r in first] == [8 * (3 + 6 + 9), 8 * (3 + 6 + 109)]
    assert first[1].t1 - first[1].t0 == pytest.approx(8 * (3 + 6 + 109) / 1e6)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_speculative_closed_form_with_the_draft_on_its_own_node(alpha):
    """Every draft rejected (or accepted): one (or γ+1) tokens per iteration; the closed form adds the
    request and the last reply per iteration, and matches the simulator at a 5 ms head-draft link."""
    from pipesim.reports.analytic import analytic_columns

    scenario = load_scenario(DRAFT_NODE, ["workload.generate_tokens=48" if alpha == 0 else "workload.generate_tokens=128",
                                          "strategy.name=speculative", f"acceptance.alpha={alpha}",
                                          "network.links=[{between: [0, 7], latency: 5ms, bandwidth: 10Mbit/s}]"])
    simulated = compute_metrics(simulate(scenario))["tokens_per_s"]
    rate = analytic_columns(scenario)["analytic_tokens_per_s"]
    if alpha == 0:
        assert rate == pytest.approx(simulated, rel=0.01)
    else:  # as on the head (test_reports_analytic): the draft's prompt pass and a cut-short last iteration
        assert simulated < rate < simulated * 1.08


@pytest.mark.parametrize("variant", ["reference", "continuous"])
def test_the_draft_node_computes_one_step_at_a_time_and_replies_to_each(variant):
    for alpha in (0.3, 0.95):
        trace = simulate(load_scenario(DRAFT_NODE, small(f"strategy.variant={variant}", f"acceptance.alpha={alpha}")))
        steps = sorted((r.t0, r.t1) for r in trace.records if r.kind == "compute" and r.what == "draft")
        assert all(later[0] >= earlier[1] - 1e-12 for earlier, later in zip(steps, steps[1:], strict=False))
        replies = [r for r in trace.records if r.what == "draft-reply"]
        requests = [r for r in trace.records if r.what == "draft-request"]
        assert len(replies) == len(steps) <= 3 * len(requests)  # micro_batch 3: at most 3 steps per draft
        assert {r.where for r in replies} == {"n7->n0"} and {r.where for r in requests} == {"n0->n7"}


def test_draft_node_zero_records_the_draft_on_the_head():
    trace = simulate(load_scenario(PAPER, small("strategy.name=speculative")))
    assert {r.where for r in trace.records if r.kind == "compute" and r.what == "draft"} == {"n0"}
    assert not [r for r in trace.records if r.what in ("draft-request", "draft-reply")]


# -- greedy equivalence in the simulator -----------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["speculative", "pipeinfer"])
@pytest.mark.parametrize("placement", [
    [],  # the draft on node 7, which holds no target layers
    ["placement.layer_split=null", "placement.draft_node=3"],  # the draft on a node that also holds a stage
])
def test_simulated_output_equals_target_only_decoding(strategy, placement):
    outputs = set()
    for seed in (0, 1, 2):
        for alpha in (0.0, 0.4, 0.9):
            sets = small(f"strategy.name={strategy}", f"workload.seed={seed}", f"acceptance.alpha={alpha}",
                         *placement)
            outputs.add((seed, tuple(simulate(load_scenario(DRAFT_NODE, sets)).output_tokens)))
    for seed in (0, 1, 2):
        target_only = simulate(load_scenario(DRAFT_NODE, small("strategy.name=iterative", f"workload.seed={seed}",
                                                               *placement))).output_tokens
        assert {out for s, out in outputs if s == seed} == {tuple(target_only)}
        assert len(target_only) == 24


# -- the executor ----------------------------------------------------------------------------------------

def test_exchange_messages_round_trip_with_the_bytes_the_simulator_charges():
    from pipesim.world.draft_exchange import reply_bytes, request_bytes

    request = encode_request(5, 17, 3, 0.25, [11, 12, 13, 14])
    assert decode_request(request) == (5, 17, 3, 0.25, [11, 12, 13, 14])
    assert decode_request(encode_request(6, 0, 2, None, [9]))[3] is None
    reply = encode_reply(5, 2, 4242, 0.875, 1)
    assert decode_reply(reply) == (5, 2, 4242, 0.875, 1)
    assert frame(request, 0.0, None).nbytes == request_bytes(4) == 8 * (3 + 6 + 4)
    assert frame(reply, 0.0, None).nbytes == reply_bytes() == 8 * (3 + 25)
    assert describe(TAG_DRAFT, request, False)[0] == "draft-request"
    assert describe(TAG_DRAFT, reply, False)[0] == "draft-reply"


def test_executor_plan_puts_the_draft_on_its_own_rank():
    plan = make_plan(load_scenario(DRAFT_NODE, ["executor.compute=emulated"]), 8)
    assert plan.draft_rank == 7 and plan.pipelines[0].ranks == list(range(7))
    assert plan.layer_ranges[7] == (0, 0)
    with pytest.raises(ExecutorSetupError, match=r"placement.draft_node=3: the executor runs a draft off the head "
                                                 r"on a rank of its own"):
        make_plan(load_scenario(PAPER, ["executor.compute=emulated", "placement.draft_node=3"]), 8)


def _mpiexec_available() -> bool:
    return (Path(sys.executable).parent / "mpiexec").is_file() or shutil.which("mpiexec") is not None


@pytest.mark.mpi
@pytest.mark.skipif(not _mpiexec_available(), reason="mpiexec not found (pip install mpich mpi4py)")
def test_executor_draft_rank_on_8_emulated_ranks_equals_target_only(tmp_path):
    from .test_executor_mpi import run_job

    # the paper's placement on nodes 100x faster than its CPUs, so the emulated 70B target sleeps milliseconds
    sets = ("executor.compute=emulated", "workload.prompt_tokens=8", "workload.generate_tokens=10",
            "executor.timeout_s=60", "cluster.memory_bandwidth=4TB/s", "cluster.flops=50T")
    variants = ["strategy.name=iterative", "strategy.name=speculative", "strategy.name=pipeinfer",
                "strategy.name=pipeinfer;acceptance.alpha=0.3;workload.seed=1",
                "strategy.name=pipeinfer;executor.link_emulation=true;network.latency=2ms"]
    entries = run_job(DRAFT_NODE, 8, variants, tmp_path, *sets)
    target_only = entries[0]["metrics"]["output_tokens"]
    for entry in entries:
        trace = entry["trace"]
        assert trace["meta"]["matches_reference"] is True, entry["variant"]
        assert len(entry["metrics"]["output_tokens"]) == 10
        drafts = {r[3] for r in trace["records"] if r[0] == "compute" and r[9] == "draft"}
        stages = {r[3] for r in trace["records"] if r[0] == "compute" and r[9] == "stage"}
        assert stages == {f"n{i}" for i in range(7)}, entry["variant"]
        assert trace["meta"]["draft_node"] == 7
        if "iterative" not in entry["variant"]:
            assert drafts == {"n7"}, entry["variant"]  # the draft rank computes, the head waits
            assert any(r[0] == "transfer" and r[3] == "n7->n0" and r[9] == "draft-reply" for r in trace["records"])
    for entry in (entries[1], entries[2], entries[4]):
        assert entry["metrics"]["output_tokens"] == target_only
    # the same scenario simulated commits the same tokens, and (synchronous speculation: the same drafts in both
    # engines) its head and draft node exchange the same messages of the same bytes
    simulated = simulate(load_scenario(DRAFT_NODE, [*sets, "strategy.name=speculative"]))
    assert entries[1]["metrics"]["output_tokens"] == simulated.output_tokens
    measured = sorted((r[9], r[6]) for r in entries[1]["trace"]["records"]
                      if r[0] == "transfer" and r[9].startswith("draft-"))
    modelled = sorted((r.what, r.nbytes) for r in simulated.records if r.kind == "transfer"
                      and r.what.startswith("draft-"))
    assert measured == modelled and len(modelled) > 10


@pytest.mark.mpi
@pytest.mark.skipif(not _mpiexec_available(), reason="mpiexec not found (pip install mpich mpi4py)")
def test_executor_real_draft_model_on_its_own_rank(tmp_path):
    """The tiny model over 2 target ranks and a draft rank (real compute): a draft model with the target's own
    weights proposes the target's tokens (every draft accepted); the output equals the oracle run's, which
    matches target-only decoding."""
    from .test_executor_mpi import by_variant, run_job

    tiny = ROOT / "scenarios" / "local-tiny.yaml"
    model = "strategy.name=speculative;executor.draft=model;executor.draft_model=tiny-llama@0;strategy.min_confidence=0"
    oracle = "strategy.name=pipeinfer;acceptance.alpha=0.6"
    entries = by_variant(run_job(tiny, 3, [model, oracle], tmp_path, "cluster.count=3", "placement.draft_node=2",
                                 "placement.layer_split=[0.5, 0.5, 0]", "workload.generate_tokens=20"))
    assert entries[oracle]["trace"]["meta"]["matches_reference"] is True
    assert entries[model]["metrics"]["output_tokens"] == entries[oracle]["metrics"]["output_tokens"]
    assert entries[model]["metrics"]["acceptance_rate"] == 1.0
    for entry in entries.values():
        assert {r[3] for r in entry["trace"]["records"] if r[0] == "compute" and r[9] == "draft"} == {"n2"}
