"""The `pipesim simulate` command: JSON output, help, trace export, and one-line errors for bad scenarios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipesim.cli import main

PAPER = Path("scenarios/paper-8node-cpu.yaml")
REQUIRED_KEYS = {"strategy", "generated_tokens", "tokens_per_s", "ttft_s", "itl_mean_s", "itl_p50_s", "itl_p99_s",
                 "acceptance_rate", "node_utilization", "link_utilization", "wasted_compute_fraction", "wall_s"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipesim.cli", *args], capture_output=True, text=True, timeout=120)


def test_json_has_the_documented_keys(capsys):
    assert main(["simulate", str(PAPER), "--json", "--set", "workload.generate_tokens=16"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["strategy"] == "pipeinfer" and metrics["generated_tokens"] == 16
    assert set(metrics["node_utilization"]) == {f"n{i}" for i in range(8)}


def test_default_scenario_runs_without_arguments(capsys):
    assert main(["simulate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scenario"] == "default"


@pytest.mark.parametrize("assignment,field,value", [
    ("acceptance.alpha=0.5", "acceptance_rate", None),
    ("network.bandwidth=100Mbit/s", None, None),
    ("network.latency=50us", None, None),
    ("workload.generate_tokens=7", "generated_tokens", 7),
])
def test_documented_set_keys_work(capsys, assignment, field, value):
    assert main(["simulate", str(PAPER), "--json", "--set", assignment, "--set", "workload.prompt_tokens=8"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    if value is not None:
        assert metrics[field] == value


def test_bandwidth_set_changes_the_result(capsys):
    rates = []
    for bw in ["10Mbit/s", "10Gbit/s"]:
        main(["simulate", str(PAPER), "--json", "--strategy", "iterative", "--set", f"network.bandwidth={bw}",
              "--set", "workload.generate_tokens=8"])
        rates.append(json.loads(capsys.readouterr().out)["tokens_per_s"])
    assert rates[0] < rates[1]


def test_help_documents_every_option():
    result = run_cli("simulate", "--help")
    assert result.returncode == 0
    for option in ["--strategy", "--set", "--trace", "--records", "--json", "acceptance.alpha", "network.bandwidth",
                   "network.latency", "workload.generate_tokens", "scenario"]:
        assert option in result.stdout


def test_trace_and_records_files(tmp_path, capsys):
    trace_path, records_path = tmp_path / "t.json", tmp_path / "r.csv"
    assert main(["simulate", str(PAPER), "--set", "workload.generate_tokens=8", "--trace", str(trace_path),
                 "--records", str(records_path)]) == 0
    chrome = json.loads(trace_path.read_text())
    phases = {e["ph"] for e in chrome["traceEvents"]}
    assert {"X", "i", "M"} <= phases
    spans = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert records_path.read_text().startswith("kind,t0,t1,where")


def _write(tmp_path: Path, mutate) -> Path:
    document = yaml.safe_load(PAPER.read_text())
    mutate(document)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d.pop("network"), "network: missing required field"),
    (lambda d: d["network"].update(bandwidth="-5Mbit/s"), "network.bandwidth"),
    (lambda d: d["acceptance"].update(alpha=1.5), "acceptance.alpha=1.5"),
    (lambda d: d["models"].update(target="llama-9-900b"), "unknown model 'llama-9-900b'"),
    (lambda d: d["cluster"].update(count=200) or d["placement"].pop("layer_split"), "more stages than the target's 80 layers"),
    (lambda d: d["network"].update(bandwidth="fast"), "network.bandwidth='fast'"),
    (lambda d: d["strategy"].update(colour="red"), "strategy.colour"),
    (lambda d: d["placement"].update(layer_split=[0.5, 0.5]), "layer_split has 2 entries for 8 nodes"),
])
def test_bad_scenarios_give_one_clear_line(tmp_path, mutate, expected):
    result = run_cli("simulate", str(_write(tmp_path, mutate)))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_missing_file_and_bad_yaml(tmp_path):
    result = run_cli("simulate", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "scenario file not found" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    result = run_cli("simulate", str(bad))
    assert result.returncode != 0 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_bad_set_assignment():
    result = run_cli("simulate", "--set", "acceptance.alpha")
    assert result.returncode != 0 and "dotted.key=value" in result.stderr
