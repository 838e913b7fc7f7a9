"""Where the simulation departs from the closed forms, and why, in numbers taken from the table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .formatting import fmt_pct, strategy_label
from .view import StudyView


@dataclass
class Departure:
    """Simulated vs closed-form decode rate of one strategy over every point of the study."""

    strategy: str
    points: int
    median_error: float  # median |simulated / formula - 1| with the nominal α
    max_error: float
    max_where: str
    median_error_realized: float | None  # with the acceptance rate the simulation drew


def _errors(rows: pd.DataFrame, column: str) -> pd.Series:
    model = pd.to_numeric(rows[column], errors="coerce")
    return (pd.to_numeric(rows["tokens_per_s"], errors="coerce") / model - 1.0).dropna()


def _where(view: StudyView, row: pd.Series) -> str:
    labels = [f"{a.name}={row[a.name]}" for a in view.axes if not a.is_strategy and a.name in row]
    return ", ".join(labels)


def departures(view: StudyView) -> list[Departure]:
    """One entry per strategy that has a closed form."""
    out = []
    for strategy in view.strategies:
        rows = view.table[view.table["strategy"] == strategy]
        errors = _errors(rows, "analytic_tokens_per_s")
        if errors.empty:
            continue
        worst = errors.abs().idxmax()
        realized = _errors(rows, "analytic_tokens_per_s_realized")
        out.append(Departure(strategy, len(errors), float(errors.abs().median()), float(errors.loc[worst]),
                             _where(view, rows.loc[worst]),
                             float(realized.abs().median()) if len(realized) else None))
    return out


def explanations(view: StudyView) -> list[str]:
    """Bullets: how close each formula is and what the gap comes from."""
    table = view.table
    bullets = []
    for d in departures(view):
        name = strategy_label(d.strategy)
        text = (f"**{name}**: the simulation departs from the closed form by {_pct(d.median_error)} (median over "
                f"{d.points} points; largest {d.max_error * 100:+.2f}% at {d.max_where}).")
        if d.strategy == "iterative":
            text += (" With one run in flight nothing queues and the formula sums the very stage and link costs the "
                     "simulator charges, context growth included, so the two agree to rounding.")
        elif d.strategy == "speculative":
            rows = table[table["strategy"] == "speculative"]
            drawn = pd.to_numeric(rows["acceptance_rate"], errors="coerce").dropna()
            if len(drawn) and d.median_error_realized is not None:
                share = "Much of it" if d.median_error_realized < 0.7 * d.median_error else "Little of it"
                low, high = rows["alpha"].min(), rows["alpha"].max()
                nominal = f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"
                text += (f" {share} is sampling: a run draws its acceptances, and the drawn rate ranges from "
                         f"{drawn.min():.2f} to {drawn.max():.2f} over the points (nominal α {nominal}); with the "
                         f"drawn rate in the formula the median gap is {_pct(d.median_error_realized)}.")
            text += (" What remains is dynamics the formula leaves out: the draft model first reads the whole prompt "
                     "(one batch, counted in the decode time), each draft starts by catching up on the tokens just "
                     "committed (a batch, not one step), the last verification is cut short at the token limit, and "
                     "the formula takes the context at mid-generation.")
        bullets.append(text)
    pipeinfer = table[table["strategy"] == "pipeinfer"]
    if len(pipeinfer) and "speculative" in view.strategies:
        speculative = table[table["strategy"] == "speculative"]
        index = [a.name for a in view.axes if not a.is_strategy and a.name in table.columns]
        if index:
            merged = pipeinfer.merge(speculative[[*index, "analytic_tokens_per_s"]], on=index,
                                     suffixes=("", "_spec"))
            ratio = (merged["tokens_per_s"] / merged["analytic_tokens_per_s_spec"]).dropna()
        else:
            ratio = pd.Series(dtype=float)
        wasted = float(pipeinfer["wasted_compute_fraction"].mean())
        text = "**PipeInfer** has no closed form here: it overlaps drafting with verification and keeps several runs "
        text += "in flight, so stage queues and cancellations decide its rate."
        if len(ratio):
            text += (f" It runs at {ratio.median():.2f}x the synchronous speculative formula at the same points "
                     f"(median; range {ratio.min():.2f}-{ratio.max():.2f}x),")
        text += f" while {fmt_pct(wasted)} of its target compute (mean over points) goes to runs later cancelled."
        if "bandwidth_bps" in pipeinfer and pipeinfer["bandwidth_bps"].nunique() > 1:
            slowest = pipeinfer[pipeinfer["bandwidth_bps"] == pipeinfer["bandwidth_bps"].min()]
            worst = slowest.loc[slowest["link_util_max"].idxmax()]
            text += (f" On the slowest link its busiest link ({worst['busiest_link']}) is busy up to "
                     f"{fmt_pct(float(worst['link_util_max']))} of the time: messages queue behind each other, "
                     "which no unloaded formula sees")
            runs = pd.to_numeric(slowest["runs_launched"], errors="coerce")
            if runs.max() > 3 * runs.median():
                text += (f"; in the worst run the head launches {int(runs.max()):,} runs against a median of "
                         f"{int(runs.median()):,} (results queue on the way back, verification lags, so the head "
                         "keeps speculating, bounded only by its KV partitions)")
            text += "."
        bullets.append(text)
    return bullets


def _pct(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value * 100:.2f}%" if value < 0.1 else fmt_pct(value)
