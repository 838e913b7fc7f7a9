"""Fitting the cost model: known coefficients are recovered from synthetic measurements."""

from __future__ import annotations

import numpy as np
import pytest

from pipesim.calibration.calibrate import concurrent_slowdown
from pipesim.calibration.fit import (
    DraftSample,
    LinkSample,
    StageSample,
    fit_draft,
    fit_link,
    fit_stage,
    nonnegative_least_squares,
)
from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.sim import SimulationEngine
from pipesim.world.profile import HardwareProfile, LinkCoefficients, NodeCoefficients


def test_nnls_matches_lstsq_when_the_solution_is_positive_and_clips_otherwise():
    rng = np.random.default_rng(0)
    a = rng.random((30, 3))
    x = np.array([0.5, 2.0, 1.0])
    assert np.allclose(nonnegative_least_squares(a, a @ x), x)
    y = a @ np.array([1.0, -3.0, 2.0])
    solution = nonnegative_least_squares(a, y)
    assert (solution >= 0).all() and solution[1] == 0


def test_stage_fit_recovers_known_coefficients_under_noise():
    truth = dict(overhead=2e-4, layer_fixed=1.5e-3, layer_per_token=3e-4, layer_per_token_context=2e-7,
                 head_fixed=4e-3, head_per_output=1e-3)
    rng = np.random.default_rng(1)
    samples = []
    for n_layers in (2, 4, 8):
        for n_tokens in (1, 2, 4, 8, 16):
            for context in (0, 64, 256, 1024):
                for n_outputs in (0, n_tokens):
                    t = truth["overhead"] + n_layers * (truth["layer_fixed"] + truth["layer_per_token"] * n_tokens
                                                        + truth["layer_per_token_context"] * n_tokens * context)
                    if n_outputs:
                        t += truth["head_fixed"] + truth["head_per_output"] * n_outputs
                    samples.append(StageSample(n_layers, n_tokens, context, n_outputs, t * rng.normal(1, 0.01)))
    fit = fit_stage(samples)
    for name, value in truth.items():
        assert getattr(fit, name) == pytest.approx(value, rel=0.1), name
    assert fit.quality.median_rel_error < 0.02
    assert fit.predict(4, 3, 100, 3) == pytest.approx(
        truth["overhead"] + 4 * (1.5e-3 + 9e-4 + 3 * 100 * 2e-7) + 4e-3 + 3e-3, rel=0.03)


def test_stage_fit_with_one_layer_count_puts_the_fixed_part_in_the_layers():
    samples = [StageSample(5, n, c, 0, 5 * (1e-3 + 1e-4 * n + 1e-8 * n * c)) for n in (1, 4, 16) for c in (0, 500)]
    fit = fit_stage(samples)
    assert fit.overhead == 0 and fit.layer_fixed == pytest.approx(1e-3, rel=1e-6)


def test_link_fit_recovers_latency_and_bandwidth():
    latency, bandwidth = 50e-6, 125e6
    samples = [LinkSample(s, latency + s / bandwidth) for s in (8, 1024, 65536, 1 << 20, 1 << 22)]
    fit = fit_link(samples)
    assert fit.latency == pytest.approx(latency, rel=1e-6) and fit.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    with pytest.raises(ValueError, match="2 different sizes"):
        fit_link([LinkSample(8, 1e-5), LinkSample(8, 2e-5)])


def test_draft_fit():
    samples = [DraftSample(n, c, 2e-3 + 5e-4 * n + 1e-7 * n * c) for n in (1, 2, 8, 32) for c in (0, 200, 800)]
    fit = fit_draft(samples)
    assert (fit.fixed, fit.per_token, fit.per_token_context) == pytest.approx((2e-3, 5e-4, 1e-7), rel=1e-6)


def test_profile_round_trip_and_drives_the_simulator(tmp_path):
    nodes = {f"n{i}": NodeCoefficients(overhead=1e-4, layer_fixed=1e-3, layer_per_token=1e-4, head_fixed=2e-3,
                                       head_per_output=5e-4, draft_fixed=3e-3, draft_per_token=1e-4,
                                       draft_per_token_context=0.0, host=f"host{i}") for i in range(4)}
    profile = HardwareProfile("llama-2-7b", nodes, {"n0->n1": LinkCoefficients(1e-5, 1e9)}, verify_overhead=1e-4,
                              meta={"command": "test"})
    path = profile.save(tmp_path / "profile.yaml")
    loaded = HardwareProfile.load(path)
    assert loaded.nodes["n2"].host == "host2" and loaded.links["n0->n1"].bandwidth == 1e9
    scenario = load_scenario("pipesim/data/default.yaml", [f"cluster.profile={path}", "strategy.name=iterative",
                                                             "network.profile_links=ignore",
                                                             "workload.generate_tokens=20"])
    metrics = compute_metrics(SimulationEngine(scenario).run())
    # iterative with a profile: per token = 4 stages of 8 layers + head + links + verify overhead; links of the
    # default scenario (1 Gbit/s, 100 us) carry the executor's frames: a one-token run with Llama-2-7B's 4096
    # float32 activations, and 32000 float32 logits back
    stage = 1e-4 + 8 * (1e-3 + 1e-4)
    activations, logits = 8 * (3 + 6 + 2 + 1) + 4096 * 4, 8 * (3 + 4) + 32000 * 4
    links = 3 * (100e-6 + activations / 125e6) + 100e-6 + logits / 125e6
    expected = 4 * stage + 2e-3 + 5e-4 + links + 1e-4
    assert metrics["tokens_per_s"] == pytest.approx(1 / expected, rel=1e-6)


def test_bad_profiles(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        HardwareProfile.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: something-else\n")
    with pytest.raises(ValueError, match="not a pipesim hardware profile"):
        HardwareProfile.load(bad)


def test_concurrent_slowdown_is_the_median_ratio_and_never_below_one():
    alone = [{"n_tokens": n, "context": 64, "seconds": t} for n, t in ((1, 0.010), (4, 0.020), (16, 0.050))]
    together = [{"n_tokens": n, "context": 64, "seconds": t} for n, t in ((1, 0.013), (4, 0.030), (16, 0.070))]
    assert concurrent_slowdown({"alone": alone, "together": together}) == pytest.approx(1.4)
    faster = [{**s, "seconds": 0.9 * s["seconds"]} for s in alone]
    assert concurrent_slowdown({"alone": alone, "together": faster}) == 1.0
    assert concurrent_slowdown(None) == 1.0 and concurrent_slowdown({"alone": [], "together": []}) == 1.0


def test_dispatch_time_keeps_a_node_busy_but_is_not_compute(tmp_path):
    def run(dispatch: float):
        nodes = {f"n{i}": NodeCoefficients(overhead=1e-4, layer_fixed=1e-3, layer_per_token=1e-4, head_fixed=2e-3,
                                           head_per_output=5e-4, host=f"host{i}", dispatch=dispatch)
                 for i in range(4)}
        path = HardwareProfile("llama-2-7b", nodes, {}).save(tmp_path / f"d{dispatch}.yaml")
        scenario = load_scenario("pipesim/data/default.yaml", [f"cluster.profile={path}", "strategy.name=iterative",
                                                                 "workload.generate_tokens=20"])
        trace = SimulationEngine(scenario).run()
        return trace, compute_metrics(trace)

    plain, plain_metrics = run(0.0)
    busy, busy_metrics = run(2e-3)
    # every run pays 2 ms on each of the 4 stages: 8 ms more per token
    assert 1 / busy_metrics["tokens_per_s"] == pytest.approx(1 / plain_metrics["tokens_per_s"] + 8e-3, rel=1e-6)
    spans = [r for r in busy.records if r.kind == "dispatch"]
    assert len(spans) == 4 * 20 and all(r.t1 - r.t0 == pytest.approx(2e-3) for r in spans)
    assert not plain.of_kind("dispatch")
    # utilization counts compute only: the same compute over a longer run
    for name in ("n1", "n2", "n3"):
        compute = plain_metrics["node_utilization"][name] * plain_metrics["wall_s"]
        assert busy_metrics["node_utilization"][name] == pytest.approx(compute / busy_metrics["wall_s"], rel=1e-6)


def test_summary_reports_all_configurations_and_each_compute_mode_apart():
    import pandas as pd

    from pipesim.calibration.validate import summarize

    rows = []
    for compute, errors in (("real", [0.10, -0.02, 0.04]), ("emulated", [0.01, -0.03, 0.02])):
        for i, err in enumerate(errors):
            for metric, measured in (("tokens_per_s", 10.0), ("node_utilization.n0", 0.5)):
                predicted = measured * (1 + err)
                rows.append({"config": f"{compute} {i}", "compute": compute, "metric": metric, "measured": measured,
                             "predicted": predicted, "rel_error": err, "predicted_replay": predicted,
                             "rel_error_replay": err, "predicted_anchored": measured, "rel_error_anchored": 0.0})
    summary = summarize(pd.DataFrame(rows)).set_index(["scope", "metric"])
    assert set(summary.index.get_level_values("scope")) == {"all", "real", "emulated"}
    assert summary.loc[("real", "tokens_per_s"), "median"] == pytest.approx(0.04)
    assert summary.loc[("real", "tokens_per_s"), "worst"] == pytest.approx(0.10)
    assert summary.loc[("emulated", "tokens_per_s"), "worst"] == pytest.approx(0.03)
    assert summary.loc[("all", "tokens_per_s"), "configs"] == 6
    assert summary.loc[("all", "node_utilization"), "worst"] == pytest.approx(0.05)  # absolute: 0.5 * 0.10
    assert summary.loc[("all", "node_utilization"), "worst_anchored"] == 0.0


def test_the_iterative_check_recovers_dispatch_and_leaves_a_compute_misfit_alone(tmp_path):
    from pipesim.calibration.calibrate import add_residual_overhead

    def profile(name: str, scale: float, dispatch: float) -> HardwareProfile:
        nodes = {f"n{i}": NodeCoefficients(overhead=1e-4 * scale, layer_fixed=1e-3 * scale,
                                           layer_per_token=1e-4 * scale, head_fixed=2e-3 * scale,
                                           head_per_output=5e-4 * scale, host=f"host{i}", dispatch=dispatch)
                 for i in range(4)}
        return HardwareProfile("llama-2-7b", nodes, {}, meta={"name": name})

    for scale in (1.0, 1.3):  # the "measured" machine computes at the fitted speed, then 30% slower
        truth = profile("truth", scale, 1.5e-3).save(tmp_path / f"truth{scale}.yaml")
        scenario = load_scenario("pipesim/data/default.yaml", [f"cluster.profile={truth}", "strategy.name=iterative",
                                                                 "workload.generate_tokens=24", "network.latency=0",
                                                                 "network.bandwidth=1000TB/s"])
        trace = SimulationEngine(scenario).run()  # stands in for the measured generation (no link emulation)
        raw = {"iterative": {"metrics": compute_metrics(trace), "trace": trace.to_json()}, "sets": [],
               "scenario": "pipesim/data/default.yaml"}
        provisional = profile("fitted", 1.0, 0.0)
        path = provisional.save(tmp_path / f"fitted{scale}.yaml")
        check = add_residual_overhead(provisional, raw, path)
        assert all(node.dispatch == pytest.approx(1.5e-3, rel=1e-6) for node in provisional.nodes.values()), scale
        assert check["residual_per_token_s"] == pytest.approx(4 * 1.5e-3, rel=1e-6)
        measured, simulated = check["compute_per_token_s"]["measured"], check["compute_per_token_s"]["simulated"]
        assert measured / simulated == pytest.approx(scale, rel=1e-6)


def test_every_round_runs_its_configurations_between_anchors():
    from pipesim.calibration.validate import Grid

    grid = Grid(strategies=["iterative", "pipeinfer"], alphas=[0.3, 0.6], bandwidths=["1Gbit/s"], rounds=3)
    schedule = grid.schedule(has_draft=True)
    anchors = ["anchor iterative", "anchor speculative"]
    configurations = [label for label, _ in grid.variants()]
    for r in range(3):
        labels = [label for i, label, _ in schedule if i == r]
        assert labels[:2] == anchors and labels[-2:] == anchors
        assert sorted(labels[2:-2]) == sorted(configurations)  # every configuration once, order rotated
    assert [label for i, label, _ in schedule if i == 1][2:-2] != configurations


def test_parity_plot_marks_each_compute_mode_with_its_own_marker(tmp_path):
    """Circles for real compute, squares for emulated, whatever the strategy (the legend says so)."""
    import pandas as pd
    from matplotlib.markers import MarkerStyle

    from pipesim.calibration.validate import parity_figure

    rows = []
    for compute in ("real", "emulated"):
        for strategy in ("iterative", "pipeinfer"):
            for metric, value in (("tokens_per_s", 10.0), ("ttft_s", 0.2)):
                rows.append({"config": f"{compute} {strategy}", "metric": metric, "predicted": value * 1.1,
                             "measured": value, "rel_error": 0.1, "strategy": strategy, "compute": compute})
    figure = parity_figure(pd.DataFrame(rows), tmp_path / "parity.png")
    assert (tmp_path / "parity.png").stat().st_size > 0

    def shape(marker: str) -> np.ndarray:
        style = MarkerStyle(marker)
        return style.get_path().transformed(style.get_transform()).vertices

    for ax in figure.axes:
        collections = [c for c in ax.collections if c.get_label() and "," in c.get_label()]
        assert len(collections) == 4
        for collection in collections:
            compute = collection.get_label().split(", ")[1]
            drawn = collection.get_paths()[0].vertices
            expected = shape({"real": "o", "emulated": "s"}[compute])
            assert drawn.shape == expected.shape and np.allclose(drawn, expected), collection.get_label()
        assert ax.xaxis.get_minor_formatter().__class__.__name__ == "NullFormatter"
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert {"real compute", "emulated compute"} <= set(legend)
    assert figure.axes[0].get_xlabel() == "measured (executor), tokens/s"
    assert figure.axes[1].get_ylabel() == "predicted (simulator), s"
