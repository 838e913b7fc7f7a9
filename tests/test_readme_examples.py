"""The README's examples work as written and leave the repository clean."""

from __future__ import annotations

import subprocess

import pytest

from tests.readme_examples import ROOT, readme_commands, run_examples, simulator_examples, written_paths


def test_readme_simulator_examples_run_and_write_only_under_runs(tmp_path, capsys):
    ran = run_examples(tmp_path)
    assert any(r.startswith("sweep ") for r in ran) and any(r.startswith("report ") for r in ran)
    assert any(r.startswith("simulate ") for r in ran)
    assert (tmp_path / "runs" / "bandwidth" / "report.md").is_file()
    assert (tmp_path / "runs" / "bandwidth" / "results.parquet").is_file()
    assert (tmp_path / "runs" / "trace.json").is_file() and (tmp_path / "runs" / "records.csv").is_file()


def test_every_readme_example_writes_into_an_ignored_folder():
    """Executor, calibration and MPI examples are not run here, but what they write must not be tracked."""
    commands = readme_commands()
    assert len(commands) > len(simulator_examples(commands))  # the others are checked too
    paths = [p for c in commands for p in written_paths(c.split()[1:])]
    assert paths
    try:
        ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git not available")
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert set(ignored.stdout.split()) == set(paths), f"not ignored: {set(paths) - set(ignored.stdout.split())}"


def test_readme_has_no_example_over_the_kept_reports():
    for command in readme_commands():
        for path in written_paths(command.split()[1:]):
            assert not path.startswith("reports/"), command
