"""The kept PipeSpec study (reports/pipespec) is what the current code produces, and its report quotes its table."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from pipesim.metrics import compute_metrics
from pipesim.reports.pipespec_study import load_points, main, published_comparison
from pipesim.reports.regenerate import KEPT_REPORTS
from pipesim.scenario import load_scenario
from pipesim.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
KEPT = next(k for k in KEPT_REPORTS if k.name == "pipespec")
TABLE = pd.read_csv(ROOT / KEPT.report / "results.csv")


def _points():
    return load_points([ROOT / KEPT.study, *(ROOT / study for study in KEPT.more_studies)])


def test_kept_table_covers_the_study_point_by_point():
    _, points = _points()
    kept = {(r.machine, r.chain, r.strategy, float(r.alpha)) for r in TABLE.itertuples()}
    assert kept == {(p.machine, p.chain, p.strategy, p.alpha) for p in points} and len(TABLE) == len(points)


SAMPLE = [("4-GPU host", "1B -> 8B -> 70B", "PipeSpec reference", 0.7),
          ("4-GPU host", "1B -> 70B", "sync chain", 0.3),
          ("8 CPU nodes", "1.1B -> 70B", "PipeSpec reference", 0.5),
          ("8 CPU nodes", "1.1B -> 7B -> 70B", "PipeSpec capped", 0.9),
          ("8 CPU nodes", "1.1B -> 70B", "autoregressive", 0.1)]


@pytest.mark.parametrize("machine,chain,strategy,alpha", SAMPLE)
def test_kept_row_is_what_the_current_simulator_produces(machine, chain, strategy, alpha):
    _, points = _points()
    point = next(p for p in points if (p.machine, p.chain, p.strategy, p.alpha) == (machine, chain, strategy, alpha))
    row = TABLE[(TABLE["machine"] == machine) & (TABLE["chain"] == chain) & (TABLE["strategy"] == strategy)
                & (TABLE["alpha"] == alpha)].iloc[0]
    metrics = compute_metrics(simulate(point.scenario))
    assert math.isclose(row["ms_per_token"], metrics["ms_per_token"], rel_tol=1e-6), (
        "reports/pipespec is stale: regenerate with `python -m pipesim.reports.regenerate pipespec`")
    assert row["drafted_accepted"] == metrics["drafted_accepted"]


def test_the_baseline_is_the_target_alone_on_its_chain_nodes():
    _, points = _points()
    cpu = next(p for p in points if p.chain == "1.1B -> 7B -> 70B" and p.strategy == "autoregressive")
    assert cpu.scenario.strategy.name == "iterative" and cpu.scenario.cluster.count == 6
    gpu = next(p for p in points if p.machine == "4-GPU host" and p.strategy == "autoregressive")
    assert gpu.scenario.cluster.count == 2 and gpu.scenario.models.chain is None


def test_the_report_quotes_its_table():
    markdown = (ROOT / KEPT.report / "report.md").read_text()
    for (machine, chain), rows in TABLE.groupby(["machine", "chain"], sort=False):
        section = markdown.split(f"### {machine}, {chain}\n", 1)[1].split("###", 1)[0]
        at = rows[rows["alpha"] == 0.7].set_index("strategy")
        line = re.search(r"^\| 0\.7 \| (.+) \|$", section, re.MULTILINE)
        assert line is not None
        cells = [c.strip() for c in line.group(1).split("|")]
        assert cells[0] == f"{at.loc['PipeSpec reference', 'ms_per_token']:.3g}"
        assert cells[1] == f"{at.loc['PipeSpec reference', 'vs_baseline']:.2f}x"
        ar = at.loc["autoregressive", "ms_per_token"]
        assert at.loc["PipeSpec reference", "vs_baseline"] == pytest.approx(ar / at.loc["PipeSpec reference",
                                                                                     "ms_per_token"])
    cpu = TABLE[(TABLE["chain"] == "1.1B -> 70B") & (TABLE["strategy"] == "PipeSpec reference")]
    if (cpu["vs_baseline"] < 1).all():
        assert "**8 CPU nodes, 1.1B -> 70B**: the reference PipeSpec is slower than autoregressive at every alpha" \
            in markdown


def test_a_bad_study_is_one_line_and_exit_2(tmp_path, capsys):
    study = tmp_path / "bad.yaml"
    study.write_text("name: bad\nbase: ../nowhere.yaml\naxes: {acceptance.alpha: [0.5]}\n")
    assert main([str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nowhere.yaml" in err
    shipped = (ROOT / KEPT.study).read_text().replace("/ autoregressive", "/ greedy")
    study.write_text(shipped.replace("../pipespec-4gpu.yaml", str(ROOT / "scenarios" / "pipespec-4gpu.yaml")))
    assert main([str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not 'chain / strategy'" in err


# the reference repository's greedy runs (benchmark_results/humaneval/greedy_*.json: mean time_per_token, ms)
PUBLISHED_GREEDY = {"llama-3.2-1b": (0, "f16", 11.72), "llama-3.1-8b": (1, "f16", 22.45),
                    "llama-3.1-70b": (2, "q4_0", 123.6)}


@pytest.mark.parametrize("model", list(PUBLISHED_GREEDY))
def test_the_4gpu_floors_reproduce_the_published_greedy_runs(model):
    """Each model alone on its GPU(s) of scenarios/pipespec-4gpu.yaml, with that GPU's layer floor from the file,
    decodes at the reference's measured greedy speed (the floors were fitted to these)."""
    node, quantization, published = PUBLISHED_GREEDY[model]
    scenario = load_scenario(ROOT / "scenarios" / "pipespec-4gpu.yaml")
    floor = next(o.layer_floor for o in scenario.cluster.overrides if o.index == node)
    count = 2 if model == "llama-3.1-70b" else 1
    alone = load_scenario(ROOT / "scenarios" / "pipespec-4gpu.yaml", [
        "strategy.name=iterative", "placement.chain_nodes=null", "models.chain=null", f"models.target={model}",
        f"models.target_quantization={quantization}", f"cluster.count={count}", "workload.generate_tokens=300",
        "cluster.overrides=" + str([{"index": i, "layer_floor": floor} for i in range(count)])])
    assert compute_metrics(simulate(alone))["ms_per_token"] == pytest.approx(published, rel=0.02)


def test_kept_published_comparison_is_current():
    kept = pd.read_csv(ROOT / KEPT.report / "published.csv")
    now = published_comparison(ROOT)
    assert list(kept["run"]) == list(now["run"])
    for a, b in zip(kept["simulated_ms_per_token"], now["simulated_ms_per_token"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-6)


def test_the_generic_sweep_reads_the_pipespec_study(tmp_path):
    """Its variants set strategy.handshake (a boolean) in some points only: the sweep's table stays one type."""
    from pipesim import cli

    assert cli.main(["sweep", str(ROOT / KEPT.study), "--out", str(tmp_path / "sweep"), "--quiet", "-j", "1"]) == 0
    table = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert set(table["value.strategy.handshake"]) == {"false", "null"}
