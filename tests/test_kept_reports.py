"""The kept simulator reports in ``reports/`` are what the current code produces.

The simulator is deterministic, so a kept row re-simulated with the current code must give the same numbers up to
floating-point noise: relative tolerance ``REL_TOL`` (1e-6), absolute ``ABS_TOL`` for values near zero. A sample
of rows is re-simulated (every strategy, several bandwidths and seeds; a few seconds); ``PIPESIM_KEPT_ALL=1``
checks every row. When this fails, the code moved the results: regenerate the kept reports with
``python -m pipesim.reports.regenerate`` and commit them. (Only ``sim_runtime_s``, the simulator's own run time,
is a measurement; it is not compared. The calibration results in ``reports/calibration`` are measured on one
machine and are not checked here.)
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from pipesim.metrics import compute_metrics
from pipesim.reports.regenerate import KEPT_REPORTS
from pipesim.reports.study import load_study
from pipesim.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
REL_TOL, ABS_TOL = 1e-6, 1e-9
COMPARED = ("generated_tokens", "tokens_per_s", "e2e_tokens_per_s", "ttft_s", "itl_mean_s", "itl_p50_s",
            "itl_p99_s", "acceptance_rate", "drafted_checked", "drafted_accepted", "wasted_compute_fraction",
            "runs_launched", "runs_cancelled", "wall_s")
# the sample: (bandwidth, strategy) pairs, each at one seed (rotating); PipeInfer at 10 Mbit/s takes ~20 s a run
SAMPLE_BANDWIDTHS = ("10Mbit/s", "100Mbit/s", "1Gbit/s", "100Gbit/s")
SLOW = {("10Mbit/s", "pipeinfer")}


def _bandwidth_table() -> tuple[pd.DataFrame, object]:
    kept = next(k for k in KEPT_REPORTS if k.name == "bandwidth")
    table = pd.read_csv(ROOT / kept.report / "results.csv")
    return table, load_study(ROOT / kept.study)


def _sample(table: pd.DataFrame) -> list[int]:
    if os.environ.get("PIPESIM_KEPT_ALL"):
        return list(table["point"])
    picked = []
    pairs = [(b, s) for b in SAMPLE_BANDWIDTHS for s in ("iterative", "speculative", "pipeinfer")
             if (b, s) not in SLOW]
    for i, (bandwidth, strategy) in enumerate(pairs):
        rows = table[(table["network.bandwidth"] == bandwidth) & (table["strategy.name"] == strategy)]
        picked.append(int(rows.sort_values("acceptance.seed")["point"].iloc[i % len(rows)]))
    return picked


def _close(kept: object, now: object) -> bool:
    if kept is None or (isinstance(kept, float) and math.isnan(kept)):
        return now is None or (isinstance(now, float) and math.isnan(now))
    return now is not None and math.isclose(float(kept), float(now), rel_tol=REL_TOL, abs_tol=ABS_TOL)


def test_kept_bandwidth_table_covers_its_study_point_by_point():
    table, study = _bandwidth_table()
    points = study.points()
    assert len(table) == len(points) == study.n_points
    for point in points:
        row = table[table["point"] == point.index].iloc[0]
        for axis, label in point.labels.items():
            assert str(row[axis]) == label, (point.index, axis)


@pytest.mark.parametrize("index", _sample(_bandwidth_table()[0]))
def test_kept_bandwidth_row_is_what_the_current_simulator_produces(index):
    table, study = _bandwidth_table()
    point = study.points()[index]
    row = table[table["point"] == index].iloc[0]
    metrics = compute_metrics(simulate(point.scenario))
    stale = {key: (row[key], metrics[key]) for key in COMPARED if not _close(row[key], metrics[key])}
    utils = metrics["node_utilization"]
    stale |= {f"util.{n}": (row[f"util.{n}"], u) for n, u in utils.items() if not _close(row[f"util.{n}"], u)}
    assert not stale, (f"reports/bandwidth/results.csv point {index} ({point.labels}) is stale (kept, now): {stale}; "
                       "regenerate with `python -m pipesim.reports.regenerate`")


def test_kept_bandwidth_report_quotes_its_table():
    """report.md's table at the representative bandwidth shows the kept table's seed means (3 significant
    digits): a report regenerated from another table fails."""
    table, study = _bandwidth_table()
    markdown = (ROOT / "reports" / "bandwidth" / "report.md").read_text()
    at = table[table["network.bandwidth"] == study.spec.representative["network.bandwidth"]]
    for strategy, label in (("iterative", "iterative"), ("speculative", "speculative"), ("pipeinfer", "PipeInfer")):
        mean = at.loc[at["strategy.name"] == strategy, "tokens_per_s"].mean()
        line = re.search(rf"^\| {label} \| ([^|]+) \|", markdown, re.MULTILINE)
        assert line is not None, label
        assert line.group(1).strip() == f"{mean:.3g}", (label, line.group(1), mean)
