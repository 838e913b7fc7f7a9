"""Figures of a study, each with a caption that states its finding (matplotlib, Agg canvas, no pyplot).

Every ``*_figure`` function returns a ``FigureOut`` or None when the study does not call for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from . import findings
from .formatting import (
    fmt_axis_value,
    fmt_bandwidth,
    fmt_seconds,
    strategy_color,
    strategy_label,
)
from .view import KNOB_KEYS, AxisInfo, StudyView

MAX_FACETS = 4


@dataclass
class FigureOut:
    """A drawn figure: file stem, title, one-sentence caption and the numbers the caption states."""

    name: str
    title: str
    caption: str
    figure: Figure
    numbers: dict = field(default_factory=dict)


def _mask(frame: pd.DataFrame, column: str, label: str | None) -> pd.Series:
    """Rows whose ``column`` equals ``label`` (every row when label is None)."""
    if label is None:
        return pd.Series(True, index=frame.index)
    return frame[column] == label


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained", dpi=100)
    FigureCanvasAgg(figure)
    return figure


def setup_x(ax, axis: AxisInfo) -> None:
    if axis.key == "network.bandwidth":
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bandwidth(v).replace(" ", "\n")))
    elif axis.key == "network.latency":
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_seconds(v)))
    ax.set_xlabel(_axis_title(axis))


def _axis_title(axis: AxisInfo) -> str:
    return {"network.bandwidth": "link bandwidth", "cluster.count": "nodes", "acceptance.alpha": "acceptance rate α",
            "network.latency": "link latency", "strategy.gamma": "γ (drafted tokens per verification)",
            "strategy.micro_batch": "micro-batch (tokens per speculative run)"}.get(axis.key, axis.name)


def _facets(view: StudyView, facet: AxisInfo | None) -> list[str | None]:
    if facet is None:
        return [None]
    labels = list(facet.labels)
    if len(labels) <= MAX_FACETS:
        return labels
    picks = np.unique(np.linspace(0, len(labels) - 1, MAX_FACETS).round().astype(int))
    return [labels[i] for i in picks]


def _facet_title(facet: AxisInfo, label: str) -> str:
    return facet.text(label)


def _strategy_title(view: StudyView, held: Sequence[str] = (), bars: bool = False) -> str:
    """What the other axes are held at, for the figure's subtitle."""
    parts = [f"{name} = {view.held[name]}" for name in held if name in view.held]
    if view.replicates:
        parts.append("mean of " + " x ".join(f"{len(a.labels)} {a.name} values" for a in view.replicates)
                     + (" (error bars: min-max)" if bars else " (band: min-max)"))
    return "; ".join(parts)


def _other_axes(view: StudyView, *used: AxisInfo | None) -> list[str]:
    names = {a.name for a in used if a is not None}
    return [a.name for a in view.axes if a.name not in names and not (a.is_strategy or a.is_replicate)]


# -- throughput --------------------------------------------------------------------------------

def throughput_figure(view: StudyView) -> FigureOut | None:
    """Tokens/s and speedup over the baseline against x, per strategy; closed forms dashed."""
    x = view.x
    if x is None:
        return _throughput_bars(view)
    curves = view.curves("tokens_per_s")
    analytic = view.curves("analytic_tokens_per_s")
    speedups = view.speedups()
    facets = _facets(view, view.facet)
    figure = new_figure(5.2 * len(facets) if view.facet else 10.5, 7.2 if view.facet else 4.4)
    if view.facet is not None:
        axes = figure.subplots(2, len(facets), squeeze=False, sharex=True)
        pairs = [(axes[0][i], axes[1][i], f) for i, f in enumerate(facets)]
    else:
        axes = figure.subplots(1, 2)
        pairs = [(axes[0], axes[1], None)]
    for ax_tp, ax_sp, facet_label in pairs:
        c = curves[_mask(curves, "facet", facet_label)]
        a = analytic[_mask(analytic, "facet", facet_label)]
        s = speedups[_mask(speedups, "facet", facet_label)]
        if x.numeric:
            _lines(ax_tp, c, view.strategies, analytic=a)
            _lines(ax_sp, s.assign(value=s["speedup"], min=s["speedup_min"], max=s["speedup_max"]), view.strategies,
                   skip=view.baseline)
            setup_x(ax_tp, x)
            setup_x(ax_sp, x)
        else:
            _bars(ax_tp, c, view.strategies, x.labels, analytic=a)
            _bars(ax_sp, s.assign(value=s["speedup"], min=s["speedup_min"], max=s["speedup_max"]),
                  [t for t in view.strategies if t != view.baseline], x.labels)
            ax_sp.set_xlabel(x.name)
        if facet_label is not None:
            ax_tp.set_xlabel("")
        ax_sp.axhline(1.0, color="#999999", lw=0.8, ls=":")
        ax_tp.set_ylabel("decode throughput (tokens/s)")
        ax_sp.set_ylabel(f"speedup over {strategy_label(view.baseline)}" if view.baseline else "speedup")
        ax_tp.set_ylim(bottom=0)
        ax_sp.set_ylim(bottom=0)
        if facet_label is not None:
            ax_tp.set_title(_facet_title(view.facet, facet_label), fontsize=10)
    handles, labels = pairs[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=9, frameon=False)
    subtitle = _strategy_title(view, _other_axes(view, x, view.facet), bars=not x.numeric)
    legend = "black dashes" if not x.numeric else "dashed"
    figure.suptitle(f"Decode throughput and speedup ({legend}: closed forms)" + (f"; {subtitle}" if subtitle else ""),
                    fontsize=11)
    caption, numbers = _throughput_caption(view, curves, speedups)
    return FigureOut("throughput", f"Throughput and speedup vs {_axis_title(x)}", caption, figure, numbers)


def _throughput_bars(view: StudyView) -> FigureOut | None:
    """No axis but the strategy: one bar per strategy, closed forms as dashes."""
    curves = view.curves("tokens_per_s", x=None, facet=None).assign(x_label="")
    if curves.empty:
        return None
    analytic = view.curves("analytic_tokens_per_s", x=None, facet=None).assign(x_label="")
    figure = new_figure(1.6 * len(view.strategies) + 2.5, 3.8)
    ax = figure.subplots()
    _bars(ax, curves, view.strategies, [""], analytic=analytic)
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.legend(fontsize=8)
    speedups = view.speedups(x=None, facet=None)
    clause, numbers = ("", {})
    if view.baseline:
        clause, numbers = findings.largest_speedup(speedups, view.baseline, None, None)
    rates = findings.join_words([f"{strategy_label(r['strategy'])} {r['value']:.2f}" for _, r in curves.iterrows()])
    caption = findings.sentence([f"decode throughput (tok/s): {rates}", clause])
    return FigureOut("throughput", "Throughput per strategy", caption, figure, numbers)


def _throughput_caption(view: StudyView, curves: pd.DataFrame, speedups: pd.DataFrame) -> tuple[str, dict]:
    x = view.x
    assert x is not None
    contenders = [s for s in view.strategies if s != view.baseline]
    means = curves[curves["strategy"].isin(contenders)].groupby("strategy")["value"].mean()
    ranked = [s for s in means.sort_values(ascending=False).index]
    clauses: list[str] = []
    numbers: dict = {}
    if len(ranked) >= 2:
        clauses.append(findings.compare(curves, ranked[0], ranked[1], x))
    if not x.numeric:
        clauses.append(findings.variant_costs(curves, x.labels[0], view.strategies))
    elif x.key == "acceptance.alpha":
        if view.baseline:
            clause, values = findings.break_even_alpha(speedups, view.baseline, view.strategies, view.facet)
            clauses.append(clause)
            numbers["break_even"] = values
    elif x.key != "network.bandwidth":
        clauses.append(findings.trend(curves, x, view.strategies))
    if view.baseline:
        clause, values = findings.largest_speedup(speedups, view.baseline, x, view.facet)
        clauses.append(clause)
        numbers.update(values)
    if x.numeric and x.key != "acceptance.alpha":
        clause, values = findings.saturation(curves, x)
        clauses.append(clause)
        numbers.update(values)
    clauses.append(findings.instability(curves, x))
    return findings.sentence(clauses), numbers


def _lines(ax, frame: pd.DataFrame, strategies: Sequence[str], analytic: pd.DataFrame | None = None,
           skip: str | None = None) -> None:
    for strategy in strategies:
        if strategy == skip:
            continue
        rows = frame[frame["strategy"] == strategy].dropna(subset=["value"]).sort_values("x")
        if rows.empty:
            continue
        color = strategy_color(strategy, strategies)
        ax.plot(rows["x"], rows["value"], marker="o", ms=4, lw=1.8, color=color, label=strategy_label(strategy))
        if "n" in rows and (rows["n"] > 1).any() and (rows["max"] > rows["min"]).any():
            ax.fill_between(rows["x"], rows["min"], rows["max"], color=color, alpha=0.15, lw=0)
        if analytic is not None:
            model = analytic[analytic["strategy"] == strategy].dropna(subset=["value"]).sort_values("x")
            if not model.empty:
                ax.plot(model["x"], model["value"], ls="--", lw=1.2, color=color, alpha=0.8,
                        label=f"{strategy_label(strategy)} (closed form)")
    ax.grid(True, which="major", alpha=0.3)


def _bars(ax, frame: pd.DataFrame, strategies: Sequence[str], labels: Sequence[str],
          analytic: pd.DataFrame | None = None) -> None:
    """Grouped bars per category; min-max of replicates as error bars, closed forms as black dashes."""
    width = 0.8 / max(1, len(strategies))
    positions = np.arange(len(labels))
    for i, strategy in enumerate(strategies):
        rows = frame[frame["strategy"] == strategy].set_index("x_label").reindex(labels)
        at = positions + (i - (len(strategies) - 1) / 2) * width
        values = rows["value"].to_numpy(dtype=float)
        errors = None
        if "min" in rows and (rows["n"].fillna(1) > 1).any():
            spread = [values - rows["min"].to_numpy(dtype=float), rows["max"].to_numpy(dtype=float) - values]
            errors = np.clip(np.nan_to_num(np.vstack(spread)), 0.0, None)
        ax.bar(at, values, width, color=strategy_color(strategy, strategies), label=strategy_label(strategy),
               yerr=errors, error_kw={"lw": 0.8, "capsize": 2, "ecolor": "#333333"})
        if analytic is not None:
            model = analytic[analytic["strategy"] == strategy].set_index("x_label")["value"].reindex(labels)
            if model.notna().any():
                ax.scatter(at, model.to_numpy(dtype=float), marker="_", s=width * 900, color="black", lw=1.5,
                           zorder=3, label="closed form" if i == 0 or "closed form" not in
                           ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(positions, labels, rotation=20 if max(map(len, labels)) > 8 else 0, ha="right"
                  if max(map(len, labels)) > 8 else "center", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


# -- heatmap -----------------------------------------------------------------------------------

def heatmap_figure(view: StudyView) -> FigureOut | None:
    """Speedup over the baseline across two numeric axes (α x bandwidth when both vary)."""
    numeric = [a for a in view.axes if a.numeric and not (a.is_knob or a.is_replicate) and len(a.labels) >= 3]
    names = {a.name for a in numeric}
    if len(numeric) < 2 or view.baseline is None:
        return None
    if {"acceptance.alpha", "network.bandwidth"} <= names:
        y_axis, x_axis = view.axis("acceptance.alpha"), view.axis("network.bandwidth")
    else:
        x_axis, y_axis = numeric[0], numeric[1]
    assert x_axis is not None and y_axis is not None
    speedups = view.speedups(x=x_axis, facet=y_axis)
    contenders = [s for s in view.strategies if s != view.baseline]
    figure = new_figure(4.6 * len(contenders) + 0.8, 4.2)
    axes = figure.subplots(1, len(contenders), squeeze=False)[0]
    top = float(np.nanmax(speedups["speedup"])) if len(speedups) else 1.0
    low = float(np.nanmin(speedups["speedup"])) if len(speedups) else 1.0
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(low, 0.99), vmax=max(top, 1.01))
    image = None
    for ax, strategy in zip(axes, contenders, strict=True):
        grid = (speedups[speedups["strategy"] == strategy]
                .pivot_table(index="facet", columns="x_label", values="speedup", sort=False)
                .reindex(index=list(y_axis.labels), columns=list(x_axis.labels)))
        image = ax.imshow(grid.to_numpy(dtype=float), origin="lower", aspect="auto", cmap="RdBu", norm=norm)
        for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value - 1) > 0.6 * (top - 1 if value > 1 else 1 - low) else "black")
        ax.set_xticks(range(len(x_axis.labels)), x_axis.labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(y_axis.labels)), y_axis.labels, fontsize=8)
        ax.set_xlabel(_axis_title(x_axis))
        ax.set_ylabel(_axis_title(y_axis))
        ax.set_title(f"{strategy_label(strategy)} / {strategy_label(view.baseline)}", fontsize=10)
    if image is not None:
        figure.colorbar(image, ax=list(axes), label=f"speedup over {strategy_label(view.baseline)}", shrink=0.9)
    clause = findings.speedup_ranges(speedups, view.baseline, view.strategies, x_axis, y_axis)
    _, numbers = findings.largest_speedup(speedups, view.baseline, x_axis, y_axis)
    caption = findings.sentence([clause])
    return FigureOut("heatmap", f"Speedup over {_axis_title(y_axis)} x {_axis_title(x_axis)}", caption, figure,
                     numbers)


# -- tuning (γ, micro-batch) -------------------------------------------------------------------

def tuning_figure(view: StudyView) -> FigureOut | None:
    """Each strategy against its own knob (γ for speculative, micro-batch for PipeInfer)."""
    knobs = [a for a in view.axes if a.is_knob and KNOB_KEYS[a.name] in view.strategies]
    if not knobs:
        return None
    hue = view.x if view.x is not None and not view.x.is_knob else None
    figure = new_figure(5.0 * len(knobs), 4.2)
    axes = figure.subplots(1, len(knobs), squeeze=False)[0]
    clauses = []
    numbers: dict = {}
    for ax, knob in zip(axes, knobs, strict=True):
        owner = KNOB_KEYS[knob.name]
        curves = view.curves("tokens_per_s", x=knob, facet=hue)
        analytic = view.curves("analytic_tokens_per_s", x=knob, facet=hue)
        base = view.curves("tokens_per_s", x=hue, facet=None)
        hue_labels = list(hue.labels) if hue is not None else [None]
        shades = np.linspace(0.45, 1.0, len(hue_labels))
        bests = []
        for shade, label in zip(shades, hue_labels, strict=True):
            rows = curves[_mask(curves, "facet", label) & (curves["strategy"] == owner)]
            rows = rows.dropna(subset=["value"]).sort_values("x")
            if rows.empty:
                continue
            color = strategy_color(owner, view.strategies)
            name = strategy_label(owner) + (f", {_facet_title(hue, label)}" if label is not None else "")
            ax.plot(rows["x"], rows["value"], marker="o", color=color, alpha=shade, label=name)
            model = analytic[_mask(analytic, "facet", label) & (analytic["strategy"] == owner)]
            model = model.dropna(subset=["value"]).sort_values("x")
            if not model.empty:
                ax.plot(model["x"], model["value"], ls="--", color=color, alpha=shade * 0.8)
            if view.baseline:
                ref = base[_mask(base, "x_label", label) & (base["strategy"] == view.baseline)]["value"]
                if len(ref):
                    ax.axhline(float(ref.iloc[0]), color=strategy_color(view.baseline), alpha=shade, lw=0.9,
                               ls=":")
            best = rows.loc[rows["value"].idxmax()]
            bests.append((float(best["x"]), _facet_title(hue, label) if label is not None else "",
                          float(best["value"])))
            numbers[(owner, label)] = float(best["x"])
        ax.set_xlabel(_axis_title(knob))
        ax.set_ylabel("decode throughput (tokens/s)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if bests:
            clauses.append(f"{strategy_label(owner)} is fastest with " + _best_knobs(knob, bests))
    figure.suptitle(f"Draft length (dotted: {strategy_label(view.baseline)}; dashed: closed form)"
                    if view.baseline else "Draft length", fontsize=11)
    return FigureOut("tuning", "Draft length: γ and micro-batch", findings.sentence(clauses), figure, numbers)


def _best_knobs(knob: AxisInfo, bests: list[tuple[float, str, float]]) -> str:
    """``γ=2 at every α (1.9, 2.5, 2.9 tok/s at α=0.5, 0.7, 0.9)`` or one entry per hue value."""
    if len({b[0] for b in bests}) == 1 and len(bests) > 1:
        rates = ", ".join(f"{b[2]:.2f}" for b in bests)
        where = ", ".join(b[1] for b in bests)
        return f"{fmt_axis_value(knob.key, bests[0][0])} in every case ({rates} tok/s at {where})"
    return findings.join_words([f"{fmt_axis_value(knob.key, x)}{f' at {where}' if where else ''} ({rate:.2f} tok/s)"
                                for x, where, rate in bests])
