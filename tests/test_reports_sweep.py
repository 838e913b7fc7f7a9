"""Sweeps: the tidy table, skipping points already computed, parallel = serial, traces, the commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipesim.reports.commands import main as reports_main
from pipesim.reports.parallel import SerialExecutor, mpi_world_size
from pipesim.reports.study import load_study
from pipesim.reports.sweep import RESULTS, RESULTS_CSV, SWEEP_META, read_results, run_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper-8node-cpu.yaml"
BANDWIDTHS = ["10Mbit/s", "1Gbit/s", "10Gbit/s"]
STRATEGIES = ["iterative", "speculative", "pipeinfer"]


def write_study(folder: Path, **axes) -> Path:
    document = {"name": "tiny", "base": str(PAPER),
                "set": {"workload.generate_tokens": 12, "workload.prompt_tokens": 16},
                "axes": axes or {"network.bandwidth": BANDWIDTHS, "strategy.name": STRATEGIES}}
    if "1Gbit/s" in document["axes"].get("network.bandwidth", []):
        document["representative"] = {"network.bandwidth": "1Gbit/s"}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    study = load_study(write_study(folder))
    result = run_sweep(study, folder / "out", jobs=1, progress=False)
    return study, result


def test_table_has_one_row_per_point_and_the_promised_columns(swept):
    study, result = swept
    table = read_results(result.out)
    assert len(table) == study.n_points == 9
    assert result.simulated == 9 and result.reused == 0 and result.failed == 0
    expected = {"point", "network.bandwidth", "strategy.name", "config_key", "strategy", "bandwidth_bps", "nodes",
                "alpha", "gamma", "micro_batch", "acceptance_seed", "workload_seed", "tokens_per_s", "ttft_s",
                "itl_p50_s", "itl_p99_s", "acceptance_rate", "wasted_compute_fraction", "runs_cancelled", "util.n0",
                "util.n7", "util_mean", "link_util_max", "analytic_tokens_per_s", "analytic_ttft_s", "error"}
    assert expected <= set(table.columns)
    assert list(table["network.bandwidth"]) == [b for b in BANDWIDTHS for _ in STRATEGIES]
    assert table["bandwidth_bps"].iloc[0] == pytest.approx(10e6)
    assert table["config_key"].is_unique
    assert (table["generated_tokens"] == 12).all()
    csv = pd.read_csv(result.out / RESULTS_CSV)
    assert len(csv) == 9 and list(csv.columns) == list(table.columns)
    meta = json.loads((result.out / SWEEP_META).read_text())
    assert meta["label_columns"] == ["network.bandwidth", "strategy.name"]
    assert meta["study"]["base_document"]["workload"]["generate_tokens"] == 12


def test_rerun_skips_points_already_computed(swept, tmp_path):
    study, first = swept
    out = tmp_path / "out"
    shutil.copytree(first.out, out)
    again = run_sweep(study, out, jobs=1, progress=False)
    assert again.simulated == 0 and again.reused == 9
    pd.testing.assert_frame_equal(again.table.drop(columns="sim_runtime_s"),
                                  first.table.drop(columns="sim_runtime_s"), check_dtype=False)
    grown = load_study(write_study(tmp_path, **{"network.bandwidth": [*BANDWIDTHS, "100Mbit/s"],
                                                "strategy.name": STRATEGIES}))
    more = run_sweep(grown, out, jobs=1, progress=False)
    assert (more.simulated, more.reused, len(more.table)) == (3, 9, 12)
    forced = run_sweep(study, out, jobs=1, progress=False, force=True)
    assert forced.simulated == 9


def test_a_changed_simulator_does_not_reuse_old_results(swept, tmp_path, monkeypatch):
    import pipesim.reports.sweep as sweep_module

    study, first = swept
    out = tmp_path / "out"
    shutil.copytree(first.out, out)
    monkeypatch.setattr(sweep_module, "code_fingerprint", lambda: "another-simulator")
    again = run_sweep(study, out, jobs=1, progress=False, traces=False)
    assert (again.simulated, again.reused) == (9, 0)


def test_parallel_processes_give_the_serial_table(swept, tmp_path):
    study, serial = swept
    parallel = run_sweep(study, tmp_path / "p", jobs=2, progress=False, traces=False)
    assert parallel.backend == "processes"
    columns = ["config_key", "tokens_per_s", "ttft_s", "itl_p99_s", "util_mean", "runs_launched"]
    pd.testing.assert_frame_equal(parallel.table[columns], serial.table[columns])


def test_representative_traces_are_kept(swept):
    _, result = swept
    index = json.loads((result.out / "traces" / "index.json").read_text())
    assert set(index) == set(STRATEGIES)
    for strategy, entry in index.items():
        assert entry["labels"]["network.bandwidth"] == "1Gbit/s"
        chrome = json.loads((result.out / "traces" / entry["chrome"]).read_text())
        assert chrome["traceEvents"]
        records = pd.read_parquet(result.out / "traces" / entry["records"])
        assert {"kind", "t0", "t1", "where", "run_id"} <= set(records.columns)
        assert entry["config_key"] in set(result.table.loc[result.table["strategy"] == strategy, "config_key"])


def test_dedup_simulates_each_configuration_once(tmp_path):
    study = load_study(write_study(tmp_path, **{"strategy.name": ["iterative"], "acceptance.alpha": [0.3, 0.6, 0.9]}))
    result = run_sweep(study, tmp_path / "out", jobs=1, progress=False, traces=False)
    assert len(result.table) == 3 and result.simulated == 1
    assert result.table["alpha"].tolist() == [0.3, 0.6, 0.9]


def test_failed_points_are_recorded_not_fatal(tmp_path, monkeypatch):
    import pipesim.reports.outcome as outcome

    def boom(scenario):
        if scenario.strategy.name == "pipeinfer":
            raise RuntimeError("simulator exploded")
        return real(scenario)

    real = outcome.simulate
    monkeypatch.setattr(outcome, "simulate", boom)
    study = load_study(write_study(tmp_path, **{"strategy.name": ["iterative", "pipeinfer"]}))
    result = run_sweep(study, tmp_path / "out", jobs=1, progress=False, traces=False)
    assert result.failed == 1
    assert result.table.loc[1, "error"] == "RuntimeError: simulator exploded"
    monkeypatch.setattr(outcome, "simulate", real)
    retried = run_sweep(study, tmp_path / "out", jobs=1, progress=False, traces=False)
    assert (retried.simulated, retried.failed) == (1, 0)  # failures are not cached


def test_sweep_command_and_one_line_errors(tmp_path, capsys):
    study = write_study(tmp_path, **{"strategy.name": ["iterative"]})
    assert reports_main(["sweep", str(study), "--out", str(tmp_path / "o"), "--jobs", "1", "-q"]) == 0
    assert "1 points" in capsys.readouterr().out
    assert (tmp_path / "o" / RESULTS).is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(PAPER), "axes": {"network.bandwidth": ["fast"]}}))
    assert reports_main(["sweep", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "network.bandwidth='fast'" in err and "bad.yaml" in err


def test_mpi_detection_and_serial_executor():
    assert mpi_world_size({}) == 1
    assert mpi_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert mpi_world_size({"PMI_SIZE": "3"}) == 3
    assert SerialExecutor().submit(pow, 2, 5).result() == 32


@pytest.mark.mpi
def test_sweep_over_mpi_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    study = write_study(tmp_path, **{"network.bandwidth": BANDWIDTHS[:2], "strategy.name": ["iterative", "speculative"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_"))}
    run = subprocess.run([mpiexec, "-n", "3", sys.executable, "-m", "pipesim.reports", "sweep", str(study), "--out",
                          str(tmp_path / "o"), "-q", "--no-traces"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert "(mpi x2)" in run.stdout
    assert run.stdout.count("4 points") == 1  # only the root reports
    assert len(read_results(tmp_path / "o")) == 4
