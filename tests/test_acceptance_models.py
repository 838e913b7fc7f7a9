"""The Markov acceptance model and the confidence-carrying oracle, against closed forms.

Markov: transition frequencies over generated positions equal p_after_accept / p_after_reject. Confidence: a
right token's probability is Beta(8, 2), a wrong one's Beta(2, 5) (the documented defaults); the oracle stops
before the first token below the cut-off, so a window's expected drafted tokens follow from the Beta CDFs (for
integer a, b: I_x(a, b) = P(Binomial(a + b - 1, x) >= a)), and a higher cut-off drafts less and wastes less.
"""

from __future__ import annotations

import math

import pytest

from pipesim.executor.drafts import Drafter, FreeRunner, ReferenceTokens
from pipesim.metrics import compute_metrics
from pipesim.scenario import ScenarioError, load_cli_scenario
from pipesim.scheduling import RequestDraft
from pipesim.sim import simulate
from pipesim.world.acceptance import AcceptanceModel, ConfidenceModel, OracleDraft, SyntheticTokens


def _beta_cdf(x: float, a: int, b: int) -> float:
    n = a + b - 1
    return sum(math.comb(n, k) * x ** k * (1 - x) ** (n - k) for k in range(a, n + 1))


def _expected_drafted(alpha: float, gamma: int, cut: float) -> float:
    """Expected drafted tokens of a window of up to ``gamma``: on the target's prefix a token is right with alpha;
    a right one survives the cut-off with 1 - I_cut(8, 2), a wrong one (and every one after it) with
    1 - I_cut(2, 5)."""
    keep_right, keep_wrong = 1 - _beta_cdf(cut, 8, 2), 1 - _beta_cdf(cut, 2, 5)
    on, off, drafted = 1.0, 0.0, 0.0  # probabilities of drafting on / off the target's prefix so far
    for _ in range(gamma):
        on, off = on * alpha * keep_right, on * (1 - alpha) * keep_wrong + off * keep_wrong
        drafted += on + off
    return drafted


def test_markov_model_transitions_match_its_parameters():
    model = AcceptanceModel("markov", p_after_accept=0.85, p_after_reject=0.3, prompt_len=10, seed=7)
    states = [model.correct(p, 0) for p in range(10, 40_010)]
    after_right = [b for a, b in zip(states, states[1:], strict=False) if a]
    after_wrong = [b for a, b in zip(states, states[1:], strict=False) if not a]
    for share, p, n in ((sum(after_right) / len(after_right), 0.85, len(after_right)),
                        (sum(after_wrong) / len(after_wrong), 0.3, len(after_wrong))):
        assert share == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    stationary = 0.3 / (1 - 0.85 + 0.3)
    assert sum(states) / len(states) == pytest.approx(stationary, abs=0.02)
    assert model.correct(5000, 3) == model.correct(5000, 0)  # a property of the position, not of the depth


def test_markov_scenario_needs_both_probabilities():
    with pytest.raises(ScenarioError, match="model=markov needs p_after_accept and p_after_reject"):
        load_cli_scenario(None, ["acceptance.model=markov", "acceptance.p_after_accept=0.9"], None)


def test_confidence_is_beta_by_correctness_and_off_by_default():
    tokens = SyntheticTokens(97, seed=0)
    model = AcceptanceModel("iid", 0.5, seed=1, confidence=ConfidenceModel())
    right = [model.draft_confidence(p, True) for p in range(20_000)]
    wrong = [model.draft_confidence(p, False) for p in range(20_000)]
    assert sum(right) / len(right) == pytest.approx(0.8, abs=0.005)  # Beta(8, 2): mean 8 / 10
    assert sum(wrong) / len(wrong) == pytest.approx(2 / 7, abs=0.005)  # Beta(2, 5)
    assert sum(c < 0.3 for c in wrong) / len(wrong) == pytest.approx(_beta_cdf(0.3, 2, 5), abs=0.01)
    plain = OracleDraft(tokens, AcceptanceModel("iid", 0.5, seed=1))
    proposal = plain.propose([tokens.token(p) for p in range(10)], 30, 10, min_confidence=0.99)
    assert len(proposal.tokens) == 30 and set(proposal.confidences) == {1.0} and not proposal.stopped


def test_executor_oracle_stops_below_the_cut_off_after_the_step_that_drafted_it():
    reference = list(range(100, 200))
    acceptance = AcceptanceModel("iid", 0.7, seed=3, confidence=ConfidenceModel())
    oracle = OracleDraft(ReferenceTokens(reference, 256), acceptance)
    for start in range(10, 60):
        request = RequestDraft(1, tuple(reference[:start]), 8, start, min_confidence=0.5)
        proposal = oracle.propose(request.context, 8, start, 0.5)
        task = Drafter(FreeRunner(), oracle).begin(request)
        steps = 0
        while not task.done:
            task.step()
            steps += 1
        assert task.tokens == proposal.tokens and steps == proposal.n_steps
        assert all(c >= 0.5 for c in proposal.confidences)
        assert proposal.stopped == (len(proposal.tokens) < 8)


@pytest.mark.parametrize("cut", [0.3, 0.5])
def test_speculative_window_length_follows_the_beta_cut_off(cut):
    alpha, gamma = 0.7, 6
    trace = simulate(load_cli_scenario(None, ["workload.generate_tokens=3000", "acceptance.confidence=true",
                                              f"acceptance.alpha={alpha}", f"strategy.gamma={gamma}",
                                              f"strategy.min_confidence={cut}"], "speculative"))
    windows = [r.n_tokens - 1 for r in trace.records if r.kind == "launch" and r.what == "verify"]
    mean = sum(windows) / len(windows)
    sd = math.sqrt(sum((w - mean) ** 2 for w in windows) / (len(windows) - 1))
    assert mean == pytest.approx(_expected_drafted(alpha, gamma, cut), abs=4 * sd / math.sqrt(len(windows)))


@pytest.mark.parametrize("strategy, sets", [("speculative", ["strategy.gamma=8"]),
                                            ("pipeinfer", ["strategy.micro_batch=4"]),
                                            ("pipeinfer", ["strategy.micro_batch=4", "strategy.variant=continuous"])],
                         ids=["speculative", "pipeinfer-reference", "pipeinfer-continuous"])
def test_a_higher_cut_off_drafts_less_and_wastes_less(strategy, sets):
    drafted_per_request, wasted, cancelled_work, cancelled_runs = [], [], [], []
    for cut in (0.0, 0.2, 0.4, 0.6):
        trace = simulate(load_cli_scenario(None, ["workload.generate_tokens=1500", "acceptance.confidence=true",
                                                  f"strategy.min_confidence={cut}", *sets], strategy))
        metrics = compute_metrics(trace)
        launches = [r for r in trace.records if r.kind == "launch" and r.what in ("verify", "spec")]
        # speculative verify runs hold the last committed token before the drafted ones
        drafted = sum(r.n_tokens for r in launches) - (len(launches) if strategy == "speculative" else 0)
        drafted_per_request.append(drafted / len(launches))
        wasted.append((drafted - metrics["drafted_accepted"]) / metrics["generated_tokens"])
        cancelled_work.append(metrics["wasted_compute_fraction"])
        cancelled_runs.append(metrics["runs_cancelled"])
    assert drafted_per_request == sorted(drafted_per_request, reverse=True) and len(set(drafted_per_request)) == 4
    assert wasted == sorted(wasted, reverse=True) and wasted[-1] < wasted[0] / 5
    if strategy == "pipeinfer":
        assert cancelled_runs == sorted(cancelled_runs, reverse=True) and cancelled_runs[-1] < cancelled_runs[0] / 2
    if "strategy.variant=continuous" in sets:  # its compute on cancelled runs falls with them; the reference's
        # stays near 0.4 of its compute at every cut-off here (0.38-0.40, not in order), so only its count is checked
        assert cancelled_work == sorted(cancelled_work, reverse=True) and cancelled_work[-1] < cancelled_work[0] / 5


def test_without_confidence_the_cut_off_changes_nothing():
    results = [compute_metrics(simulate(load_cli_scenario(None, ["workload.generate_tokens=200",
                                                                 f"strategy.min_confidence={cut}"], "pipeinfer")))
               for cut in (0.0, 0.9)]
    assert results[0]["tokens_per_s"] == results[1]["tokens_per_s"]
    assert results[0]["runs_launched"] == results[1]["runs_launched"]


def _chain(models: int, *sets: str):
    from pipesim.scenario import load_scenario

    chain = (["models.chain=[llama-3.2-1b]", "placement.chain_nodes=[[0],[1]]", "cluster.count=2",
              "acceptance.chain_alphas=[0.7]"] if models == 2 else
             ["placement.chain_nodes=[[0],[1],[2]]", "cluster.count=3", "acceptance.chain_alphas=[0.5,0.7]"])
    return load_scenario("scenarios/pipespec-3model.yaml", ["workload.prompt_tokens=8", "strategy.name=pipespec-sync",
                                                            "strategy.lookahead=8", *chain, *sets])


@pytest.mark.parametrize("models", [2, 3])
def test_chains_follow_the_markov_and_replay_models(models, tmp_path, capsys):
    import json

    import yaml

    from pipesim.cli import main

    # markov: the target checks the most accurate draft's tokens, so its outcomes are the chain's
    trace = simulate(_chain(models, "workload.generate_tokens=3000", "acceptance.model=markov",
                            "acceptance.p_after_accept=0.85", "acceptance.p_after_reject=0.4"))
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace.to_json()))
    assert main(["acceptance", "fit", str(path)]) == 0
    fitted = yaml.safe_load(capsys.readouterr().out)["acceptance"]
    commits = [r for r in trace.records if r.kind == "tokens"]
    rejected = sum(1 for r in commits if r.checked > r.accepted)
    after_right = sum(r.accepted for r in commits)
    assert fitted["p_after_accept"] == pytest.approx(0.85, abs=4 * math.sqrt(0.85 * 0.15 / after_right))
    assert fitted["p_after_reject"] == pytest.approx(0.4, abs=4 * math.sqrt(0.4 * 0.6 / rejected))
    # replay: the recorded sequence decides (1, 1, 0 repeating: every third generated position is wrong)
    replay = simulate(_chain(models, "workload.generate_tokens=300", "acceptance.model=replay",
                             "acceptance.sequence=[1, 1, 0]"))
    generated = 0
    for r in (r for r in replay.records if r.kind == "tokens"):
        if r.checked > r.accepted and r.n_tokens > r.accepted:  # a rejection: its position is a 0 of the sequence
            assert (generated + r.accepted) % 3 == 2
        generated += r.n_tokens
    assert compute_metrics(replay)["drafted_accepted"] > 100
