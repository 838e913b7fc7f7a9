"""Every configuration of a study in one table, points that did not run included (e.g. a placement that does
not fit a node's memory), so a reader sees what was ruled out and why, not only what ran."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .document import Block, Heading, Paragraph, Table
from .formatting import significant, strategy_label
from .study import STRATEGY_KEY

NOT_FIT = "does not fit"


def _outcome(row: pd.Series, metric: str) -> str:
    error = str(row.get("error") or "")
    if error:
        return NOT_FIT if "does not fit" in error else "failed"
    value = pd.to_numeric(row.get(metric), errors="coerce")
    return "–" if pd.isna(value) else significant(float(value))


def configuration_table(table: pd.DataFrame, meta: dict[str, Any], metric: str = "tokens_per_s") -> list[Block]:
    """A table with one row per configuration (every non-strategy, non-seed axis) and one column per strategy:
    the metric (mean over replicates), or ``does not fit`` / ``failed``; then the distinct failure messages."""
    axes = [a["name"] for a in meta.get("study", {}).get("axes", [])
            if a["name"] != STRATEGY_KEY and not a["name"].endswith(".seed") and a["name"] in table.columns]
    if STRATEGY_KEY not in table.columns:
        return []
    keep = [c for c in table.columns if c in (*axes, STRATEGY_KEY, metric, "error")]
    frame = table[keep].copy()
    frame[metric] = pd.to_numeric(frame.get(metric), errors="coerce")
    strategies = list(dict.fromkeys(frame[STRATEGY_KEY].astype(str)))
    rows = []
    for labels, group in frame.groupby(axes, sort=False) if axes else [((), frame)]:
        labels = labels if isinstance(labels, tuple) else (labels,)
        cells = []
        for strategy in strategies:
            points = group[group[STRATEGY_KEY].astype(str) == strategy]
            if points.empty:
                cells.append("–")
                continue
            ok = points[points["error"].fillna("").astype(str) == ""]
            if ok.empty:
                cells.append(_outcome(points.iloc[0], metric))
            else:
                cells.append(significant(float(ok[metric].mean())))
        rows.append([*map(str, labels), *cells])
    blocks: list[Block] = [
        Heading(2, "Every configuration"),
        Paragraph(f"`{metric}` per configuration and strategy (simulated; mean over replicates). "
                  f"'{NOT_FIT}': the placement needs more memory than a node has, so it was not simulated."),
        Table([*(f"`{a}`" for a in axes), *(strategy_label(s) for s in strategies)], rows)]
    errors = sorted(set(frame.loc[frame["error"].fillna("").astype(str) != "", "error"].astype(str)))
    if errors:
        blocks += [Paragraph("Why points did not run (distinct messages):"),
                   Table(["message"], [[e] for e in errors[:20]])]
    return blocks
