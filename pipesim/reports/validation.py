"""Predicted vs measured: executor or calibration results found beside a sweep.

Two forms are read from the sweep folder (the figure is skipped when neither is there):

- ``validation.csv``: ``predicted`` and ``measured`` columns (optional ``metric``, ``strategy``, ``label``), or
  pairs of columns ``<metric>_predicted`` / ``<metric>_measured``;
- ``measured*.csv`` (or ``measured*.jsonl``, e.g. the executor's ``--json`` lines): measured metrics (columns
  named as in the results table, e.g. ``tokens_per_s``) with ``config_key`` or the columns that identify the
  point (``strategy``, ``bandwidth_bps``, axis columns...); the prediction is the sweep's value at the same
  point, or at the representative point when those columns do not pick one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import findings
from .figures import FigureOut, new_figure
from .formatting import fmt_pct, strategy_color, strategy_label

METRICS = ("tokens_per_s", "ttft_s", "itl_p50_s", "itl_mean_s", "e2e_tokens_per_s")
METRIC_TITLES = {"tokens_per_s": "decode tokens/s", "ttft_s": "TTFT (s)", "itl_p50_s": "ITL p50 (s)",
                 "itl_mean_s": "ITL mean (s)", "e2e_tokens_per_s": "end-to-end tokens/s"}
_ID_COLUMNS = ("strategy", "bandwidth_bps", "latency_s", "nodes", "alpha", "gamma", "micro_batch",
               "generate_tokens", "prompt_tokens", "acceptance_seed", "workload_seed")


def _long_form(frame: pd.DataFrame) -> pd.DataFrame:
    if {"predicted", "measured"} <= set(frame.columns):
        out = frame.assign(metric=frame["metric"] if "metric" in frame else "tokens_per_s")
        return out
    parts = []
    for column in frame.columns:
        for metric, other in ((column.removesuffix("_predicted"), "_measured"),
                              (column.removeprefix("predicted_"), "measured_")):
            if metric == column:
                continue
            measured = metric + other if other.startswith("_") else other + metric
            if measured in frame:
                parts.append(frame.assign(metric=metric, predicted=frame[column], measured=frame[measured]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _from_measured(frame: pd.DataFrame, table: pd.DataFrame, representative: pd.DataFrame | None) -> pd.DataFrame:
    metrics = [m for m in METRICS if m in frame.columns and m in table.columns]
    if not metrics:
        return pd.DataFrame()
    if "config_key" in frame.columns:
        keys = ["config_key"]
    else:
        labels = [c for c in table.columns if "." in c and not c.startswith(("util.", "value."))]
        keys = [c for c in (*_ID_COLUMNS, *labels) if c in frame.columns and c in table.columns]
    if not keys:
        return pd.DataFrame()
    if table.groupby(keys, dropna=False)["config_key"].nunique().max() > 1 and representative is not None:
        table = representative  # the columns given do not pick one point: compare with the representative one
    predicted = table.groupby(keys, dropna=False)[metrics].mean().reset_index()
    merged = frame.merge(predicted, on=keys, suffixes=("_measured", "_predicted"))
    if "strategy" not in merged:
        merged["strategy"] = ""
    parts = [merged.assign(metric=m, predicted=merged[f"{m}_predicted"], measured=merged[f"{m}_measured"])
             for m in metrics]
    return pd.concat(parts, ignore_index=True)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path)


def load_comparisons(folder: Path, table: pd.DataFrame, representative: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows of (metric, strategy, predicted, measured, error, source) from the folder's validation files.

    ``representative``: the rows to compare with when a measured file names too little to pick one point (e.g.
    only ``strategy``, as the executor's ``--json`` lines do).
    """
    parts = []
    files = sorted([*folder.glob("measured*.csv"), *folder.glob("measured*.jsonl")]) + sorted(
        folder.glob("validation.csv"))
    for path in files:
        frame = _read(path)
        part = _long_form(frame) if path.name == "validation.csv" else _from_measured(frame, table, representative)
        if not part.empty:
            parts.append(part.assign(source=path.name))
    if not parts:
        return pd.DataFrame(columns=["metric", "strategy", "predicted", "measured", "source"])
    out = pd.concat(parts, ignore_index=True)
    if "strategy" not in out:
        out["strategy"] = ""
    out["predicted"] = pd.to_numeric(out["predicted"], errors="coerce")
    out["measured"] = pd.to_numeric(out["measured"], errors="coerce")
    out = out.dropna(subset=["predicted", "measured"])
    out = out[out["measured"] != 0]
    return out.assign(error=out["predicted"] / out["measured"] - 1.0)[
        ["metric", "strategy", "predicted", "measured", "error", "source"]].reset_index(drop=True)


def validation_figure(comparisons: pd.DataFrame, order: list[str]) -> FigureOut | None:
    """Predicted against measured, one panel per metric, with the y = x line and a ±10% band."""
    if comparisons.empty:
        return None
    metrics = list(dict.fromkeys(comparisons["metric"]))[:3]
    figure = new_figure(4.2 * len(metrics) + 0.5, 4.0)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    clauses = []
    numbers = {}
    for ax, metric in zip(axes, metrics, strict=True):
        rows = comparisons[comparisons["metric"] == metric]
        for strategy, group in rows.groupby("strategy", sort=False):
            ax.scatter(group["measured"], group["predicted"], s=22, label=strategy_label(str(strategy)) or "runs",
                       color=strategy_color(str(strategy), order) if strategy else "#333333")
        low = float(min(rows["measured"].min(), rows["predicted"].min())) * 0.8
        high = float(max(rows["measured"].max(), rows["predicted"].max())) * 1.25
        line = np.geomspace(max(low, 1e-12), high, 50)
        ax.plot(line, line, color="black", lw=0.8)
        ax.fill_between(line, line * 0.9, line * 1.1, color="#cccccc", alpha=0.5, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {METRIC_TITLES.get(metric, metric)}")
        ax.set_ylabel(f"predicted {METRIC_TITLES.get(metric, metric)}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.2)
        mean_error = float(rows["error"].abs().mean())
        worst = rows.loc[rows["error"].abs().idxmax()]
        numbers[metric] = {"mean_abs_error": mean_error, "worst_error": float(worst["error"])}
        who = f", {strategy_label(str(worst['strategy']))}" if worst["strategy"] else ""
        clauses.append(f"the simulator's {METRIC_TITLES.get(metric, metric)} is off by {fmt_pct(mean_error)} on "
                       f"average over {len(rows)} runs (worst {worst['error'] * 100:+.0f}%{who})")
    return FigureOut("validation", "Predicted vs measured", findings.sentence(clauses), figure, numbers)
