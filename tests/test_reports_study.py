"""Studies: axes expand into validated points; bad study files fail with one line naming field and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipesim.reports.outcome import config_key
from pipesim.reports.study import expand_values, load_study, parse_set_options, study_from_dict
from pipesim.reports.traces import representative_points
from pipesim.scenario import ScenarioError

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "scenarios" / "studies"


def study(**fields):
    document = {"name": "t", "base": "../paper-8node-cpu.yaml", "set": {"workload.generate_tokens": 8}}
    document.update(fields)
    return study_from_dict(document, "t.yaml", STUDIES)


def test_cartesian_product_in_axis_order():
    s = study(axes={"network.bandwidth": ["10Mbit/s", "1Gbit/s"], "strategy.name": ["iterative", "pipeinfer"]})
    points = s.points()
    assert len(points) == s.n_points == 4
    assert [p.labels for p in points[:2]] == [{"network.bandwidth": "10Mbit/s", "strategy.name": "iterative"},
                                              {"network.bandwidth": "10Mbit/s", "strategy.name": "pipeinfer"}]
    assert points[0].scenario.network.bandwidth == pytest.approx(10e6 / 8)
    assert all(p.scenario.workload.generate_tokens == 8 for p in points)


def test_zip_and_variants_are_single_axes():
    s = study(zip=[{"network.bandwidth": ["100Mbit/s", "10Gbit/s"], "network.latency": ["1ms", "10us"]}],
              variants={"uniform": {}, "slow n3": {"cluster.overrides": [{"index": 3, "flops": "100G"}]}})
    assert s.axis_names == ["network.bandwidth+network.latency", "variant"]
    points = s.points()
    assert len(points) == 4
    assert points[0].labels["network.bandwidth+network.latency"] == "100Mbit/s / 1ms"
    slow = [p for p in points if p.labels["variant"] == "slow n3"][0]
    assert slow.scenario.cluster.overrides[0].flops == 100e9


def test_node_count_axis_drops_the_layer_split():
    s = study(axes={"cluster.count": [2, 8]})
    assert s.base_scenario().placement.layer_split is not None  # the paper's split stays on the base
    assert [p.scenario.placement.layer_split for p in s.points()] == [None, None]
    kept = study(axes={"cluster.count": [2]}, zip=[])
    assert kept.points()[0].scenario.cluster.count == 2


def test_generators():
    assert expand_values("network.bandwidth", {"logspace": [10, 1000], "num": 3, "unit": "Mbit/s"}) == [
        "10Mbit/s", "100Mbit/s", "1000Mbit/s"]
    assert expand_values("acceptance.alpha", {"linspace": [0.1, 0.9], "num": 5}) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert expand_values("cluster.count", {"range": [2, 9, 3]}) == [2, 5, 8]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"axes": {"network.bandwith": ["1Gbit/s"]}}, "network.bandwith='1Gbit/s'"),
    ({"axes": {"network.bandwidth": ["1Gbps/s"]}}, "network.bandwidth='1Gbps/s'"),
    ({"axes": {"acceptance.alpha": [0.5, 1.5]}}, "acceptance.alpha=1.5"),
    ({"axes": {"strategy.name": ["pipespeed"]}}, "strategy.name='pipespeed'"),
    ({"axis": {"acceptance.alpha": [0.5]}}, "axis: unknown study field"),
    ({"zip": [{"cluster.count": [2, 4], "network.latency": ["1ms"]}]}, "cluster.count has 2, network.latency has 1"),
    ({"axes": {"acceptance.alpha": 0.5}}, "axes.acceptance.alpha=0.5: expected a list"),
    ({"axes": {"cluster.count": [2]}, "variants": {"v": {"cluster.overrides": [{"index": 5, "flops": "1G"}]}}},
     "cluster.overrides index 5 is not a node (count=2)"),
])
def test_bad_studies_give_one_line_naming_field_and_value(fields, expected):
    with pytest.raises(ScenarioError) as error:
        study(**fields).points()
    message = str(error.value)
    assert "\n" not in message
    assert expected in message
    assert message.startswith("t.yaml")


def test_missing_files(tmp_path):
    with pytest.raises(ScenarioError, match="study file not found"):
        load_study(tmp_path / "nope.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "missing.yaml"}))
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_study(path)


def test_config_key_ignores_knobs_the_strategy_does_not_read():
    s = study(axes={"strategy.name": ["iterative", "speculative", "pipeinfer"],
                    "acceptance.alpha": [0.5, 0.9], "strategy.gamma": [2, 4]})
    keys = {}
    for p in s.points():
        keys.setdefault(p.scenario.strategy.name, set()).add(config_key(p.scenario))
    assert len(keys["iterative"]) == 1  # neither α nor γ changes an iterative run
    assert len(keys["speculative"]) == 4
    assert len(keys["pipeinfer"]) == 2  # γ is speculative's knob


def test_representative_point_defaults_to_the_base_values():
    s = study(axes={"network.bandwidth": ["10Mbit/s", "1Gbit/s", "10Gbit/s"],
                    "strategy.name": ["iterative", "pipeinfer"], "acceptance.seed": [3, 0]})
    chosen = representative_points(s, s.points())
    assert set(chosen) == {"iterative", "pipeinfer"}
    assert all(p.labels["network.bandwidth"] == "1Gbit/s" and p.labels["acceptance.seed"] == "0"
               for p in chosen.values())
    asked = study(axes={"network.bandwidth": ["10Mbit/s", "1Gbit/s"]}, representative={"network.bandwidth": "10Mbit/s"})
    assert representative_points(asked, asked.points())["pipeinfer"].labels["network.bandwidth"] == "10Mbit/s"
    with pytest.raises(ScenarioError, match="representative.network.bandwidth='5Mbit/s': not one of"):
        study(axes={"network.bandwidth": ["10Mbit/s"]}, representative={"network.bandwidth": "5Mbit/s"})
    with pytest.raises(ScenarioError, match="representative.cluster.count: not an axis"):
        study(axes={"network.bandwidth": ["10Mbit/s"]}, representative={"cluster.count": 4})


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_studies_load(path):
    s = load_study(path)
    assert s.n_points == len(s.points()) > 1
    assert s.points()[0].scenario.workload.generate_tokens <= 128


def test_set_options():
    assert parse_set_options(["workload.generate_tokens=16", "network.latency=1ms"]) == {
        "workload.generate_tokens": 16, "network.latency": "1ms"}
    with pytest.raises(ScenarioError, match="dotted.key=value"):
        parse_set_options(["oops"])
