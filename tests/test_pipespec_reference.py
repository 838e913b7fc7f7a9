"""PipeSpec's reference variants (BradMcDanel/pipespec ``decoding.py``): each semantic point driven by hand, greedy
equivalence under random event orders (position-only and prefix-consistent oracles), the variants' knobs in
scenarios, and "never slower than autoregressive" where verification costs what a single step costs."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from pipesim.metrics import compute_metrics
from pipesim.scenario import ScenarioError, load_scenario, scenario_from_dict
from pipesim.scheduling import LaunchRun
from pipesim.scheduling.strategies import make_strategies
from pipesim.scheduling.strategies.pipespec import SendRollback, SendTokens, make_pipespec_chain
from pipesim.sim import simulate
from pipesim.world.acceptance import SyntheticTokens

from .kv_model import _Engine, _Head

PROMPT = [1, 2, 3]


def _runs(actions) -> list:
    return [a.run for a in actions if isinstance(a, LaunchRun)]


def _target_after_prefill(lookahead=0, handshake=True, max_verify=100):
    """The target of a 2-model reference chain after its first step on the prompt returned 7 (1 2 3 7)."""
    target = make_pipespec_chain(PROMPT, 50, 2, lookahead=lookahead, max_verify=max_verify, variant="reference",
                                 handshake=handshake)[1]
    (prefill,) = _runs(target.start())  # every model steps on the prompt first, whatever the lookahead
    assert prefill.tokens == PROMPT and not prefill.speculative
    return target, target.on_logits(prefill.run_id, [7])


def _target_after_two_steps(**knobs):
    """... and then a single-token step (nothing from the draft yet) that returned 8: 1 2 3 7 8."""
    target, actions = _target_after_prefill(**knobs)
    (step,) = _runs(actions)
    assert step.tokens == [7] and step.kind == "decode"  # lookahead 0 and an empty buffer: a single-token step
    actions = target.on_logits(step.run_id, [8])
    assert SendRollback(0, (1, 2, 3, 7, 8)) in actions  # every step after the first requests a resync upstream
    return target, actions


def test_lookahead_0_verifies_whenever_a_candidate_exists():
    target, actions = _target_after_two_steps()
    assert _runs(actions) == []  # the handshake: no step before the draft has answered
    (run,) = _runs(target.on_message(SendTokens(1, 0, 3, (7, 8, 9), round=1)))
    assert run.tokens == [8, 9] and run.kind == "verify"  # one candidate is enough


def test_lookahead_is_a_threshold_on_the_previous_models_lead():
    target, actions = _target_after_prefill(lookahead=3)
    assert _runs(actions) == []  # the draft is not lookahead-1 = 2 tokens ahead
    assert _runs(target.on_message(SendTokens(1, 0, 3, (7, 8)))) == []  # 1 ahead
    (run,) = _runs(target.on_message(SendTokens(1, 0, 5, (9,))))
    assert run.tokens == [7, 8, 9]


def test_without_the_handshake_a_verifier_does_not_wait():
    waiting, actions = _target_after_two_steps()
    assert _runs(actions) == [] and _runs(waiting.on_message(SendTokens(1, 0, 3, (7, 8, 9), round=0))) == []
    target, actions = _target_after_two_steps(handshake=False)
    assert _runs(actions) == []  # two ahead of the draft (curr_length > prev_length + 1): nothing to do
    (run,) = _runs(target.on_message(SendTokens(1, 0, 3, (7, 8, 9), round=0)))  # not the answer: goes anyway
    assert run.tokens == [8, 9]


def test_the_window_caps_a_verification_at_100_tokens_by_default():
    params = load_scenario("scenarios/pipespec-3model.yaml").strategy.params()
    assert params["max_verify"] == 100 and params["lookahead"] == 0 and params["handshake"] is True
    target = make_strategies("pipespec", PROMPT, 500, params, n_levels=2)[1]
    (prefill,) = _runs(target.start())
    (step,) = _runs(target.on_logits(prefill.run_id, [7]))
    target.on_logits(step.run_id, [8])
    (run,) = _runs(target.on_message(SendTokens(1, 0, 3, tuple(range(7, 300)), round=1)))
    assert len(run.tokens) == 100 and run.tokens[:3] == [8, 9, 10]  # the last verified token + 99 candidates


def test_a_middle_level_with_an_empty_buffer_takes_a_single_token_step():
    middle = make_pipespec_chain(PROMPT, 50, 3, lookahead=0, max_verify=100, variant="reference",
                                 handshake=False)[1]
    (prefill,) = _runs(middle.start())
    actions = middle.on_logits(prefill.run_id, [7])
    assert SendTokens(2, 0, 3, (7,), round=0) in actions
    (step,) = _runs(actions)
    assert step.tokens == [7] and step.kind == "decode" and not step.speculative
    capped = make_pipespec_chain(PROMPT, 50, 3, lookahead=1, max_verify=16, variant="capped")[1]
    assert _runs(capped.start()) == []  # the earlier semantics: a middle level idles without candidates


def test_a_candidate_drafted_after_a_rejected_token_is_not_verified():
    target, actions = _target_after_prefill(handshake=False)
    (step,) = _runs(actions)
    target.on_message(SendTokens(1, 0, 3, (7, 8, 9, 10, 11)))  # arrives while the step is in flight
    (run,) = _runs(target.on_logits(step.run_id, [8]))
    assert run.tokens == [8, 9, 10, 11]
    (after,) = _runs(target.on_logits(run.run_id, [9, 5, 0, 0]))  # 9 accepted, 10 rejected (the target says 5)
    assert target.sequence == [1, 2, 3, 7, 8, 9, 5]
    assert after.tokens == [5]  # 11 was drafted after the rejected 10: dropped, not verified
    (again,) = _runs(target.on_logits(after.run_id, [6]))
    assert again.tokens == [6]  # and so is everything after it, until the draft resyncs
    target.on_message(SendTokens(1, 0, 6, (5, 6, 7, 12)))  # the draft went on from 5
    (resynced,) = _runs(target.on_logits(again.run_id, [7]))
    assert resynced.tokens == [7, 12] and target.sequence[-3:] == [5, 6, 7]


def test_a_middle_level_answers_its_follower_only_once_its_own_request_is_answered():
    middle = make_pipespec_chain(PROMPT, 50, 3, lookahead=0, max_verify=100, variant="reference")[1]
    (prefill,) = _runs(middle.start())
    (step,) = _runs(middle.on_logits(prefill.run_id, [7]))
    middle.on_logits(step.run_id, [8])  # requests a resync from level 0, awaits it
    assert middle.on_message(SendRollback(1, (1, 2, 3, 5))) == []  # the target's request: held
    actions = middle.on_message(SendTokens(1, 0, 3, (7, 8), round=1))  # level 0 answers
    assert middle.sequence == [1, 2, 3, 5]  # resynced to its follower's sequence (diverged at 7)
    assert SendTokens(2, 1, 3, (5,), round=1) in actions and SendRollback(0, (1, 2, 3, 5)) in actions


def test_the_sync_baselines_middle_model_drafts():
    def middle_output(variant):
        middle = make_pipespec_chain(PROMPT, 50, 3, lookahead=5, max_verify=100, synchronous=True,
                                     variant=variant)[1]
        (verify,) = _runs(middle.on_message(SendTokens(1, 0, 3, (7, 8), round=0)))
        assert verify.tokens == [1, 2, 3, 7, 8]
        actions = middle.on_logits(verify.run_id, [7, 8, 9])  # both accepted, 9 its own
        while _runs(actions):  # drafting: single-token steps until lookahead-1 ahead of the target
            (step,) = _runs(actions)
            assert step.n_tokens == 1 and step.kind == "decode"
            actions = middle.on_logits(step.run_id, [middle.sequence[-1] + 1])
        (sent,) = [a for a in actions if isinstance(a, SendTokens)]
        return list(sent.tokens)

    assert middle_output("reference") == [7, 8, 9, 10]  # lookahead 5: 4 ahead of the target (at the prompt)
    assert middle_output("verify-only") == [7, 8, 9]


# -- greedy equivalence under random event orders ------------------------------------------------------------

class _PrefixEngine(_Engine):
    """Level predictions judged against the run's whole context: after any token that is not the target's, a
    level predicts a token of its own that is never the target's (and differs between levels)."""

    def predict(self, head: _Head, run) -> list[int]:
        context = list(head.contexts[run.run_id]) + list(run.tokens)
        accuracy = self.accuracies[head.level]
        tokens, out = self.tokens, []
        for p in run.positions[run.output_from:]:
            clean = all(context[q] == tokens.token(q) for q in range(len(PROMPT), p + 1))
            if clean:
                right = accuracy >= 1.0 or self.uniform(p + 1) < accuracy
                out.append(tokens.token(p + 1) if right else tokens.wrong(p + 1))
            else:
                out.append((tokens.token(p + 1) + 2 + head.level) % tokens.vocab_size)
        return out


def _drive(levels, accuracies, seed, prefix_consistent):
    tokens = SyntheticTokens(vocab_size=89, seed=seed)
    uniform = np.random.default_rng(seed).random(10_000)
    engine = (_PrefixEngine if prefix_consistent else _Engine)(tokens, None, [*accuracies, 1.0],
                                                                lambda p: uniform[p])
    heads = [_Head(engine, level, i) for i, level in enumerate(levels)]
    engine.run(heads, random.Random(seed), 500_000)
    output = heads[-1].output
    return output, [tokens.token(p) for p in range(len(PROMPT), len(PROMPT) + len(output))], engine


VARIANTS = [("reference", False, {"handshake": True}), ("reference", False, {"handshake": False}),
            ("reference", True, {}), ("capped", False, {}), ("verify-only", True, {})]


@pytest.mark.parametrize("variant,synchronous,knobs", VARIANTS)
@pytest.mark.parametrize("accuracies", [[0.0], [0.6], [1.0], [0.3, 0.8], [0.5, 0.8, 0.95]])
@pytest.mark.parametrize("prefix_consistent", [False, True])
@pytest.mark.parametrize("lookahead", [0, 3])
def test_every_variant_reproduces_target_greedy(variant, synchronous, knobs, accuracies, prefix_consistent,
                                                lookahead):
    if variant != "reference" and lookahead == 0:
        lookahead = 1
    tokens = SyntheticTokens(vocab_size=89, seed=0)
    for seed in range(2):
        prompt = [SyntheticTokens(89, seed).token(p) for p in range(len(PROMPT))]
        levels = make_pipespec_chain(prompt, 40, len(accuracies) + 1, lookahead=lookahead, max_verify=100,
                                     synchronous=synchronous, variant=variant, **knobs)
        output, truth, engine = _drive(levels, accuracies, seed, prefix_consistent)
        assert output == truth and len(output) == 40, (seed, output[:8], truth[:8])
        assert engine.checked > 0
    assert tokens.vocab_size == 89


def _accepted(engine) -> int:
    return sum(r[8] for r in engine.records if str(r[0]) == "tokens")


def test_no_accepted_draft_follows_a_wrong_token():
    """A 2-model chain: an oracle that judges a draft against its prefix rejects every token drafted after a wrong
    one, a position-only oracle accepts those where the position's draw says so. The reference chain never
    verifies such a token, so both oracles accept the same drafts; the capped variant does verify them (the
    stale candidates of issue 19), so there they differ."""
    differs = []
    for seed in range(4):
        for variant, lookahead in (("reference", 0), ("capped", 8)):
            counts = []
            for prefix_consistent in (False, True):
                levels = make_pipespec_chain(PROMPT, 60, 2, lookahead=lookahead, max_verify=16, variant=variant)
                output, truth, engine = _drive(levels, [0.7], seed, prefix_consistent)
                assert output == truth
                counts.append(_accepted(engine))
            if variant == "reference":
                assert counts[0] == counts[1] > 0, seed
            else:
                differs.append(counts[0] != counts[1])
    assert any(differs)


# -- scenario knobs -------------------------------------------------------------------------------------------

def test_variant_defaults_and_explicit_fields():
    base = "scenarios/pipespec-3model.yaml"
    assert load_scenario(base).strategy.params() == {"lookahead": 0, "max_verify": 100, "variant": "reference",
                                                     "handshake": True}
    assert load_scenario(base, ["strategy.variant=capped"]).strategy.params() == {
        "lookahead": 8, "max_verify": 16, "variant": "capped"}
    assert load_scenario(base, ["strategy.name=pipespec-sync"]).strategy.params()["lookahead"] == 5
    assert load_scenario(base, ["strategy.max_verify=7", "strategy.handshake=false"]).strategy.params() == {
        "lookahead": 0, "max_verify": 7, "variant": "reference", "handshake": False}


@pytest.mark.parametrize("overrides,message", [
    (["strategy.variant=capped", "strategy.lookahead=0"], "strategy.lookahead=0 needs the reference variant"),
    (["strategy.name=pipespec-sync", "strategy.variant=verify-only", "strategy.lookahead=0"],
     "strategy.lookahead=0 needs the reference variant"),
    (["strategy.variant=capped", "strategy.handshake=true"], "strategy.handshake=True applies to pipespec's"),
    (["strategy.name=pipespec-sync", "strategy.handshake=false"], "strategy.handshake=False applies"),
    (["strategy.lookahead=-1"], "strategy.lookahead"),
])
def test_bad_knobs_are_one_clear_line(overrides, message):
    with pytest.raises(ScenarioError, match=message) as info:
        load_scenario("scenarios/pipespec-3model.yaml", overrides)
    assert "\n" not in str(info.value)


# -- never slower than autoregressive where verification costs a single step ---------------------------------

FLOOR_TARGET, FLOOR_DRAFT = 1e-3, 1e-5  # per-layer floors (s): they dominate every step of either model


def _flat(strategy: str, alpha: float, **strategy_fields) -> dict:
    """A 1B -> 70B chain whose steps cost their layers' floors alone (FLOP/s and bandwidth so high that the roofline
    adds < 0.1%), so a verification of 100 tokens costs what one token costs."""
    return {
        "name": "flat", "models": {"target": "llama-3.1-70b", "chain": ["llama-3.2-1b"]},
        "cluster": {"count": 2, "flops": 1e19, "memory_bandwidth": 1e17, "cost_model": "floor",
                    "layer_floor": FLOOR_TARGET, "overrides": [{"index": 0, "layer_floor": FLOOR_DRAFT}]},
        "network": {"bandwidth": "100Gbit/s", "latency": "1us"},
        "placement": {"chain_nodes": [[0], [1]]},
        "acceptance": {"alpha": alpha, "seed": 3},
        "workload": {"prompt_tokens": 16, "generate_tokens": 96},
        "strategy": {"name": strategy, **strategy_fields}}


def _autoregressive(alpha: float) -> dict:
    """The target alone on its node, one token at a time."""
    document = _flat("iterative", alpha)
    document["cluster"] = {**document["cluster"], "count": 1, "overrides": []}
    del document["models"]["chain"], document["placement"]
    return document


def test_flat_costs_give_the_hand_computed_autoregressive_step():
    ms = compute_metrics(simulate(scenario_from_dict(_autoregressive(0.5))))["ms_per_token"]
    by_hand = 1e3 * FLOOR_TARGET * (80 + 1 / 8)  # 80 layers and the output head (an eighth of a floor)
    assert ms == pytest.approx(by_hand, rel=0.01)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("handshake", [True, False])
def test_reference_pipespec_is_never_slower_than_autoregressive_at_flat_verification_cost(alpha, handshake):
    """Without the handshake the target never waits, and every step commits at least one token: never slower.
    With it (the code's default) the target waits, after each step, for the draft to finish the step it is in
    and answer: at most one draft step (16 layers and the head at their floors) and two messages (1 us each)
    per committed token beyond autoregressive decoding."""
    autoregressive = compute_metrics(simulate(scenario_from_dict(_autoregressive(alpha))))["ms_per_token"]
    spec = compute_metrics(simulate(scenario_from_dict(_flat("pipespec", alpha, handshake=handshake))))
    wait_bound = 1e3 * ((16 + 1 / 8) * FLOOR_DRAFT + 2e-6) if handshake else 0.0
    assert spec["ms_per_token"] <= autoregressive + wait_bound
    if alpha >= 0.5:  # and clearly faster once drafts are often right
        assert spec["ms_per_token"] <= 0.95 * autoregressive


def test_the_simulators_json_has_pipespecs_metric():
    out = subprocess.run([sys.executable, "-m", "pipesim.cli", "simulate", "scenarios/pipespec-4gpu.yaml", "--json",
                          "--set", "workload.generate_tokens=16"], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["strategy"] == "pipespec"
    assert result["ms_per_token"] == pytest.approx(1e3 * result["wall_s"] / result["generated_tokens"])


@pytest.mark.parametrize("chain_alphas", [[0.5], [0.8], [0.6, 0.8]])
def test_acceptance_over_a_long_run_is_the_last_drafts_alpha(chain_alphas):
    """A position is verified at most once, and whether it is depends on the positions before it, never on its own
    draw: over a long run the target accepts the model before it at that model's alpha (binomial error: 3 sigma)."""
    document = _flat("pipespec", 0.5)
    document["workload"]["generate_tokens"] = 600
    document["acceptance"]["chain_alphas"] = chain_alphas
    drafts = [{"index": i, "layer_floor": 2e-4} for i in range(len(chain_alphas))]  # ~25 draft steps a target step
    document["cluster"] = {**document["cluster"], "count": len(chain_alphas) + 1, "overrides": drafts}
    if len(chain_alphas) == 2:
        document["models"]["chain"] = ["llama-3.2-1b", "llama-3.2-1b"]
        document["placement"] = {"chain_nodes": [[0], [1], [2]]}
    metrics = compute_metrics(simulate(scenario_from_dict(document)))
    alpha, n = chain_alphas[-1], metrics["drafted_checked"]
    assert n > 250
    assert abs(metrics["acceptance_rate"] - alpha) <= 3 * (alpha * (1 - alpha) / n) ** 0.5
