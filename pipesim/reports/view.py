"""A sweep table seen through its study: which axis is x, which facets, which rows are representative.

Rules: the strategy axis gives the lines; seed axes (``*.seed``) are replicates and are averaged; x is the
study's ``report.x`` or the first numeric axis (bandwidth, then α, node count, latency, ...); the facet is
``report.facet`` or the next axis; every other axis is held at its representative value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .formatting import fmt_axis_value
from .study import STRATEGY_KEY, VARIANT
from .sweep import value_column

DEFAULT: Any = object()  # "the view's own x / facet" (None means "no x / no facet")
KNOB_KEYS = {"strategy.gamma": "speculative", "strategy.micro_batch": "pipeinfer"}
COLLAPSE = 0.5  # a replicate below half its point's median has collapsed
X_PRIORITY = ("network.bandwidth", "acceptance.alpha", "cluster.count", "network.latency")


@dataclass(frozen=True)
class AxisInfo:
    """One study axis as the report uses it."""

    name: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    column: str  # the column to plot: resolved numbers for numeric axes, else the label column
    numeric: bool
    texts: tuple[str, ...] = ()  # how each label reads in captions (e.g. "1 Gbit/s" for "1Gbit/s")

    def text(self, label: str) -> str:
        return self.texts[self.labels.index(label)] if label in self.labels and self.texts else str(label)

    @property
    def key(self) -> str:
        return self.keys[0]

    @property
    def is_strategy(self) -> bool:
        return self.name == STRATEGY_KEY

    @property
    def is_replicate(self) -> bool:
        return all(k.endswith(".seed") for k in self.keys)

    @property
    def is_knob(self) -> bool:
        return self.name in KNOB_KEYS


@dataclass
class StudyView:
    """The table with its axes classified."""

    table: pd.DataFrame
    meta: dict[str, Any]
    axes: list[AxisInfo]
    strategies: list[str]
    baseline: str | None
    x: AxisInfo | None
    facet: AxisInfo | None
    held: dict[str, str] = field(default_factory=dict)  # axis name -> representative label
    replicates: list[AxisInfo] = field(default_factory=list)

    @property
    def study(self) -> dict[str, Any]:
        return self.meta.get("study", {})

    def axis(self, name: str) -> AxisInfo | None:
        return next((a for a in self.axes if a.name == name), None)

    def representative_rows(self) -> pd.DataFrame:
        """The representative point of each strategy (as chosen by the sweep)."""
        chosen = self.meta.get("representatives") or {}
        indices = [entry["point"] for entry in chosen.values()]
        rows = self.table[self.table["point"].isin(indices)]
        if rows.empty:  # no record: the first row of each strategy
            rows = self.table.groupby("strategy", sort=False).head(1)
        return rows.set_index("strategy").loc[[s for s in self.strategies if s in set(rows["strategy"])]]

    def representative_means(self) -> pd.DataFrame:
        """Numeric columns at the representative values of every axis, averaged over replicates (seeds)."""
        rows = self.table
        for name, label in self.held.items():
            rows = rows[rows[name].astype(str) == label]
        means = rows.groupby("strategy", sort=False).mean(numeric_only=True)
        return means.loc[[s for s in self.strategies if s in means.index]]

    def representative_labels(self) -> dict[str, str]:
        chosen = self.meta.get("representatives") or {}
        entry = next(iter(chosen.values()), None)
        if entry is None:
            return {}
        return {k: v for k, v in entry["labels"].items() if k != STRATEGY_KEY}

    def held_rows(self, keep: tuple[str, ...] = ()) -> pd.DataFrame:
        """Rows with every axis except strategy, replicates, x, facet and ``keep`` at its held value."""
        rows = self.table
        free = {a.name for a in (self.x, self.facet) if a is not None} | set(keep)
        for name, label in self.held.items():
            if name not in free:
                rows = rows[rows[name].astype(str) == label]
        return rows

    def curves(self, metric: str, keep: tuple[str, ...] = (), x: AxisInfo | None = DEFAULT,
               facet: AxisInfo | None = DEFAULT) -> pd.DataFrame:
        """Mean of ``metric`` over replicates for each (facet, x, strategy): columns facet, x, x_label, strategy,
        value (and over the replicates averaged: ``n``, ``min``, ``max``, ``median``, and ``n_low``, how many fall
        below ``COLLAPSE`` x the median)."""
        x = self.x if x is DEFAULT else x
        facet = self.facet if facet is DEFAULT else facet
        rows = self.held_rows(keep=tuple(a.name for a in (x, facet) if a is not None) + keep)
        group = ["strategy"]
        frame = pd.DataFrame({"strategy": rows["strategy"], "value": pd.to_numeric(rows[metric], errors="coerce")})
        if x is not None:
            frame["x"] = rows[x.column].to_numpy()
            frame["x_label"] = rows[x.name].astype(str).to_numpy()
            group = ["x", "x_label", *group]
        if facet is not None:
            frame["facet"] = rows[facet.name].astype(str).to_numpy()
            group = ["facet", *group]
        for k in keep:
            frame[k] = rows[k].astype(str).to_numpy()
            group = [k, *group]
        grouped = frame.groupby(group, sort=False, dropna=False)["value"]
        out = grouped.agg(["mean", "count", "min", "max", "median"])
        out["n_low"] = grouped.agg(lambda v: int((v < COLLAPSE * v.median()).sum()))
        out = out.reset_index().rename(columns={"mean": "value", "count": "n"})
        return _order(out, self, x, facet)

    def speedups(self, metric: str = "tokens_per_s", x: AxisInfo | None = DEFAULT,
                 facet: AxisInfo | None = DEFAULT, keep: tuple[str, ...] = ()) -> pd.DataFrame:
        """Ratio of each strategy's mean ``metric`` to the baseline's at the same x and facet."""
        curves = self.curves(metric, keep=keep, x=x, facet=facet)
        if self.baseline is None:
            return curves.iloc[0:0].assign(speedup=[])
        index = [c for c in ("facet", "x_label", *keep) if c in curves.columns]
        base = curves[curves["strategy"] == self.baseline]
        if index:
            merged = curves.merge(base[[*index, "value"]].rename(columns={"value": "base"}), on=index, how="left")
        else:
            merged = curves.assign(base=float(base["value"].iloc[0]) if len(base) else float("nan"))
        merged["speedup"] = merged["value"] / merged["base"]
        merged["speedup_min"] = merged["min"] / merged["base"]
        merged["speedup_max"] = merged["max"] / merged["base"]
        return merged


def _order(frame: pd.DataFrame, view: StudyView, x: AxisInfo | None, facet: AxisInfo | None) -> pd.DataFrame:
    """Sort by facet label order, x (value or label order) and strategy order."""
    sort_columns = []
    if facet is not None:
        frame = frame.assign(_f=frame["facet"].map({label: i for i, label in enumerate(facet.labels)}))
        sort_columns.append("_f")
    if x is not None:
        if x.numeric:
            sort_columns.append("x")
        else:
            frame = frame.assign(_x=frame["x_label"].map({label: i for i, label in enumerate(x.labels)}))
            sort_columns.append("_x")
    frame = frame.assign(_s=frame["strategy"].map({s: i for i, s in enumerate(view.strategies)}))
    sort_columns.append("_s")
    return frame.sort_values(sort_columns, kind="stable").drop(columns=[c for c in ("_f", "_x", "_s")
                                                                          if c in frame.columns])


def _axis_info(entry: dict[str, Any], table: pd.DataFrame) -> AxisInfo:
    keys = tuple(entry["keys"])
    name = entry["name"]
    column = value_column(keys[0]) if name != VARIANT and len(keys) >= 1 else name
    numeric = (name != VARIANT and name != STRATEGY_KEY and column in table.columns
               and pd.api.types.is_numeric_dtype(table[column]) and not name.endswith(".seed"))
    labels = tuple(entry["labels"])
    texts = labels
    if numeric and name in table.columns:
        values = table.groupby(table[name].astype(str))[column].first()
        texts = tuple(fmt_axis_value(keys[0], float(values[label])) if label in values.index else label
                      for label in labels)
    return AxisInfo(name, keys, labels, column if numeric else name, numeric, texts)


def make_view(table: pd.DataFrame, meta: dict[str, Any]) -> StudyView:
    """Classify the study's axes and choose x, facet and the held values."""
    ok = table[table["error"].fillna("").astype(str) == ""] if "error" in table.columns else table
    study = meta.get("study", {})
    entries = study.get("axes") or [{"name": c, "keys": [c], "labels": sorted(ok[c].astype(str).unique())}
                                    for c in ("strategy.name",) if c in ok.columns]
    axes = [_axis_info(entry, ok) for entry in entries]
    strategies = list(dict.fromkeys(ok["strategy"]))
    hints = study.get("report", {}) or {}
    baseline = hints.get("baseline") or ("iterative" if "iterative" in strategies else None)
    if baseline not in strategies:
        baseline = strategies[0] if len(strategies) > 1 else None
    candidates = [a for a in axes if not (a.is_strategy or a.is_replicate or a.is_knob)]
    by_name = {a.name: a for a in axes}
    x = by_name.get(hints.get("x", "")) if hints.get("x") else None
    if x is None and candidates:
        numeric = sorted((a for a in candidates if a.numeric),
                         key=lambda a: X_PRIORITY.index(a.name) if a.name in X_PRIORITY else len(X_PRIORITY))
        x = numeric[0] if numeric else candidates[0]
    facet = by_name.get(hints.get("facet", "")) if hints.get("facet") else None
    if facet is None:
        facet = next((a for a in candidates if a is not x), None)
    view = StudyView(ok.reset_index(drop=True), meta, axes, strategies, baseline, x, facet,
                     replicates=[a for a in axes if a.is_replicate])
    labels = view.representative_labels()
    view.held = {a.name: labels.get(a.name, a.labels[len(a.labels) // 2]) for a in axes
                 if not (a.is_strategy or a.is_replicate)}
    return view
