"""``benchmarks/gpu_validation.sh`` end to end on the CPU (``--device cpu --reduced``): calibrate, then a held-out
validation, as the GPU run does it; and its bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipesim.world.profile import HardwareProfile

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_validation.sh"
HELD_OUT = {"pipeinfer", "pipespec", "speed"}


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_the_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    result = _run("--device", "cpu", "--reduced", "--no-install", "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    profile = HardwareProfile.load(out / "profile.yaml")
    assert profile.meta["calibrated_on"] == ["iterative", "speculative"]
    assert "executor.device=cpu" in profile.meta["sets"] and "executor.pin_ranks=true" in profile.meta["sets"]
    assert profile.meta["machine_load"]["cpus"] >= 1
    table = pd.read_csv(out / "validation" / "validation.csv")
    tps = table[table["metric"] == "tokens_per_s"]
    assert set(tps["strategy"]) == {"iterative", "speculative"} | HELD_OUT
    assert (tps["held_out"] == tps["strategy"].isin(HELD_OUT)).all()
    if Path("/proc/stat").exists():
        assert tps["steal_fraction"].between(0, 1).all() and (tps["load1_mean"] >= 0).all()
    summary = pd.read_csv(out / "validation" / "summary.csv")
    scopes = set(summary["scope"])
    assert {"held-out", "calibration strategies"} | {f"held-out {s}" for s in HELD_OUT} <= scopes
    held = summary[(summary["scope"] == "held-out") & (summary["metric"] == "tokens_per_s")].iloc[0]
    assert held["configs"] == 3
    assert held["median"] == pytest.approx(tps[tps["held_out"]]["rel_error"].abs().median())
    report = (out / "validation" / "validation.md").read_text()
    assert report.splitlines()[2].startswith("**Held out.** Calibrated on iterative, speculative runs only")
    assert "steal" in report and "calibrate" in (out / "steps.txt").read_text()
    assert "device: cpu" in (out / "environment.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device tpu: must be cpu, cuda or auto"),
    (["--ranks", "1"], "--ranks 1: must be an integer >= 2"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_options_are_one_clear_line(args, message):
    result = _run(*args, "--no-install", timeout=30)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_cuda_without_a_gpu_stops_before_any_rank_starts(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = _run("--device", "cuda", "--reduced", "--no-install", "--out", str(tmp_path / "gpu"), timeout=60)
    assert result.returncode == 2 and "--device cuda but torch sees no CUDA device" in result.stderr
    assert not (tmp_path / "gpu" / "profile.yaml").exists()
