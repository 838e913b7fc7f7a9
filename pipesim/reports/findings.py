"""Findings in words: one-sentence captions computed from the sweep table (numbers formatted for reading).

Each function takes the aggregated curves of a ``StudyView`` (columns ``facet``, ``x``, ``x_label``,
``strategy``, ``value``, and ``speedup`` where relevant) and returns a clause; captions join clauses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .formatting import (
    axis_noun,
    fmt_alpha,
    fmt_axis_value,
    fmt_pct,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    join_words,
    strategy_label,
)
from .view import AxisInfo

SATURATION = 0.95  # "within 5% of its best"


def sentence(clauses: Sequence[str]) -> str:
    """Clauses joined with semicolons into one sentence, capitalised, ending with a period."""
    text = "; ".join(c for c in clauses if c)
    return (text[0].upper() + text[1:] + ".") if text else ""


def _x_text(axis: AxisInfo, x: float | str, label: str) -> str:
    return fmt_axis_value(axis.key, x) if axis.numeric else label


def _interpolate_crossing(x0: float, x1: float, d0: float, d1: float, log: bool) -> float:
    """Where a difference going from d0 (at x0) to d1 (at x1) crosses zero, linearly (in log x if asked)."""
    t = d0 / (d0 - d1) if d0 != d1 else 0.5
    if log:
        return float(10 ** (math.log10(x0) + t * (math.log10(x1) - math.log10(x0))))
    return float(x0 + t * (x1 - x0))


def compare(curves: pd.DataFrame, a: str, b: str, axis: AxisInfo) -> str:
    """Where strategy ``a`` is faster than ``b`` along x (over every facet)."""
    pivot = curves.pivot_table(index=[c for c in ("facet", "x", "x_label") if c in curves.columns],
                               columns="strategy", values="value", sort=False)
    if a not in pivot or b not in pivot:
        return ""
    pivot = pivot.dropna(subset=[a, b])
    if pivot.empty:
        return ""
    wins = pivot[a] > pivot[b]
    la, lb = strategy_label(a), strategy_label(b)
    if wins.all() or not wins.any():
        winner, loser = (la, lb) if wins.all() else (lb, la)
        if "facet" in pivot.index.names:
            return f"{winner} beats {loser} in all {len(pivot)} configurations"
        xs = pivot.index.get_level_values("x")
        labels = pivot.index.get_level_values("x_label")
        if axis.numeric:
            low, high = int(np.argmin(xs)), int(np.argmax(xs))
            return (f"{winner} beats {loser} at every {axis_noun(axis.key)} from {_x_text(axis, xs[low], '')} "
                    f"to {_x_text(axis, xs[high], '')}")
        if len(labels) > 4:
            return f"{winner} beats {loser} in all {len(labels)} {axis_noun(axis.name)}s"
        return f"{winner} beats {loser} in every {axis_noun(axis.name)} ({join_words(list(labels))})"
    if "facet" in pivot.index.names or not axis.numeric:
        return f"{la} beats {lb} in {int(wins.sum())} of {len(wins)} configurations"
    xs = np.asarray(pivot.index.get_level_values("x"), dtype=float)
    diff = np.asarray(pivot[a] - pivot[b], dtype=float)
    order = np.argsort(xs)
    xs, diff = xs[order], diff[order]
    changes = [i for i in range(len(diff) - 1) if (diff[i] > 0) != (diff[i + 1] > 0)]
    if len(changes) == 1:
        i = changes[0]
        crossing = _interpolate_crossing(xs[i], xs[i + 1], diff[i], diff[i + 1], log=axis.key == "network.bandwidth")
        first, second = (lb, la) if diff[i + 1] > 0 else (la, lb)
        return (f"{second} overtakes {first} above about {fmt_axis_value(axis.key, crossing)} "
                f"({first} is faster below)")
    won = [fmt_axis_value(axis.key, x) for x, d in zip(xs, diff, strict=True) if d > 0]
    return f"{la} beats {lb} at {len(won)} of {len(diff)} {axis_noun(axis.key)} values ({join_words(won)})"


def largest_speedup(speedups: pd.DataFrame, baseline: str, axis: AxisInfo | None,
                    facet: AxisInfo | None) -> tuple[str, dict[str, float]]:
    """The largest speedup over the baseline, and where."""
    others = speedups[(speedups["strategy"] != baseline) & speedups["speedup"].notna()]
    if others.empty:
        return "", {}
    best = others.loc[others["speedup"].idxmax()]
    where = []
    if axis is not None:
        where.append(_x_text(axis, best["x"], best["x_label"]))
    if facet is not None:
        where.append(facet.text(str(best["facet"])))
    place = f" at {', '.join(where)}" if where else ""
    clause = (f"the largest speedup over {strategy_label(baseline)} is {fmt_ratio(best['speedup'])} "
              f"({strategy_label(best['strategy'])}{place})")
    return clause, {"speedup": float(best["speedup"])}


def saturation(curves: pd.DataFrame, axis: AxisInfo) -> tuple[str, dict[str, float]]:
    """The x beyond which no strategy gains more than 5% (first facet), or which strategies still gain."""
    if "facet" in curves.columns:
        curves = curves[curves["facet"] == curves["facet"].iloc[0]]
    points: dict[str, float] = {}
    for strategy, group in curves.groupby("strategy", sort=False):
        group = group.dropna(subset=["value"]).sort_values("x")
        if not group.empty:
            enough = group[group["value"] >= SATURATION * group["value"].max()]
            points[str(strategy)] = float(enough["x"].iloc[0])
    if not points:
        return "", {}
    last = float(curves["x"].max())
    gaining = [s for s, x in points.items() if x >= last]
    noun = axis_noun(axis.key)
    if gaining:
        return (f"{join_words([strategy_label(s) for s in gaining])} still gain{'s' if len(gaining) == 1 else ''} "
                f"more than 5% at the last step, {fmt_axis_value(axis.key, last)}", {"saturation_x": last})
    x_sat = max(points.values())
    return (f"above {fmt_axis_value(axis.key, x_sat)} more {noun} buys every strategy less than 5%",
            {"saturation_x": x_sat})


def instability(curves: pd.DataFrame, axis: AxisInfo | None) -> str:
    """Points where some replicates (seeds) fall below half the median of their point."""
    if "n_low" not in curves.columns:
        return ""
    bad = curves[(curves["n"] > 1) & (curves["n_low"] > 0)]
    parts = []
    for _, row in bad.iterrows():
        where = _x_text(axis, row["x"], row["x_label"]) if axis is not None and "x" in row else ""
        if "facet" in row and isinstance(row["facet"], str):
            where += f" ({row['facet']})"
        parts.append(f"{strategy_label(row['strategy'])} at {where} ({int(row['n_low'])} of {int(row['n'])} "
                     f"seeds down to {fmt_rate(row['min'])}, median {fmt_rate(row['median'])})")
    if not parts:
        return ""
    shown = parts[:3] + ([f"{len(parts) - 3} more points"] if len(parts) > 3 else [])
    return "runs collapse for " + join_words(shown)


def peaks(curves: pd.DataFrame, axis: AxisInfo, strategies: Sequence[str]) -> str:
    """Where each strategy's throughput peaks (first facet)."""
    if "facet" in curves.columns:
        curves = curves[curves["facet"] == curves["facet"].iloc[0]]
    parts = []
    for strategy in strategies:
        group = curves[(curves["strategy"] == strategy)].dropna(subset=["value"])
        if group.empty:
            continue
        best = group.loc[group["value"].idxmax()]
        parts.append(f"{_x_text(axis, best['x'], best['x_label'])} for {strategy_label(strategy)} "
                     f"({fmt_rate(best['value'])})")
    return f"throughput peaks at {join_words(parts)}" if parts else ""


def break_even(xs: Sequence[float], speedups: Sequence[float]) -> float | None:
    """The smallest x from which the speedup stays >= 1 (linear interpolation); -inf if always, None if never."""
    xs, values = np.asarray(xs, dtype=float), np.asarray(speedups, dtype=float)
    order = np.argsort(xs)
    xs, values = xs[order], values[order]
    above = values >= 1.0
    if not above.any() or not above[-1]:
        return None
    last_below = np.where(~above)[0]
    if len(last_below) == 0:
        return -math.inf
    i = int(last_below[-1])
    return _interpolate_crossing(xs[i], xs[i + 1], values[i] - 1.0, values[i + 1] - 1.0, log=False)


def break_even_alpha(speedups: pd.DataFrame, baseline: str, strategies: Sequence[str],
                     facet: AxisInfo | None) -> tuple[str, dict[tuple[str, str], float | None]]:
    """The acceptance rate each strategy needs to beat the baseline, per facet value (x is α).

    Values: the interpolated α, ``-inf`` when the strategy wins at every α tested, None when it never does.
    """
    values: dict[tuple[str, str], float | None] = {}
    facets = list(dict.fromkeys(speedups["facet"])) if "facet" in speedups.columns else [""]
    low = float(speedups["x"].min())
    always, never, needs = [], [], []
    for strategy in strategies:
        if strategy == baseline:
            continue
        found = []
        for f in facets:
            rows = speedups[(speedups["strategy"] == strategy) & ((speedups["facet"] == f) if f else True)]
            rows = rows.dropna(subset=["speedup"])
            if not rows.empty:
                values[(strategy, f)] = break_even(rows["x"], rows["speedup"])
                found.append(values[(strategy, f)])
        if not found:
            continue
        name = strategy_label(strategy)
        if all(v == -math.inf for v in found):
            always.append(name)
        elif all(v is None for v in found):
            never.append(name)
        else:
            texts = ["any" if v == -math.inf else "never" if v is None else f"{v:.2f}" for v in found]
            needs.append(f"{name} needs α ≥ {' / '.join(texts)}")
    base = strategy_label(baseline)
    clauses = []
    if needs:
        where = f" at {' / '.join(facet.text(f) for f in facets)}" if facet is not None else ""
        clauses.append(f"to beat {base}{where}, {join_words(needs)}")
    if always:
        verb = "beats" if len(always) == 1 else "beat"
        clauses.append(f"{join_words(always)} {verb} {base} at every α tested (from {fmt_alpha(low)})")
    if never:
        clauses.append(f"{join_words(never)} never beat{'s' if len(never) == 1 else ''} {base}")
    return "; ".join(clauses), values


def speedup_ranges(speedups: pd.DataFrame, baseline: str, strategies: Sequence[str], x: AxisInfo,
                   facet: AxisInfo) -> str:
    """Lowest and highest speedup of each strategy over the grid, and where."""
    parts = []
    for strategy in strategies:
        rows = speedups[(speedups["strategy"] == strategy)].dropna(subset=["speedup"])
        if strategy == baseline or rows.empty:
            continue
        low, high = rows.loc[rows["speedup"].idxmin()], rows.loc[rows["speedup"].idxmax()]
        at = [f"{_x_text(x, r['x'], r['x_label'])}, {facet.text(str(r['facet']))}" for r in (low, high)]
        parts.append(f"{strategy_label(strategy)}'s from {fmt_ratio(low['speedup'])} ({at[0]}) to "
                     f"{fmt_ratio(high['speedup'])} ({at[1]})")
    if not parts:
        return ""
    parts[0] = parts[0].replace("'s from", f"'s speedup over {strategy_label(baseline)} ranges from", 1)
    return join_words(parts)


def trend(curves: pd.DataFrame, axis: AxisInfo, strategies: Sequence[str]) -> str:
    """How each strategy's throughput changes from the first to the last x (first facet)."""
    if "facet" in curves.columns:
        curves = curves[curves["facet"] == curves["facet"].iloc[0]]
    xs = curves["x"].dropna()
    if xs.nunique() < 2:
        return ""
    parts = []
    for strategy in strategies:
        rows = curves[curves["strategy"] == strategy].dropna(subset=["value"]).sort_values("x")
        if len(rows) < 2:
            continue
        change = rows["value"].iloc[-1] / rows["value"].iloc[0] - 1.0
        verb = "'s throughput changes by" if not parts else "'s by"
        parts.append(f"{strategy_label(strategy)}{verb} {change * 100:+.0f}%")
    first, last = fmt_axis_value(axis.key, float(xs.min())), fmt_axis_value(axis.key, float(xs.max()))
    return f"from {first} to {last}, {join_words(parts)}" if parts else ""


def variant_costs(curves: pd.DataFrame, reference: str, strategies: Sequence[str]) -> str:
    """For categorical x: the category that costs each strategy most throughput against the reference."""
    worst: list[tuple[str, str, float]] = []
    for strategy in strategies:
        rows = curves[curves["strategy"] == strategy].dropna(subset=["value"])
        base = rows[rows["x_label"] == reference]["value"]
        others = rows[rows["x_label"] != reference]
        if base.empty or others.empty:
            continue
        change = others["value"] / float(base.iloc[0]) - 1.0
        worst.append((strategy_label(strategy), str(others.loc[change.idxmin(), "x_label"]), float(-change.min())))
    if not worst:
        return ""
    if len({label for _, label, _ in worst}) == 1:
        costs = join_words([f"{name} {fmt_pct(cost)}" for name, _, cost in worst])
        return f"the worst case, {worst[0][1]}, costs {costs} of their {reference} throughput"
    costs = join_words([f"{name} {fmt_pct(cost)} ({label})" for name, label, cost in worst])
    return f"the worst case costs {costs} of their {reference} throughput"


def itl_finding(rows: pd.DataFrame, baseline: str | None, where: str) -> str:
    """Median and tail inter-token latency at the representative point (``rows`` indexed by strategy)."""
    rows = rows.dropna(subset=["itl_p50_s"])
    if rows.empty:
        return ""
    fastest = rows["itl_p50_s"].idxmin()
    clause = f"{where}{strategy_label(fastest)}'s median inter-token latency is {fmt_seconds(rows.loc[fastest, 'itl_p50_s'])}"
    if baseline in rows.index and baseline != fastest:
        clause += f" against {fmt_seconds(rows.loc[baseline, 'itl_p50_s'])} for {strategy_label(baseline)}"
    burst = rows["itl_p99_s"] / rows["itl_p50_s"]
    spread = burst.idxmax()
    clause += (f", and {strategy_label(spread)}'s p99 is {fmt_seconds(rows.loc[spread, 'itl_p99_s'])}, "
               f"{burst.max():.1f}x its median")
    return clause


def utilization_finding(rows: pd.DataFrame, where: str) -> str:
    """Mean node utilization per strategy, the busiest node, and the share of target compute thrown away."""
    rows = rows.dropna(subset=["util_mean"])
    if rows.empty:
        return ""
    parts = [f"{fmt_pct(row['util_mean'])} of the time under {strategy_label(name)}" if i == 0 else
             f"{fmt_pct(row['util_mean'])} under {strategy_label(name)}"
             for i, (name, row) in enumerate(rows.iterrows())]
    clause = f"{where}the average node is busy {join_words(parts)}"
    nodes = [c for c in rows.columns if c.startswith("util.n")]
    if nodes:
        busiest = rows["util_max"].idxmax()
        node = rows.loc[busiest, nodes].astype(float).idxmax()[5:]
        head = " (the head)" if node == "n0" else ""
        clause += (f"; the busiest node is {node}{head} at {fmt_pct(rows.loc[busiest, 'util_max'])} under "
                   f"{strategy_label(busiest)}")
    wasted = rows["wasted_compute_fraction"].fillna(0.0) if "wasted_compute_fraction" in rows else pd.Series()
    if len(wasted) and wasted.max() > 0.005:
        name = wasted.idxmax()
        clause += (f", and {fmt_pct(wasted.max())} of {strategy_label(name)}'s target compute goes to runs it "
                   "later cancels")
    return clause


def headline(rows: pd.DataFrame, baseline: str | None, where: str) -> str:
    """The fastest strategy at the representative point against every other."""
    rows = rows.dropna(subset=["tokens_per_s"])
    if len(rows) < 2:
        return ""
    fastest = rows["tokens_per_s"].idxmax()
    rate = rows.loc[fastest, "tokens_per_s"]
    others = [f"{fmt_ratio(rate / row['tokens_per_s'])} {strategy_label(name)}" for name, row in rows.iterrows()
              if name != fastest and row["tokens_per_s"] > 0]
    return f"{where}{strategy_label(fastest)} decodes fastest, {fmt_rate(rate)}: {join_words(others)}"
