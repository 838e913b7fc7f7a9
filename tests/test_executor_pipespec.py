"""PipeSpec chains in the executor: each model on its own ranks, level heads exchanging the chain's messages.

Each fixture is one ``pipesim run`` job with many generations (``--variant``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipesim.executor.errors import ExecutorSetupError
from pipesim.executor.plan import make_plan
from pipesim.executor.protocol import TAG_CHAIN, decode_chain, describe, encode_chain
from pipesim.scenario import load_scenario
from pipesim.scheduling import Run
from pipesim.scheduling.strategies.pipespec import (
    LockstepLevel,
    PipeSpecLevel,
    SendProgress,
    SendRollback,
    SendTokens,
    StartRound,
    make_level,
)
from pipesim.world.acceptance import AcceptanceModel, SyntheticTokens, level_predictor

from .test_executor_mpi import by_variant, run_job, run_pipesim

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ROOT / "scenarios" / "local-tiny-chain.yaml"
SEEDS = (0, 1)
CHAIN_ALPHAS = ("[0.0, 0.0]", "[0.5, 0.8]", "[1.0, 1.0]")
STRATEGIES = ("pipespec", "pipespec-sync")
N_TOKENS = 40


# -- pieces without MPI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    SendTokens(2, 3, 17, (5, 6, 7), round=4), SendRollback(0, (1, 2, 3, 4)), SendProgress(1, 2, 33),
    StartRound(1, 9, (8, 9)), None])
def test_chain_messages_round_trip(message):
    body = encode_chain(message)
    assert decode_chain(body) == message
    assert describe(TAG_CHAIN, body, False)[0] == (type(message).__name__ if message is not None else "finish")


def test_levels_draw_unique_run_ids():
    params = {"lookahead": 4, "max_verify": 8, "synchronous": False}
    levels = [make_level(i, 3, [1, 2, 3], 10, **params) for i in range(3)]
    assert all(isinstance(level, PipeSpecLevel) for level in levels)
    ids = [next(level._run_ids) for level in levels for _ in range(4)]
    assert len(set(ids)) == len(ids)
    assert isinstance(make_level(0, 2, [1], 5, **{**params, "synchronous": True}), LockstepLevel)


def test_oracle_predictor_couples_the_levels():
    tokens = SyntheticTokens(256, 0)
    acceptance = AcceptanceModel("iid", 0.5, seed=4)
    uniform = acceptance.uniform
    positions = list(range(10, 15))
    run = Run(run_id=1, tokens=[tokens.token(p) for p in positions], positions=positions, seq_ids=(0,),
              speculative=True, output_from=0)
    low, high = level_predictor(tokens, acceptance, 0.3)(run), level_predictor(tokens, acceptance, 0.8)(run)
    for p, a, b in zip(range(11, 16), low, high, strict=True):
        assert (a == tokens.token(p)) == (uniform(p) < 0.3) and (b == tokens.token(p)) == (uniform(p) < 0.8)
        assert a in (tokens.token(p), tokens.wrong(p)) and (a == b or a == tokens.wrong(p))


@pytest.mark.parametrize("overrides, ranks, message", [
    (["placement.chain_nodes=[[0], [1], [3]]", "cluster.count=4"], 4, "must use every rank"),
    (["executor.chain_models=[tiny-llama@1]"], 3, "executor.chain_models has 1 models for the 2 draft models"),
    (["executor.chain_models=null", "executor.draft=model"], 3, "needs executor.chain_models"),
    (["executor.compute=emulated"], 3, "executor.chain_models runs real draft models"),
])
def test_bad_chain_settings_are_one_clear_error(overrides, ranks, message):
    with pytest.raises(ExecutorSetupError, match=message) as info:
        make_plan(load_scenario(CHAIN, overrides), ranks)
    assert "\n" not in str(info.value)


def test_chain_plan_groups_ranks_by_level():
    plan = make_plan(load_scenario(CHAIN, ["executor.chain_models=null", "executor.compute=emulated",
                                           "models.target=llama-2-7b", "cluster.count=6",
                                           "placement.chain_nodes=[[0], [1], [2, 3, 4, 5]]"]), 6)
    assert [level.ranks for level in plan.levels] == [[0], [1], [2, 3, 4, 5]]
    assert plan.levels[-1].is_target and plan.layer_ranges[2:] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert plan.level_of(4).index == 2 and plan.oracle


# -- 3 tiny random models, real compute, 3 ranks ------------------------------------------------------------

def chain_variant(seed: int, strategy: str, alphas: str | None = None, extra: str = "") -> str:
    parts = [f"executor.seed={seed}", f"workload.seed={seed}", f"strategy.name={strategy}"]
    if alphas is not None:
        parts.append(f"acceptance.chain_alphas={alphas}")
    return ";".join(parts) + (f";{extra}" if extra else "")


CHAIN_VARIANTS = [
    *(chain_variant(seed, "iterative") for seed in SEEDS),
    *(chain_variant(seed, strategy, alphas) for seed in SEEDS for strategy in STRATEGIES for alphas in CHAIN_ALPHAS),
    # real draft models (random weights: they disagree with the target), and oracle drafts of emulated cost
    *(chain_variant(0, strategy, extra="executor.draft=model") for strategy in STRATEGIES),
    *(chain_variant(0, strategy, "[0.5, 0.8]", "executor.chain_models=null") for strategy in STRATEGIES),
]


@pytest.fixture(scope="module")
def chain_job(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("chain")
    return by_variant(run_job(CHAIN, 3, CHAIN_VARIANTS, tmp, f"workload.generate_tokens={N_TOKENS}"))


@pytest.mark.mpi
def test_chain_greedy_output_equals_target_only_decoding(chain_job):
    for seed in SEEDS:
        baseline = chain_job[chain_variant(seed, "iterative")]["metrics"]["output_tokens"]
        assert len(baseline) == N_TOKENS
        for strategy in STRATEGIES:
            for alphas in CHAIN_ALPHAS:
                entry = chain_job[chain_variant(seed, strategy, alphas)]
                assert entry["metrics"]["output_tokens"] == baseline, (seed, strategy, alphas)
                assert entry["trace"]["meta"]["matches_reference"] is True
    baseline = chain_job[chain_variant(0, "iterative")]["metrics"]["output_tokens"]
    for variant in CHAIN_VARIANTS[-4:]:
        assert chain_job[variant]["metrics"]["output_tokens"] == baseline, variant


@pytest.mark.mpi
def test_chain_acceptance_follows_the_oracle(chain_job):
    for seed in SEEDS:
        perfect = chain_job[chain_variant(seed, "pipespec-sync", "[1.0, 1.0]")]["metrics"]
        assert perfect["drafted_checked"] > 0 and perfect["acceptance_rate"] >= 0.9
        wrong = chain_job[chain_variant(seed, "pipespec-sync", "[0.0, 0.0]")]["metrics"]
        assert wrong["drafted_accepted"] == 0


@pytest.mark.mpi
def test_chain_trace_has_every_level_and_its_messages(chain_job):
    trace = chain_job[chain_variant(0, "pipespec", "[0.5, 0.8]")]["trace"]
    records = trace["records"]
    assert trace["meta"]["chain_nodes"] == [[0], [1], [2]] and trace["nodes"] == ["n0", "n1", "n2"]
    launches = {r[3] for r in records if r[0] == "launch"}
    assert launches == {"n0", "n1", "n2"}
    tokens = [r for r in records if r[0] == "tokens"]
    assert {r[3] for r in tokens} == {"n2"} and sum(r[5] for r in tokens) == N_TOKENS
    notes = {r[9] for r in records if r[0] == "transfer"}
    assert {"SendTokens", "SendProgress"} <= notes
    rollbacks = sum(chain_job[chain_variant(seed, "pipespec", "[0.5, 0.8]")]["metrics"]["runs_cancelled"] +
                    sum(1 for r in chain_job[chain_variant(seed, "pipespec", "[0.5, 0.8]")]["trace"]["records"]
                        if r[0] == "transfer" and r[9] == "SendRollback") for seed in SEEDS)
    assert rollbacks > 0
    assert all(trace["t_start"] <= r[1] <= trace["t_end"] for r in tokens)


# -- emulated compute: 6 ranks, the target over 4 -----------------------------------------------------------

EMULATED = """
name: emulated-chain-6
models: {target: llama-2-7b, target_quantization: q4_k_m, chain: ["tinyllama-1.1b:q4_k_m", "llama-2-7b:q4_k_m"]}
cluster: {count: 6, flops: 20T, memory_bandwidth: 1TB/s}
network: {bandwidth: 10Gbit/s, latency: 50us}
placement: {chain_nodes: [[0], [1], [2, 3, 4, 5]]}
acceptance: {alpha: 0.7, chain_alphas: [0.6, 0.9]}
workload: {prompt_tokens: 32, generate_tokens: 40}
strategy: {name: pipespec, lookahead: 4, max_verify: 8}
executor: {compute: emulated, timeout_s: 60}
"""


@pytest.mark.mpi
def test_emulated_chain_on_6_ranks(tmp_path):
    scenario = tmp_path / "emulated.yaml"
    scenario.write_text(EMULATED)
    variants = ["strategy.name=pipespec", "strategy.name=pipespec-sync",
                "strategy.name=pipespec;executor.link_emulation=true;head.return_mode=topk"]
    entries = run_job(scenario, 6, variants, tmp_path)
    for entry in entries:
        assert entry["trace"]["meta"]["matches_reference"] is True, entry["variant"]
        assert entry["metrics"]["generated_tokens"] == 40
        stages = {r[3] for r in entry["trace"]["records"] if r[0] == "compute"}
        assert stages == {f"n{k}" for k in range(6)}, entry["variant"]
        assert entry["metrics"]["acceptance_rate"] > 0.5


@pytest.mark.mpi
def test_a_failing_rank_ends_a_chain_job_quickly():
    start = time.monotonic()
    result = run_pipesim(str(CHAIN), "--ranks", "3", "--set", "executor.compute=emulated",
                         "--set", "executor.chain_models=null", "--set", "executor.fault_rank=1", timeout=60)
    assert result.returncode != 0
    assert "rank 1: InjectedFault: injected fault at run" in result.stderr
    assert time.monotonic() - start < 30


def test_an_emulated_draft_level_with_a_smaller_vocabulary_returns_full_logits(tmp_path):
    """The 1B-class draft level has 256 tokens, the target 32000: the draft's emulated stage returns logits of
    its own width (it used to index past them), and the chain still reproduces the target's tokens."""
    scenario = tmp_path / "vocab.yaml"
    scenario.write_text(
        "name: vocab-chain\nmodels: {target: llama-2-7b, chain: [tiny-llama]}\n"
        "cluster: {count: 2, flops: 400T, memory_bandwidth: 2TB/s}\nnetwork: {bandwidth: 10Gbit/s, latency: 10us}\n"
        "placement: {chain_nodes: [[0], [1]]}\nworkload: {prompt_tokens: 8, generate_tokens: 12}\n"
        "strategy: {name: pipespec}\nhead: {return_mode: logits}\n"
        "executor: {compute: emulated, draft: oracle, timeout_s: 60}\n")
    entry = run_job(scenario, 2, ["strategy.name=pipespec"], tmp_path)[0]
    assert entry["trace"]["meta"]["matches_reference"] is True and entry["metrics"]["generated_tokens"] == 12
