"""Sweeps that never lose or mix data: concurrent sweeps, a second writer, another study in the folder, kill -9
and signals (no worker left, one line, resume exactly once), and the streamed table equal to the in-memory one."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import pipesim.reports.sweep as sweep_module
from pipesim.reports.cache import CACHE_FILE
from pipesim.reports.commands import main as reports_main
from pipesim.reports.folder import FolderBusyError
from pipesim.reports.outcome import code_fingerprint, config_key, evaluate
from pipesim.reports.study import load_study
from pipesim.reports.sweep import SWEEP_META, build_table, read_meta, read_results, run_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper-8node-cpu.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")

# The sweep command with every simulation slowed by 50 ms, so a test can act while points are in flight.
SLOW_SWEEP = """
import sys, time
import pipesim.reports.outcome as outcome
real = outcome.simulate
def slow(scenario):
    time.sleep(0.05)
    return real(scenario)
outcome.simulate = slow
from pipesim.reports.commands import main
sys.exit(main(sys.argv[1:]))
"""


def write_study(folder: Path, name: str = "tiny", seeds: int = 4, strategies=("speculative",), **extra) -> Path:
    document = {"name": name, "base": str(PAPER), "set": {"workload.generate_tokens": 8, "workload.prompt_tokens": 16},
                "axes": {"strategy.name": list(strategies), "acceptance.seed": {"range": [0, seeds]}, **extra}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


_STARTED: list[subprocess.Popen] = []  # every sweep a test started, ended at its teardown if still running


@pytest.fixture(autouse=True)
def _end_started_sweeps():
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:  # a test failed before its sweep ended: leave nothing running
            process.kill()
            process.wait(timeout=30)


def start_sweep(study: Path, out: Path, *extra: str, slow: bool = True) -> subprocess.Popen:
    code = ["-c", SLOW_SWEEP] if slow else ["-m", "pipesim.reports"]
    process = subprocess.Popen([sys.executable, *code, "sweep", str(study), "--out", str(out), "-q", *extra],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _STARTED.append(process)
    return process


def cached_rows(out: Path) -> int:
    path = out / CACHE_FILE
    if not path.is_file():
        return 0
    try:
        with sqlite3.connect(path) as db:
            return int(db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for_rows(process: subprocess.Popen, out: Path, rows: int) -> None:
    """Until the running sweep has stored ``rows`` outcomes (it must still be running then)."""
    deadline = time.monotonic() + 120
    while cached_rows(out) < rows:
        assert process.poll() is None, f"the sweep ended before storing {rows} points: {process.communicate()}"
        assert time.monotonic() < deadline, "the sweep stored no points"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited process whose parent has not reaped it yet)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except FileNotFoundError:
        return False
    return "zombie" not in state


def assert_all_end(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if running(p)], "worker processes outlived the sweep"


def test_concurrent_sweeps_into_different_folders_do_not_collide(tmp_path):
    study = write_study(tmp_path, seeds=3)
    outs = [tmp_path / f"out{i}" for i in range(4)]
    processes = [start_sweep(study, out, "-j", "1", "--no-traces", slow=False) for out in outs]
    for process, out in zip(processes, outs, strict=True):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert sorted(read_results(out)["point"]) == [0, 1, 2]
        assert not [p.name for p in out.iterdir() if p.name.endswith(".partial") or p.name.startswith(".parts-")]


def test_a_second_writer_of_one_folder_is_refused(tmp_path):
    study = load_study(write_study(tmp_path, seeds=2))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from pipesim.reports.folder import locked_folder\n"
                               f"with locked_folder(Path({str(out)!r}), 'other-study'):\n"
                               "    print('held', flush=True); sys.stdin.read()"],
                              env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError) as refused:
            run_sweep(study, out, jobs=1, progress=False, traces=False)
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "'other-study'" in message and "another --out" in message
        assert not (out / "results.parquet").exists()
    finally:
        holder.communicate("", timeout=30)
    assert run_sweep(study, out, jobs=1, progress=False, traces=False).points == 2  # free again


def test_another_study_in_the_folder_is_refused_with_the_fix(tmp_path, capsys):
    first, other = write_study(tmp_path, "alpha-study", seeds=2), write_study(tmp_path, "beta-study", seeds=3)
    out = tmp_path / "out"
    assert reports_main(["sweep", str(first), "--out", str(out), "-j", "1", "-q", "--no-traces"]) == 0
    capsys.readouterr()
    assert reports_main(["sweep", str(other), "--out", str(out), "-j", "1", "-q", "--no-traces"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "study 'alpha-study'" in err and "'beta-study'" in err and "--force" in err and "another --out" in err
    assert len(read_results(out)) == 2 and read_meta(out)["study"]["name"] == "alpha-study"  # untouched
    assert reports_main(["sweep", str(other), "--out", str(out), "-j", "1", "-q", "--no-traces", "--force"]) == 0
    assert len(read_results(out)) == 3 and read_meta(out)["study"]["name"] == "beta-study"


def test_kill_9_leaves_no_workers_and_resume_completes_every_point_once(tmp_path):
    n = 200
    study_path = write_study(tmp_path, seeds=n)
    out = tmp_path / "out"
    process = start_sweep(study_path, out, "-j", "2", "--no-traces")
    wait_for_rows(process, out, 10)  # stored while the sweep still runs: flushed batch by batch
    workers = children(process.pid)
    assert len(workers) == 2
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert_all_end(workers)
    kept = cached_rows(out)
    assert 10 <= kept < n
    resumed = run_sweep(load_study(study_path), out, jobs=1, progress=False, traces=False)
    assert (resumed.reused, resumed.simulated, resumed.failed) == (kept, n - kept, 0)
    table = read_results(out)
    assert sorted(table["point"]) == list(range(n))
    assert table["config_key"].is_unique and cached_rows(out) == n


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_workers_keeps_the_points_and_prints_one_line(tmp_path, signum):
    out = tmp_path / "out"
    process = start_sweep(write_study(tmp_path, seeds=200), out, "-j", "2", "--no-traces")
    wait_for_rows(process, out, 5)
    workers = children(process.pid)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and signal.Signals(signum).name in lines[0], err
    assert_all_end(workers)
    table = read_results(out)  # the table holds exactly the stored points
    assert len(table) == cached_rows(out) >= 5 and table["point"].is_unique
    assert read_meta(out)["state"] == "interrupted"


def test_streamed_table_equals_the_in_memory_table(tmp_path, monkeypatch):
    """Windows of 3 points: several parts, with differing util.nK columns (2 or 4 nodes) and a failed point."""
    import pipesim.reports.outcome as outcome

    real = outcome.simulate

    def fails_once(scenario):
        if scenario.cluster.count == 4 and scenario.acceptance.seed == 1 and scenario.strategy.name == "pipeinfer":
            raise RuntimeError("simulator exploded")
        return real(scenario)

    monkeypatch.setattr(outcome, "simulate", fails_once)
    monkeypatch.setattr(sweep_module, "WINDOW_POINTS", 3)
    study = load_study(write_study(tmp_path, seeds=2, strategies=("iterative", "pipeinfer"),
                                   **{"cluster.count": [2, 4]}))
    result = run_sweep(study, tmp_path / "out", jobs=1, progress=False, traces=False)
    assert (result.points, result.failed) == (8, 1)
    streamed = read_results(tmp_path / "out")
    points = study.points()
    code = code_fingerprint()
    keys = [config_key(p.scenario, code) for p in points]
    outcomes = {k: evaluate(p.scenario.model_dump(mode="json")) for p, k in zip(points, keys, strict=True)}
    memory = build_table(study, points, keys, outcomes)
    assert list(streamed.columns) == list(memory.columns)
    assert {"util.n0", "util.n3"} <= set(streamed.columns)
    pd.testing.assert_frame_equal(streamed.drop(columns="sim_runtime_s"), memory.drop(columns="sim_runtime_s"),
                                  check_dtype=False)
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(csv.columns) == list(memory.columns) and len(csv) == 8


def test_the_table_is_complete_before_the_traces_are_simulated(tmp_path, monkeypatch):
    seen = {}

    def inspect(out, chosen, code=""):
        seen["rows"] = len(read_results(out))
        seen["state"] = read_meta(out)["state"]
        return {}

    monkeypatch.setattr(sweep_module, "write_traces", inspect)
    study = load_study(write_study(tmp_path, seeds=5))
    run_sweep(study, tmp_path / "out", jobs=1, progress=False)
    assert seen == {"rows": 5, "state": "traces"}
    assert (tmp_path / "out" / SWEEP_META).is_file() and read_meta(tmp_path / "out")["state"] == "complete"
