"""benchmarks/sim_speed.py --compare-rev: the old side really runs the revision's code, the same measurement."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sim_speed", ROOT / "benchmarks" / "sim_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def in_git():
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")


def test_a_revision_is_measured_from_its_own_tree(tmp_path, in_git):
    bench = load_benchmark()
    commit = bench.extract_revision("HEAD", tmp_path)
    assert len(commit) == 40 and (tmp_path / "pipesim" / "sim" / "engine.py").is_file()
    scenario = str(ROOT / "scenarios" / "paper-8node-cpu.yaml")
    old = bench.measure_in(tmp_path, scenario, "speculative", 16, 1)  # raises if pipesim came from elsewhere
    new = bench.measure_in(ROOT, scenario, "speculative", 16, 1)
    assert old["tokens"] == new["tokens"] == 16
    assert old["events"] > 0 and new["events"] > 0
    empty = tmp_path / "empty"  # no pipesim there: the child imports an installed copy, which is refused, or none
    empty.mkdir()
    with pytest.raises(SystemExit, match="expected pipesim from|No module named 'pipesim'"):
        bench.measure_in(empty, scenario, "speculative", 16, 1)
    with pytest.raises(SystemExit, match="not a git revision"):
        bench.extract_revision("no-such-revision-xyz", tmp_path)
