"""Held-out validation: which configurations are held out, what the anchors may use, the profile check, and the
held-out scopes of the summary (errors computed by hand)."""

from __future__ import annotations

import pandas as pd
import pytest

from pipesim.calibration.validate import Grid, check_held_out, summarize
from pipesim.scenario import ScenarioError
from pipesim.world.profile import HardwareProfile


def _profile(calibrated_on):
    meta = {} if calibrated_on is None else {"calibrated_on": calibrated_on}
    return HardwareProfile("m", {}, {}, 0.0, meta)


def test_held_out_strategies_and_their_overrides():
    grid = Grid(strategies=["iterative", "pipespec", "speed"], alphas=[0.5], bandwidths=["1Gbit/s"],
                strategy_sets={"speed": ["strategy.exit_layer=2"]}, calibrate_on=["iterative", "speculative"])
    assert [grid.held_out(s) for s in ("iterative", "speculative", "pipespec", "speed")] == [False, False, True, True]
    labels = dict(grid.variants())
    assert "strategy.exit_layer=2" in labels["speed bw=1Gbit/s a=0.5"]
    assert "strategy.exit_layer=2" not in labels["pipespec bw=1Gbit/s a=0.5"]
    assert Grid().held_out("pipeinfer") is None  # no split asked


def test_anchors_use_only_the_calibration_strategies():
    assert [label for label, _ in Grid().anchors(True)] == ["anchor iterative", "anchor speculative"]
    only = Grid(calibrate_on=["iterative"])
    assert [label for label, _ in only.anchors(True)] == ["anchor iterative"]


@pytest.mark.parametrize("calibrated_on, strategies, message", [
    (["iterative", "pipeinfer"], ["iterative", "pipeinfer"], "also calibrated on pipeinfer"),
    (None, ["iterative", "pipeinfer"], "does not record the strategies"),
    (["iterative"], ["iterative", "speculative"], "hold none out"),
])
def test_a_held_out_validation_refuses_what_is_not_held_out(tmp_path, calibrated_on, strategies, message):
    grid = Grid(strategies=strategies, calibrate_on=["iterative", "speculative"])
    with pytest.raises(ScenarioError, match=message):
        check_held_out(_profile(calibrated_on), grid, tmp_path / "p.yaml")


def test_a_profile_calibrated_on_a_subset_passes(tmp_path):
    grid = Grid(strategies=["iterative", "pipeinfer"], calibrate_on=["iterative", "speculative"])
    check_held_out(_profile(["iterative"]), grid, tmp_path / "p.yaml")


def test_summary_reports_the_held_out_strategies_apart():
    rows = []
    for config, strategy, held, rel in [("a", "iterative", False, 0.02), ("b", "speculative", False, -0.04),
                                        ("c", "pipeinfer", True, 0.30), ("d", "pipeinfer", True, -0.10),
                                        ("e", "speed", True, 0.05)]:
        rows.append({"config": config, "metric": "tokens_per_s", "strategy": strategy, "held_out": held,
                     "predicted": 1 + rel, "measured": 1.0, "rel_error": rel, "predicted_replay": 1 + rel,
                     "rel_error_replay": rel, "predicted_anchored": 1.0, "rel_error_anchored": 0.0})
    summary = summarize(pd.DataFrame(rows)).set_index(["scope", "metric"])
    held = summary.loc[("held-out", "tokens_per_s")]
    assert held["configs"] == 3 and held["median"] == pytest.approx(0.10) and held["worst"] == pytest.approx(0.30)
    assert summary.loc[("calibration strategies", "tokens_per_s")]["median"] == pytest.approx(0.03)
    assert summary.loc[("held-out pipeinfer", "tokens_per_s")]["median"] == pytest.approx(0.20)
    assert summary.loc[("held-out speed", "tokens_per_s")]["worst"] == pytest.approx(0.05)
    assert summary.loc[("all", "tokens_per_s")]["median"] == pytest.approx(0.05)


@pytest.mark.parametrize("value", ["iterative,bogus", ","])
def test_calibrate_on_names_known_strategies(tmp_path, capsys, value):
    from pipesim import cli

    code = cli.main(["validate", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "o"), "--calibrate-on", value])
    err = capsys.readouterr().err
    assert code != 0 and "--calibrate-on" in err and "choose from" in err and "Traceback" not in err
