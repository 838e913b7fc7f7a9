"""PipeInfer's reference behaviour and its named departures (``strategy.variant``, one switch per departure).

Expected numbers are counted by hand from AutonomicPerfectionist/PipeInfer ``examples/speculative/speculative.cpp``
(the KV transactions it issues), or are properties any correct engine has (greedy output equals target-only
decoding, the KV contexts are exact).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.scheduling import LaunchRun, RequestDraft, make_strategy
from pipesim.scheduling.driver import DRAFT, VERIFY, HeadDriver
from pipesim.sim import simulate
from pipesim.world.acceptance import AcceptanceModel, OracleDraft, Proposal, SyntheticTokens

from .kv_model import drive

PROMPT_LEN = 7
PAPER = Path(__file__).resolve().parent.parent / "scenarios" / "paper-8node-cpu.yaml"
SWITCHES = {
    "run_pattern": ("reference", "continuous"),
    "head_priority": ("run", "step"),
    "sync_prefill": (True, False),
    "kv_transactions": ("reference", "compact"),
}


def _drive(alpha: float, seed: int, n_generate: int = 50, model: str = "iid", draft=None, **params):
    tokens = SyntheticTokens(vocab_size=97, seed=seed)
    alphas = [alpha, alpha * 0.8, alpha * 0.6] if model == "positional" else []
    acceptance = AcceptanceModel(model, alpha, alphas=alphas, prompt_len=PROMPT_LEN, seed=seed) if alphas else \
        AcceptanceModel(model, alpha, prompt_len=PROMPT_LEN, seed=seed)
    oracle = OracleDraft(tokens, acceptance)
    prompt = [tokens.token(p) for p in range(PROMPT_LEN)]
    strategy = make_strategy("pipeinfer", prompt, n_generate, params)
    return strategy, drive(strategy, tokens, draft(oracle) if draft else oracle, random.Random(seed))


@pytest.mark.parametrize("combo", list(itertools.product(*SWITCHES.values())))
def test_every_switch_combination_reproduces_target_only_output(combo):
    params = dict(zip(SWITCHES, combo, strict=True))
    for seed in range(5):
        for alpha in (0.0, 0.4, 0.8, 1.0):
            strategy, result = _drive(alpha, seed, **params)
            assert result.output == result.truth, (params, seed, alpha)
            assert strategy.pool.n_used == 0  # every partition came back


@pytest.mark.parametrize("variant", ["reference", "continuous"])
@pytest.mark.parametrize("seed", range(8))
def test_variants_exact_with_depth_dependent_drafts_and_small_pools(variant, seed):
    # positional acceptance: a token drafted again at another depth may differ, so overlapping runs disagree
    for n_partitions, micro_batch in ((1, 1), (3, 2), (1000, 4)):
        strategy, result = _drive(0.9, seed, model="positional", variant=variant, n_partitions=n_partitions,
                                  micro_batch=micro_batch)
        assert result.output == result.truth, (variant, seed, n_partitions, micro_batch)
        assert result.checked_contexts >= 50


@pytest.mark.parametrize("variant", ["reference", "continuous"])
def test_speculation_never_outgrows_the_kv_cache_even_when_cancelled_runs_compute(variant):
    # 16 prompt + 24 generated + 2 headroom cells; every cancelled run is computed anyway (the worst case for
    # cells). A surviving run's partition, and those copied from it, hold their own cell at the position of the
    # next single-token run, which the reference removes first (begin_async_run): without that removal 6 of these
    # 200 runs overflow by a cell
    for seed in range(200):
        alpha = (0.7, 0.9, 1.0)[seed % 3]
        tokens = SyntheticTokens(vocab_size=97, seed=seed)
        draft = OracleDraft(tokens, AcceptanceModel("iid", alpha, prompt_len=16, seed=seed))
        strategy = make_strategy("pipeinfer", [tokens.token(p) for p in range(16)], 24, {"variant": variant})
        strategy.kv_capacity = 16 + 24 + 2
        result = drive(strategy, tokens, draft, random.Random(seed), p_late=1.0)
        assert result.output == result.truth
        assert result.max_cells <= 42, (seed, alpha)


class _ConfidentDraft:
    """A fake draft that reports a confidence per token: high where the oracle is right, low where it is wrong
    (deterministic per position), and stops before a token below the request's threshold."""

    def __init__(self, oracle: OracleDraft, right: float = 0.9, wrong: float = 0.3) -> None:
        self.oracle, self.right, self.wrong = oracle, right, wrong
        self.thresholds: list[float] = []

    def propose_request(self, request) -> Proposal:
        return self.propose(request.context, request.n_tokens, request.committed_len, request.min_confidence)

    def propose(self, context, n_tokens, committed_len, min_confidence=0.0) -> Proposal:
        self.thresholds.append(min_confidence)
        proposal = self.oracle.propose(context, n_tokens, committed_len)
        kept, confidences = [], []
        for i, token in enumerate(proposal.tokens):
            confidence = self.right if token == self.oracle.tokens.token(len(context) + i) else self.wrong
            if confidence < min_confidence:
                return Proposal(kept, confidences, stopped=True)
            kept.append(token)
            confidences.append(confidence)
        return Proposal(kept, confidences)


def test_a_higher_p_accept_drafts_fewer_wrong_tokens_with_a_confident_draft():
    drafts = {}
    results = {}
    for p_accept in (0.1, 0.5):
        drafts[p_accept] = []

        def make(oracle, p_accept=p_accept):
            draft = _ConfidentDraft(oracle)
            drafts[p_accept].append(draft)
            return draft

        strategy, result = _drive(0.6, 3, draft=make, min_confidence=p_accept, n_generate=60)
        assert result.output == result.truth
        results[p_accept] = (strategy, result)
    # 0.3 < 0.5: the wrong tokens are never drafted at p_accept 0.5, so nothing speculative is cancelled
    assert results[0.5][1].cancelled < results[0.1][1].cancelled
    assert set(drafts[0.5][0].thresholds) == {0.5}


def _first(actions, kind):
    return next(a for a in actions if isinstance(a, kind))


def test_p_recovery_and_p_decay_move_the_threshold_as_calc_p_adjust():
    # calc_p_adjust = iter * p_recovery - max(n_reject * p_decay, 0); drafting stops below p_accept + p_adjust
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"min_confidence": 0.25, "p_recovery": 0.125,
                                                          "p_decay": 0.0625})
    (prefill,) = [a.run for a in strategy.start() if isinstance(a, LaunchRun)]
    request = _first(strategy.on_logits(prefill.run_id, [8]), RequestDraft)
    assert request.min_confidence == 0.25  # iter 0, no rejection
    request = _first(strategy.on_draft(request.request_id, [9, 10]), RequestDraft)
    assert request.min_confidence == 0.25 + 0.125  # one speculative run launched in this loop
    request = _first(strategy.on_draft(request.request_id, []), RequestDraft)  # stopped before its first token
    assert request.min_confidence == 0.25 - 0.0625  # the loop starts again (iter 0), one rejection
    request = _first(strategy.on_draft(request.request_id, []), RequestDraft)
    assert request.min_confidence == 0.25 - 2 * 0.0625


def test_no_speculation_once_p_accept_plus_p_adjust_reaches_one():
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"min_confidence": 0.5, "p_recovery": 0.5})
    (prefill,) = [a.run for a in strategy.start() if isinstance(a, LaunchRun)]
    request = _first(strategy.on_logits(prefill.run_id, [8]), RequestDraft)
    actions = strategy.on_draft(request.request_id, [9])
    assert not any(isinstance(a, RequestDraft) for a in actions)  # 0.5 + 1 * 0.5 = 1.0: the loop ends


def _launches(actions):
    return [a.run for a in actions if isinstance(a, LaunchRun)]


def test_kv_transactions_per_occasion_as_counted_in_speculative_cpp():
    # n_partitions = 4 sequence partitions, n_parallel = 1: max_seq = 4 * 1 + 1 = 5 sequence ids besides 0
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"n_partitions": 4, "micro_batch": 3})
    (prefill,) = _launches(strategy.start())
    assert prefill.kv_transactions == 0  # the prompt is one synchronous llama_decode
    actions = strategy.on_logits(prefill.run_id, [8])  # token 8 at position 3 committed
    (n8,) = _launches(actions)
    assert (n8.tokens, n8.positions, n8.speculative) == ([8], [3], False)
    # begin_async_run, non-speculative: llama_kv_cache_seq_rm for i = 0..max_seq -> 6
    assert n8.kv_transactions == 6
    request = _first(actions, RequestDraft)
    (spec,) = _launches(strategy.on_draft(request.request_id, [9, 10, 11]))
    assert spec.positions == [4, 5, 6] and spec.speculative
    # after n8 started: seq_cp 0 -> i for i = 1..max_seq (5); start_async_spec_run: seq_rm + seq_cp of its one
    # sequence (2); begin_async_run, speculative: seq_rm of its sequence at the position (1)
    assert spec.kv_transactions == 5 + 2 + 1
    actions = strategy.on_logits(n8.run_id, [9])  # n8 decides position 4: 9, as drafted
    (n9,) = _launches(actions)  # the reference launches a single-token run although the chain is intact ...
    assert (n9.tokens, n9.positions) == ([9], [4]) and n9.kv_transactions == 6
    assert not any(type(a).__name__ == "CancelRuns" for a in actions)  # ... and the consistent run survives
    actions = strategy.on_logits(spec.run_id, [10, 11, 12])  # spec accepts 10, 11; 12 is the bonus
    assert strategy.generated == [8, 9, 10, 11, 12]
    (n12,) = _launches(actions)
    # n9's copies to every sequence (5); the verification of a speculative run: seq_rm of its sequence's tail (1),
    # seq_rm + seq_cp of sequence 0's kept range (2), seq_rm + seq_cp for every sequence 1..max_seq (10);
    # then n12's removals (6)
    assert n12.kv_transactions == 5 + (1 + 2 + 10) + 6


def test_the_continuous_variant_charges_no_transactions_and_keeps_its_chain():
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"n_partitions": 4, "variant": "continuous"})
    actions = strategy.start()
    prefill = _launches(actions)[0]
    request = _first(actions, RequestDraft)  # it speculates during the prefill
    (spec,) = _launches(strategy.on_draft(request.request_id, [8, 9]))
    actions = strategy.on_logits(prefill.run_id, [8])  # 8 as drafted: the chain holds, no single-token run
    assert _launches(actions) == [] and spec.kv_transactions == 0 and prefill.kv_transactions == 0


def test_an_explicit_switch_overrides_its_variant():
    strategy = make_strategy("pipeinfer", [1, 2], 5, {"variant": "continuous", "sync_prefill": True,
                                                      "kv_transactions": "reference"})
    assert (strategy.run_pattern, strategy.head_priority, strategy.sync_prefill, strategy.cancelled_traffic,
            strategy.kv_transactions) == ("continuous", "step", True, "header", "reference")
    assert not any(isinstance(a, RequestDraft) for a in strategy.start())  # no speculation during the prefill


class _Port:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def drop(self, run, send_header):
        pass

    def send_cancel(self, run_ids):
        pass

    def send_to_level(self, message):
        pass

    def begin_draft(self, request):
        class Task:
            done = False
            tokens: list[int] = []

        task = Task()
        task.request = request
        return task

    def end_draft(self, task):
        pass

    def finish(self):
        pass


@pytest.mark.parametrize("priority, expected", [("run", DRAFT), ("step", VERIFY)])
def test_head_looks_for_predictions_only_between_whole_runs_in_the_reference(priority, expected):
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"head_priority": priority, "sync_prefill": False})
    driver = HeadDriver(strategy, _Port(), "n0", 4, [])
    driver.start()
    assert driver.next_work()[0] == "stage0"  # the prefill through the head's layers
    prefill = driver.strategy._chain[0].run
    driver.stage0_done(prefill, 0.0)
    kind, task = driver.next_work()
    assert kind == DRAFT
    driver.draft_step_done(task, 0.0, 1)  # one step of a three-token micro-batch
    driver.predictions_arrived(prefill.run_id, [8], 1)
    assert driver.next_work()[0] == expected


def _paper(*sets: str):
    return load_scenario(PAPER, ["strategy.name=pipeinfer", "workload.generate_tokens=24",
                                                            *sets])


def test_reference_prefill_comes_before_any_draft_and_continuous_drafts_during_it():
    for variant, drafts_before in (("reference", False), ("continuous", True)):
        trace = simulate(_paper(f"strategy.variant={variant}"))
        first_token = min(r.t0 for r in trace.records if r.kind == "tokens")
        early = [r for r in trace.records if r.kind == "compute" and r.what == "draft" and r.t0 < first_token]
        assert bool(early) is drafts_before, variant


@pytest.mark.parametrize("relay", ["serial", "pipelined"])
def test_kv_transactions_cost_one_event_per_run_and_stage_whatever_their_number(relay):
    counts = {}
    for n_partitions in (10, 1000):
        trace = simulate(_paper("strategy.variant=continuous", "strategy.kv_transactions=reference",
                                f"strategy.n_partitions={n_partitions}", "cluster.kv_transaction_time=20us",
                                f"cluster.kv_relay={relay}"))
        kv = [r for r in trace.records if r.kind == "compute" and r.what == "kv"]
        assert kv
        for r in kv:  # n_tokens holds the number of transactions: each costs 20 us at every stage
            if relay == "serial":
                assert r.t1 - r.t0 == pytest.approx(r.n_tokens * 20e-6, rel=1e-9)
            else:  # pipelined: at least the stage's own work, more when the previous stage holds it back
                assert r.t1 - r.t0 >= r.n_tokens * 20e-6 * (1 - 1e-9)
        launches = sum(1 for r in trace.records if r.kind == "launch")
        assert len(kv) <= launches * 8  # at most one event per run and stage
        counts[n_partitions] = max(r.n_tokens for r in kv)
    # a speculative run's verification alone issues n + 2 + 2 * max_seq (max_seq = n_partitions + 1) and travels
    # with the next run in one event: 2005 with 1000 partitions; with 10, every event holds at most
    # 11 (copies after a single-token run) + 25 (a verification) + 12 (removals before one) + 3 (a speculative run)
    assert counts[1000] >= 2005
    assert counts[10] <= 11 + 25 + 12 + 3


def test_reference_kv_transactions_slow_the_paper_cluster_down_more_the_dearer_they_are():
    speeds = [compute_metrics(simulate(_paper(f"cluster.kv_transaction_time={t}")))["tokens_per_s"]
              for t in ("0us", "10us", "50us")]
    assert speeds[0] > speeds[1] > speeds[2]


def test_cancelled_runs_travel_whole_in_the_reference_and_as_headers_when_switched():
    sets = ("acceptance.alpha=0.3", "strategy.kv_transactions=compact")
    full = simulate(_paper(*sets))
    header = simulate(_paper(*sets, "strategy.pipeinfer_cancelled_traffic=header"))
    skipped = [r for r in full.records if r.kind == "transfer" and r.what == "skipped-activations"]
    assert skipped and any(r.what == "skipped-predictions" for r in full.records if r.kind == "transfer")
    assert not any(r.what.startswith("skipped-") for r in header.records if r.kind == "transfer")
    computed = {r.run_id: r.nbytes for r in full.records if r.kind == "transfer" and r.what == "activations"}
    for r in skipped:  # the same frame as when the run was computed
        if r.run_id in computed:
            assert r.nbytes == computed[r.run_id]


@pytest.mark.parametrize("exit_layer", [None, 3])
def test_the_executor_frame_carries_the_transaction_count(exit_layer):
    from pipesim.executor.protocol import RunMessage, decode_run, encode_run
    from pipesim.scheduling import KVOp

    msg = RunMessage(7, (1, 2), (5, 6), (3,), 0, (KVOp("rm", 2, p0=4, p1=5),), exit_layer=exit_layer,
                     kv_transactions=2005)
    assert decode_run(encode_run(msg)) == msg
    assert decode_run(encode_run(msg.skipped())).kv_transactions == 2005  # a header still carries them


def test_a_profiles_kv_transaction_term_replaces_the_scenarios(tmp_path):
    from pipesim.world.profile import HardwareProfile

    base = Path(__file__).resolve().parent.parent / "reports" / "calibration" / "profile-tiny-emulated-4.yaml"
    profile = HardwareProfile.load(base)
    for coefficients in profile.nodes.values():
        coefficients.kv_transaction = 40e-6
    path = profile.save(tmp_path / "profile.yaml")
    tiny = Path(__file__).resolve().parent.parent / "scenarios" / "local-tiny.yaml"
    sets = ["cluster.count=4", "executor.compute=emulated", "cluster.kv_transaction_time=1us"]
    trace = simulate(load_scenario(tiny, [*sets, f"cluster.profile={path}"]))
    kv = [r for r in trace.records if r.kind == "compute" and r.what == "kv"]
    # the profile's ranks share a host: a transaction costs 40 us alone, more while a host-mate computes
    per_transaction = [(r.t1 - r.t0) / r.n_tokens for r in kv]
    assert min(per_transaction) == pytest.approx(40e-6, rel=1e-9)
    assert all(t >= 40e-6 * (1 - 1e-9) for t in per_transaction)


@pytest.mark.parametrize("knobs", [{"early_cancellation": False}, {"max_runs_in_flight": 2},
                                   {"max_runs_in_flight": 5, "micro_batch": 1}, {"n_partitions": 2},
                                   {"p_recovery": 0.3, "p_decay": 0.2}])
def test_the_reference_stays_exact_with_the_other_knobs(knobs):
    for seed in range(6):
        for alpha in (0.3, 0.8):
            strategy, result = _drive(alpha, seed, **knobs)
            assert result.output == result.truth, (knobs, seed, alpha)
            assert strategy.pool.n_used == 0
