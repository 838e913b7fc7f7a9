"""`pipesim acceptance fit`: fitting outcomes generated here from known parameters recovers them.

The generators below are the test's own (numpy draws, windows cut as synchronous speculative decoding cuts them),
so a fit that miscounts transitions, mixes up the gap after a fully accepted window, or inverts a class fails.
Tolerances are 4 standard errors of a rate estimated from the number of trials the generator made.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from pipesim.cli import main


def _markov_outcomes(rng: np.random.Generator, n: int, p_aa: float, p_ar: float) -> list[int]:
    """Right/wrong per position of a two-state chain started from its stationary rate."""
    state = rng.random() < p_ar / (1 - p_aa + p_ar)
    out = []
    for _ in range(n):
        out.append(int(state))
        state = rng.random() < (p_aa if state else p_ar)
    return out


def _speculative_windows(outcomes: list[int], gamma: int) -> list[list[int]]:
    """Windows as synchronous speculation checks them: up to ``gamma`` drafted tokens, stopping at the first wrong
    one; the next window starts after the correction (a rejection) or after the bonus token (all accepted)."""
    windows, start = [], 0
    while start + gamma + 1 < len(outcomes):
        window = []
        for outcome in outcomes[start:start + gamma]:
            window.append(outcome)
            if not outcome:
                break
        windows.append(window)
        start += len(window) + (1 if window[-1] else 0)
    return windows


def _fit(tmp_path, capsys, lines: list[str], *options: str, name: str = "windows.txt") -> dict:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    assert main(["acceptance", "fit", str(path), *options]) == 0
    return yaml.safe_load(capsys.readouterr().out)["acceptance"]


def _tolerance(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p_aa, p_ar", [(0.9, 0.3), (0.6, 0.6), (0.5, 0.8)])
def test_markov_fit_recovers_the_chain_of_speculative_windows(tmp_path, capsys, p_aa, p_ar):
    rng = np.random.default_rng(11)
    outcomes = _markov_outcomes(rng, 60_000, p_aa, p_ar)
    windows = _speculative_windows(outcomes, gamma=5)
    fitted = _fit(tmp_path, capsys, ["".join(map(str, w)) for w in windows])
    assert fitted["model"] == "markov"
    # trials: every checked outcome is the step from the position before it (observed or, after a bonus, not)
    n_after_right = sum(1 for w in windows for a in w[:-1]) + sum(1 for w in windows if w[-1])
    n_after_wrong = sum(1 for w in windows if not w[-1])
    assert fitted["p_after_accept"] == pytest.approx(p_aa, abs=_tolerance(p_aa, n_after_right))
    assert fitted["p_after_reject"] == pytest.approx(p_ar, abs=_tolerance(p_ar, n_after_wrong))


def test_markov_fit_of_an_iid_source_finds_no_memory(tmp_path, capsys):
    rng = np.random.default_rng(5)
    outcomes = [int(u < 0.7) for u in rng.random(40_000)]
    fitted = _fit(tmp_path, capsys, ["".join(map(str, w)) for w in _speculative_windows(outcomes, 4)])
    assert abs(fitted["p_after_accept"] - fitted["p_after_reject"]) < 0.04
    assert fitted["alpha"] == pytest.approx(0.7, abs=0.02)


def test_iid_and_positional_fits_recover_their_parameters(tmp_path, capsys):
    rng = np.random.default_rng(3)
    alphas = [0.9, 0.7, 0.5, 0.3]
    windows = []
    for _ in range(20_000):
        window = []
        for alpha in alphas:
            window.append(int(rng.random() < alpha))
            if not window[-1]:
                break
        windows.append("".join(map(str, window)))
    positional = _fit(tmp_path, capsys, windows, "--model", "positional")
    reached = 20_000
    for depth, alpha in enumerate(alphas):
        assert positional["alphas"][depth] == pytest.approx(alpha, abs=_tolerance(alpha, reached))
        reached = int(reached * alpha)
    assert len(positional["alphas"]) == 4
    iid = _fit(tmp_path, capsys, windows, "--model", "iid")
    checked = sum(len(w) for w in windows)
    assert iid == {"model": "iid", "alpha": pytest.approx(sum(w.count("1") for w in windows) / checked, abs=1e-3)}


def test_confidence_fit_recovers_both_beta_distributions(tmp_path, capsys):
    rng = np.random.default_rng(8)
    accepted = rng.random(20_000) < 0.6
    probability = np.where(accepted, rng.beta(6.0, 2.0, 20_000), rng.beta(2.0, 4.0, 20_000))
    lines = ["probability,accepted", *(f"{p:.6f},{int(a)}" for p, a in zip(probability, accepted, strict=True))]
    fitted = _fit(tmp_path, capsys, lines, name="pairs.csv")
    assert fitted["confidence"] is True and fitted["alpha"] == pytest.approx(0.6, abs=0.015)
    for key, (a, b) in (("confidence_right", (6.0, 2.0)), ("confidence_wrong", (2.0, 4.0))):
        fa, fb = fitted[key]
        assert fa / (fa + fb) == pytest.approx(a / (a + b), abs=0.01)  # the mean
        assert fa + fb == pytest.approx(a + b, rel=0.1)  # the concentration (spread)


def test_markov_fit_from_a_simulated_trace_recovers_the_scenario_chain(tmp_path, capsys):
    from pipesim.scenario import load_cli_scenario
    from pipesim.sim import simulate

    scenario = load_cli_scenario(None, ["strategy.name=speculative", "strategy.gamma=6", "workload.generate_tokens=3000",
                                    "acceptance.model=markov", "acceptance.p_after_accept=0.85",
                                    "acceptance.p_after_reject=0.4"], None)
    trace = simulate(scenario)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([{"variant": "", "trace": trace.to_json()}]))
    assert main(["acceptance", "fit", str(path)]) == 0
    fitted = yaml.safe_load(capsys.readouterr().out)["acceptance"]
    checked = sum(r.checked for r in trace.records if r.kind == "tokens")
    rejected = checked - sum(r.accepted for r in trace.records if r.kind == "tokens")
    assert fitted["p_after_accept"] == pytest.approx(0.85, abs=_tolerance(0.85, checked - rejected))
    assert fitted["p_after_reject"] == pytest.approx(0.4, abs=_tolerance(0.4, rejected))


@pytest.mark.parametrize("name, text, message", [
    ("w.txt", "11\n1x1\n", "w.txt:2: '1x1' is not a sequence of 1"),
    ("w.txt", "1101\n", "w.txt:1: '1101' goes on after a rejection"),
    ("w.txt", "# nothing\n", "no accept/reject windows"),
    ("p.csv", "probability,accepted\n0.5,2\n", "p.csv:2: '0.5,2'"),
    ("t.json", "{\"records\": []}", "no verified drafted tokens"),
    ("t.json", "[1, 2", "not JSON"),
    ("t.json", "[1, 2]", "entry 0 is not a trace"),
    ("t.json", "{\"records\": [[\"tokens\", 0]]}", "entry 0: unreadable records"),
])
def test_bad_fit_input_is_one_line_naming_the_file(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["acceptance", "fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_trace_windows_place_outcomes_at_their_positions_and_skip_a_cut_commit():
    from pipesim.acceptance_fit import trace_windows
    from pipesim.trace import Record, Trace

    def commit(t, n, checked, accepted, level=1):
        return Record("tokens", t, t, "n1", -1, n, 0.0, checked, accepted, level=level)

    records = [commit(0, 1, 0, 0),  # the prefill's token: nothing checked
               commit(1, 3, 3, 2),  # 2 accepted, the 3rd rejected: its correction committed
               commit(2, 4, 3, 3),  # all 3 accepted and the bonus
               commit(2.5, 9, 9, 9, level=0),  # another level's records are not the target's
               commit(3, 2, 4, 2)]  # cut by the end of generation: 2 kept, no correction, so no rejection
    trace = Trace("simulated", "pipespec", "t", ["n0", "n1"], records=records)
    assert trace_windows(trace.to_json()) == [(1, [1, 1, 0]), (4, [1, 1, 1]), (8, [1, 1])]


def test_replay_fit_reproduces_the_recorded_run(tmp_path, capsys):
    from pipesim.metrics import compute_metrics
    from pipesim.scenario import load_cli_scenario
    from pipesim.sim import simulate

    recorded = [int(u < 0.6) for u in np.random.default_rng(2).random(400)]
    sets = ["workload.generate_tokens=300", "strategy.gamma=5", "acceptance.model=replay"]
    first = simulate(load_cli_scenario(None, [*sets, f"acceptance.sequence={recorded}"], "speculative"))
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(first.to_json()))
    assert main(["acceptance", "fit", str(path), "--model", "replay", "--seed", "5"]) == 0
    fitted = yaml.safe_load(capsys.readouterr().out)["acceptance"]
    # every checked position holds what the recorded sequence said there
    generated = 0
    for r in (r for r in first.records if r.kind == "tokens"):
        for i in range(r.checked):
            assert fitted["sequence"][generated + i] == recorded[generated + i]
        generated += r.n_tokens
    again = simulate(load_cli_scenario(None, [*sets, f"acceptance.sequence={fitted['sequence']}"], "speculative"))
    keys = ("drafted_checked", "drafted_accepted", "tokens_per_s", "runs_launched")
    assert {k: compute_metrics(again)[k] for k in keys} == {k: compute_metrics(first)[k] for k in keys}


@pytest.mark.parametrize("p_aa, p_ar, markov_better", [(0.9, 0.3, True), (0.7, 0.7, False)])
def test_the_fit_says_whether_markov_fits_better_than_iid(tmp_path, capsys, p_aa, p_ar, markov_better):
    outcomes = _markov_outcomes(np.random.default_rng(4), 30_000, p_aa, p_ar)
    path = tmp_path / "windows.txt"
    path.write_text("\n".join("".join(map(str, w)) for w in _speculative_windows(outcomes, 5)) + "\n")
    assert main(["acceptance", "fit", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "log-likelihood" in x)
    iid, markov = (float(x.split()[-1]) for x in line.split(":")[-1].split(","))
    # by hand, about: the entropy gap of a chain with these rates (0.9, 0.3: stationary 0.75) against a coin of
    # 0.75 (the windows visit the two states in slightly other proportions than the chain's stationary ones)
    if markov_better:
        h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
        assert markov - iid == pytest.approx(h(0.75) - (0.75 * h(0.9) + 0.25 * h(0.3)), abs=0.02)
    else:
        assert abs(markov - iid) < 0.002
