"""End to end: `pipesim calibrate` then `pipesim validate` on the tiny scenario in emulated compute.

Nothing here depends on the machine's load: an emulated stage sleeps for its modelled cost and a sleep never ends
early, so measured and fitted times have lower bounds but no upper ones (a loaded machine wakes late), and the
simulator's side is deterministic. How close the predictions come is measured, not tested: see
``reports/calibration``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.sim import simulate
from pipesim.world.build import build_world
from pipesim.world.profile import HardwareProfile

pytestmark = pytest.mark.mpi

SCENARIO = "scenarios/local-tiny.yaml"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipesim.cli", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_calibrate_then_validate_in_emulated_mode(tmp_path):
    profile_path = tmp_path / "profile.yaml"
    _cli("calibrate", SCENARIO, "--ranks", "2", "--out", str(profile_path), "--repeats", "2",
         "--set", "executor.compute=emulated", "--iterative-tokens", "12")
    profile = HardwareProfile.load(profile_path)
    assert set(profile.nodes) == {"n0", "n1"} and set(profile.links) == {"n0->n1", "n1->n0"}
    assert profile.meta["compute"] == "emulated" and profile.meta["hosts"]["n0"]
    # both ranks share this machine: the probe measured them alone and together; sleeping stages do not contend
    raw = json.loads(profile_path.with_suffix(".raw.json").read_text())
    assert all(len(r["concurrent"]["alone"]) == len(r["concurrent"]["together"]) == 3 for r in raw["ranks"])
    assert all(node.concurrent_slowdown >= 1.0 for node in profile.nodes.values())
    # PipeInfer's reference KV transactions, relayed through both ranks: a time per transaction for each node
    # (emulated compute: receiving, forwarding and the message alone), the median of the probe's bursts
    assert all(node.kv_transaction is not None and 0 < node.kv_transaction < float("inf")
               for node in profile.nodes.values())
    for report in raw["ranks"]:
        bursts = report["kv_transactions"]["bursts"]
        assert bursts and all(b["n"] == 4 * load_scenario(SCENARIO).strategy.n_partitions + 8 for b in bursts)
        assert profile.nodes[report["node"]].kv_transaction == report["kv_transactions"]["seconds_per_transaction"]
    # the executor's idle polling, as the simulator will charge it: its backoff and each rank's timer overshoot
    scenario_poll = load_scenario(SCENARIO).executor.poll_interval_s
    assert profile.poll["longest"] == scenario_poll and 0 < profile.poll["first"] <= scenario_poll
    assert 0 <= profile.poll["overshoot"] and all(r["sleep_overshoot"] >= 0 for r in raw["ranks"])
    # emulated stages sleep for the scenario's modelled cost: the fitted profile must find that cost again
    scenario = load_scenario(SCENARIO, ["executor.compute=emulated"])
    world = build_world(scenario)
    for n_tokens, context in [(1, 0), (8, 64)]:
        modelled = world.target.cost.stage_cost(world.nodes[0], 2, n_tokens, context, 0).total
        fitted, _ = profile.nodes["n0"].stage_time(2, n_tokens, context, 0)
        # a sleep never ends early (the fit may shave a little off a single point)
        assert 0.9 * modelled <= fitted
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"strategies": ["iterative", "speculative", "pipeinfer"], "alphas": [0.5],
                                    "bandwidths": ["1Gbit/s"], "generate_tokens": 16, "rounds": 2,
                                    "anchor_tokens": 12}))
    out = tmp_path / "validation"
    result = _cli("validate", str(profile_path), "--grid", str(grid), "--out", str(out))
    assert "validation of 3 configurations" in result.stdout
    table = pd.read_csv(out / "validation.csv")
    assert {"config", "metric", "predicted", "measured", "rel_error"} <= set(table.columns)
    assert table["config"].nunique() == 3 and (table["rounds"] == 2).all()
    # the anchored profile of each round sits beside the traces, scaled per node
    for r in (0, 1):
        anchored = HardwareProfile.load(out / "profile" / f"profile-anchored-round{r}.yaml")
        assert set(anchored.meta["anchor_scales"]) == {"n0", "n1"}
        for scales in anchored.meta["anchor_scales"].values():
            assert scales["single"] > 0 and scales["multi"] > 0, scales
    assert set(table["round"]) <= {0, 1}
    assert table["rel_error_anchored"].notna().any()
    assert {"tokens_per_s", "ttft_s", "itl_p50_s", "itl_p99_s", "node_utilization.n0"} <= set(table["metric"])
    recomputed = (table["predicted"] - table["measured"]) / table["measured"]
    assert (recomputed - table["rel_error"]).abs().max() < 1e-9
    assert table["output_matches"].all()  # the executor produced the synthetic target's tokens
    tps = table[table["metric"] == "tokens_per_s"].set_index("strategy")
    # the prediction is the simulator run with the profile on the configuration (deterministic: re-simulated here)
    sets = [*profile.meta.get("sets", []), "workload.generate_tokens=16", "workload.seed=0", "strategy.name=iterative",
            "executor.link_emulation=true", "network.bandwidth=1Gbit/s", "network.latency=100us",
            "network.profile_links=add", f"cluster.profile={profile_path}"]
    predicted = compute_metrics(simulate(load_scenario(SCENARIO, sets)))["tokens_per_s"]
    assert tps.loc["iterative", "predicted"] == pytest.approx(predicted, rel=1e-9)
    # measured: each iterative token passes both stages (2 of the 4 layers each), whose sleeps never end early, so
    # the measured rate cannot beat the modelled compute (a wrong clock or unit, or stages that skip, would)
    per_token = sum(world.target.cost.stage_cost(node, 2, 1, 0, 0).total for node in world.nodes)
    assert 0 < tps.loc["iterative", "measured"] <= 1.0 / per_token
    assert (tps["measured"] > 0).all() and (tps["predicted"] > 0).all()
    for name in ("parity.png", "validation.md", "summary.csv"):
        assert (out / name).stat().st_size > 0
