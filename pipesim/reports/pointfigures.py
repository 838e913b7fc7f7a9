"""Figures of the representative point: inter-token latency distributions and per-node utilization."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import FuncFormatter

from ..metrics import token_times
from ..trace import Trace
from . import findings
from .figures import FigureOut, new_figure, setup_x
from .formatting import fmt_seconds, strategy_color, strategy_label
from .view import StudyView


def representative_where(view: StudyView) -> str:
    """``at 1 Gbit/s, `` : the representative point's axis values, to open a caption."""
    labels = view.representative_labels()
    parts = []
    for name, label in labels.items():
        axis = view.axis(name)
        if axis is None or axis.is_replicate:
            continue
        parts.append(axis.text(label))
    return f"at {', '.join(parts)}, " if parts else ""


# -- inter-token latency -------------------------------------------------------------------------

def itl_figure(view: StudyView, traces: dict[str, Trace]) -> FigureOut | None:
    """Inter-token latency: the distribution at the representative point, and p50/p99 along x."""
    rows = view.representative_rows()
    if rows.empty or rows["itl_p50_s"].isna().all():
        return None
    has_x = view.x is not None
    figure = new_figure(10.5 if has_x else 5.5, 4.2)
    axes = figure.subplots(1, 2 if has_x else 1, squeeze=False)[0]
    order = [s for s in view.strategies if s in traces]
    data = [np.asarray(token_times(traces[s])[1]) for s in order]
    if order:
        box = axes[0].boxplot(data, whis=(1, 99), showfliers=False, patch_artist=True, widths=0.6,
                              tick_labels=[strategy_label(s) for s in order], medianprops={"color": "black"})
        for patch, strategy in zip(box["boxes"], order, strict=True):
            patch.set_facecolor(strategy_color(strategy, view.strategies))
            patch.set_alpha(0.55)
        for i, values in enumerate(data, start=1):
            if len(values):
                axes[0].plot([i], [np.percentile(values, 99)], marker="v", color="black", ms=5)
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_seconds(v)))
        axes[0].set_ylabel("inter-token latency")
        axes[0].set_title("distribution at the representative point\n(box: p25-p75, whiskers p1-p99, ▼ p99)",
                          fontsize=9)
        axes[0].grid(True, axis="y", alpha=0.3)
    if has_x:
        ax = axes[1]
        p50, p99 = view.curves("itl_p50_s"), view.curves("itl_p99_s")
        if view.facet is not None:
            first = view.facet.labels[0] if view.held.get(view.facet.name) is None else view.held[view.facet.name]
            p50, p99 = p50[p50["facet"] == first], p99[p99["facet"] == first]
        for strategy in view.strategies:
            color = strategy_color(strategy, view.strategies)
            a = p50[p50["strategy"] == strategy].dropna(subset=["value"])
            b = p99[p99["strategy"] == strategy].dropna(subset=["value"])
            if view.x.numeric:
                a, b = a.sort_values("x"), b.sort_values("x")
                ax.plot(a["x"], a["value"], marker="o", ms=3, color=color, label=f"{strategy_label(strategy)} p50")
                ax.plot(b["x"], b["value"], ls="--", color=color, label=f"{strategy_label(strategy)} p99")
            else:
                ax.plot(a["x_label"], a["value"], marker="o", color=color, label=f"{strategy_label(strategy)} p50")
                ax.plot(b["x_label"], b["value"], ls="--", color=color, label=f"{strategy_label(strategy)} p99")
        if view.x.numeric:
            setup_x(ax, view.x)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_seconds(v)))
        ax.set_ylabel("inter-token latency")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, ncols=2)
        ax.set_title("p50 (solid) and p99 (dashed)", fontsize=9)
    where = representative_where(view)
    if view.replicates:  # the numbers of the table beside it: means over the seeds, not the first seed's run
        rows = view.representative_means()
        where = f"{where}averaged over {len(view.replicates[0].labels)} seeds, " if where else where
    caption = findings.sentence([findings.itl_finding(rows, view.baseline, where)])
    return FigureOut("itl", "Inter-token latency", caption, figure)


# -- utilization ---------------------------------------------------------------------------------

def cancelled_busy(trace: Trace) -> dict[str, float]:
    """Per node: fraction of the wall time spent computing runs that were later invalidated."""
    invalid = {r.run_id for r in trace.records if r.kind == "invalidate"}
    wall = trace.t_end - trace.t_start
    busy = dict.fromkeys(trace.nodes, 0.0)
    for r in trace.records:
        if r.kind == "compute" and r.run_id in invalid and r.what == "stage" and r.where in busy:
            busy[r.where] += r.t1 - r.t0
    return {node: value / wall if wall > 0 else 0.0 for node, value in busy.items()}


def utilization_figure(view: StudyView, traces: dict[str, Trace]) -> FigureOut | None:
    """Per-node busy fraction at the representative point, per strategy; cancelled work hatched."""
    rows = view.representative_rows()
    columns = sorted((c for c in rows.columns if c.startswith("util.n") and rows[c].notna().any()),
                     key=lambda c: int(c[6:]))
    if rows.empty or not columns:
        return None
    figure = new_figure(max(6.0, 0.7 * len(columns) * max(1, len(rows)) / 2 + 3), 3.8)
    ax = figure.subplots()
    width = 0.8 / len(rows)
    positions = np.arange(len(columns))
    for i, (strategy, row) in enumerate(rows.iterrows()):
        values = row[columns].to_numpy(dtype=float)
        ax.bar(positions + (i - (len(rows) - 1) / 2) * width, values * 100, width,
               color=strategy_color(strategy, view.strategies), label=strategy_label(strategy))
        if strategy in traces:
            cancelled = cancelled_busy(traces[strategy])
            hatched = np.array([cancelled.get(c[5:], 0.0) for c in columns])
            if hatched.max() > 0:
                ax.bar(positions + (i - (len(rows) - 1) / 2) * width, hatched * 100, width, fill=False,
                       hatch="////", edgecolor="black", lw=0, label="on runs later cancelled" if i else None)
    ax.set_xticks(positions, [c[5:] + (" (head)" if c == "util.n0" else "") for c in columns])
    ax.set_ylabel("busy (% of wall time)")
    ax.set_ylim(0, 105)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(rows))
    ax.set_title("per-node utilization at the representative point (hatched: computing runs later cancelled)",
                 fontsize=9)
    caption = findings.sentence([findings.utilization_finding(rows, representative_where(view))])
    return FigureOut("utilization", "Per-node utilization", caption, figure)

