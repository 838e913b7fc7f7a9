"""CLI conventions a new user meets first: --version, defaults in --help, did-you-mean, the simulate header."""

from __future__ import annotations

import re

import pytest

from pipesim.cli import build_parser, main
from pipesim.executor_config import ExecutorConfig
from pipesim.scenario import ScenarioError, load_scenario

DEFAULT = "pipesim/data/default.yaml"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"pipesim \d+\.\d+\.\d+.*\n", capsys.readouterr().out)


@pytest.mark.parametrize("command, option, default", [
    (["calibrate"], "--repeats", "5"), (["calibrate"], "--iterative-tokens", "32"),
    (["calibrate"], "--timeout", "1800"), (["validate"], "--timeout", "3600"),
    (["validate"], "--out", "runs/validation"), (["validate"], "--grid", "the built-in grid"),
    (["models", "train-exit"], "--out", "runs/exit-adapters/"),
])
def test_help_shows_defaults(capsys, command, option, default):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    entry = text[text.index(f" {option} "):]
    assert "default" in entry[:400] and default in entry[:400], entry[:400]


def test_every_option_with_a_default_says_so():
    parser = build_parser()
    missing = []
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, [], "==SUPPRESS=="):
                if "default" not in formatter._get_help_string(action).lower():
                    missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


@pytest.mark.parametrize("key, suggestion", [("network.bandwith=1Gbit/s", "bandwidth"),
                                             ("executor.stop_at_oes=true", "stop_at_eos"),
                                             ("cluster.overrides=[{index: 0, flop: 1T}]", "flops")])
def test_a_misspelt_key_gets_a_suggestion(key, suggestion):
    with pytest.raises(ScenarioError, match=f"did you mean `{suggestion}`"):
        load_scenario(DEFAULT, [key])


def test_an_unknown_section_lists_the_known_ones():
    with pytest.raises(ScenarioError, match="unknown field .*known fields: name, description, models"):
        load_scenario(DEFAULT, ["netwrk_settings=1"])


def test_chat_prompts_stop_at_the_end_of_the_turn_by_default():
    assert ExecutorConfig(chat=True).stop_at_eos is True
    assert ExecutorConfig(chat=True, stop_at_eos=False).stop_at_eos is False
    assert ExecutorConfig().stop_at_eos is False  # synthetic prompts generate every requested token
    assert load_scenario("scenarios/local-smollm2.yaml").executor.stop_at_eos is True


def test_simulate_says_what_was_simulated_and_in_which_units(capsys):
    assert main(["simulate", "scenarios/paper-8node-cpu.yaml", "--set", "workload.generate_tokens=8",
                 "--set", "acceptance.alpha=0.55"]) == 0
    out = capsys.readouterr().out
    scenario = load_scenario("scenarios/paper-8node-cpu.yaml")
    assert scenario.description.split()[0] in out
    for text in ("llama-2-70b", "tinyllama-1.1b", "8 nodes", "1 Gbit/s", "pipeinfer", "alpha 0.55",
                 "simulated time"):
        assert text in out, text
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "tokens/s" in rows["tokens_per_s"] and "s simulated" in rows["wall_s"]
    assert "s simulated" in rows["ttft_s"]


def test_models_list_marks_the_test_model(capsys):
    assert main(["models", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "test model" in lines["tiny-llama"] and "test model" not in lines["tinyllama-1.1b"]
