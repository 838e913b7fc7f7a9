"""The kept PipeInfer reference report (reports/pipeinfer-reference) is what the current simulator produces."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from pipesim.metrics import compute_metrics
from pipesim.reports.pipeinfer_reference import ABLATION_STUDY, KEPT, MAIN_STUDY, OUT
from pipesim.reports.study import load_study
from pipesim.sim import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("study, table, index", [(MAIN_STUDY, "results.csv", 23), (MAIN_STUDY, "results.csv", 7),
                                                 (ABLATION_STUDY, "ablation.csv", 11)])
def test_kept_rows_are_what_the_simulator_produces(study, table, index):
    kept = pd.read_csv(ROOT / OUT / table)
    point = load_study(ROOT / study).points()[index]
    row = kept[kept["point"] == index].iloc[0]
    assert row["variant"] == point.labels["variant"]
    metrics = compute_metrics(simulate(point.scenario))
    for key in KEPT:
        assert math.isclose(float(row[key]), float(metrics[key]), rel_tol=1e-6, abs_tol=1e-9), (key, row[key])


def test_the_report_quotes_its_table():
    main = pd.read_csv(ROOT / OUT / "results.csv")
    text = (ROOT / OUT / "report.md").read_text()
    at = main[(main["network.bandwidth"] == "1Gbit/s") & (main["acceptance.alpha"] == 0.9)]
    reference = at.loc[at["variant"] == "pipeinfer-reference", "tokens_per_s"].iloc[0]
    assert f"reference PipeInfer decodes {reference:.3g} tok/s" in text
    assert len(main) == load_study(ROOT / MAIN_STUDY).n_points
