"""Timeline (Gantt) of representative runs: nodes as rows, runs as bars, cancelled work marked."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib.patches import Patch

from ..trace import Trace
from . import findings
from .figures import FigureOut, new_figure
from .formatting import fmt_seconds, join_words, strategy_label

TOKENS_SHOWN = 8  # the window is as long as the slowest strategy takes to commit this many tokens
CATEGORIES = {  # name: (colour, legend)
    "prefill": ("#9ecae1", "prefill"),
    "target": ("#3182bd", "target run (decode / verify)"),
    "spec": ("#fd8d3c", "speculative run"),
    "cancelled": ("#de2d26", "cancelled run (result thrown away)"),
    "draft": ("#756bb1", "draft step"),
    "verify": ("#31a354", "sample / verify"),
}


def commit_times(trace: Trace) -> list[tuple[float, int]]:
    """(time, tokens) of every commit at the head."""
    return [(r.t0, r.n_tokens) for r in trace.records if r.kind == "tokens" and r.n_tokens]


def window_length(traces: dict[str, Trace], tokens: int = TOKENS_SHOWN) -> float:
    """Seconds the slowest strategy needs to commit ``tokens`` tokens after its first."""
    lengths = []
    for trace in traces.values():
        commits = commit_times(trace)
        if not commits:
            continue
        t_first, total = commits[0][0], 0
        end = commits[-1][0]
        for t, n in commits[1:]:
            total += n
            if total >= tokens:
                end = t
                break
        lengths.append(end - t_first)
    return max(lengths) if lengths else 0.0


def window_counts(trace: Trace, length: float) -> tuple[int, int]:
    """Tokens committed and runs cancelled in ``(first token, first token + length]``."""
    commits = commit_times(trace)
    if not commits:
        return 0, 0
    t0 = commits[0][0]
    tokens = sum(n for t, n in commits[1:] if t <= t0 + length + 1e-12)
    cancelled = {r.run_id for r in trace.records if r.kind == "cancel_sent" and t0 < r.t0 <= t0 + length + 1e-12}
    return tokens, len(cancelled)


def _category(record, kinds: dict[int, str], invalid: set[int]) -> str:
    if record.what == "draft":
        return "draft"
    if record.what == "verify":
        return "verify"
    if record.run_id in invalid:
        return "cancelled"
    kind = kinds.get(record.run_id, "decode")
    return "prefill" if kind == "prefill" else "spec" if kind == "spec" else "target"


def _draw(ax, trace: Trace, start: float, length: float) -> None:
    kinds = {r.run_id: r.what for r in trace.records if r.kind == "launch"}
    invalid = {r.run_id for r in trace.records if r.kind == "invalidate"}
    rows = {name: i for i, name in enumerate(trace.nodes)}
    spans: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    aborted: list[tuple[float, int]] = []
    skipped: list[tuple[float, int]] = []
    end = start + length
    for r in trace.records:
        if r.where not in rows or r.t1 < start or r.t0 > end:
            continue
        row = rows[r.where]
        if r.kind == "compute":
            spans[(row, _category(r, kinds, invalid))].append((r.t0 - start, max(r.t1 - r.t0, length * 1e-4)))
            if r.aborted:
                aborted.append((r.t1 - start, row))
        elif r.kind == "skip":
            skipped.append((r.t0 - start, row))
    for (row, category), bars in spans.items():
        color, _ = CATEGORIES[category]
        hatch = "////" if category == "cancelled" else None
        ax.broken_barh(bars, (row - 0.38, 0.76), facecolors=color, edgecolor="none" if hatch is None else "#67000d",
                       hatch=hatch, lw=0)
    if aborted:
        t, row = zip(*aborted, strict=True)
        ax.scatter(t, np.asarray(row), marker="x", s=18, color="black", lw=1, zorder=3)
    if skipped:
        t, row = zip(*skipped, strict=True)
        ax.scatter(t, np.asarray(row) + 0.45, marker="|", s=14, color="#de2d26", lw=0.8, zorder=3)
    for t, _tokens in commit_times(trace):
        if start <= t <= end:
            ax.axvline(t - start, color="#2ca25f", lw=0.7, alpha=0.8, zorder=0)
    ax.set_yticks(range(len(trace.nodes)), [f"{n} (head)" if i == 0 else n for i, n in enumerate(trace.nodes)],
                  fontsize=7)
    ax.set_ylim(len(trace.nodes) - 0.5, -0.5)
    ax.set_xlim(0, length)


def timeline_figure(traces: dict[str, Trace], order: Sequence[str]) -> FigureOut | None:
    """One Gantt panel per strategy over the same window after its first token."""
    order = [s for s in order if s in traces and commit_times(traces[s])]
    if not order:
        return None
    length = window_length({s: traces[s] for s in order})
    if length <= 0:
        return None
    figure = new_figure(11.0, 1.0 + sum(0.28 * len(traces[s].nodes) + 0.5 for s in order))
    axes = figure.subplots(len(order), 1, squeeze=False, sharex=True)[:, 0]
    counts = {}
    for ax, strategy in zip(axes, order, strict=True):
        trace = traces[strategy]
        start = commit_times(trace)[0][0]
        _draw(ax, trace, start, length)
        counts[strategy] = window_counts(trace, length)
        ax.set_title(f"{strategy_label(strategy)}: {counts[strategy][0]} tokens committed (green lines)",
                     fontsize=9, loc="left")
    axes[-1].set_xlabel("seconds after the first token")
    handles = [Patch(facecolor=c, label=label, hatch="////" if k == "cancelled" else None)
               for k, (c, label) in CATEGORIES.items()]
    handles.append(Patch(facecolor="white", edgecolor="white", label="x: aborted at a layer boundary, "
                         "red tick: stage skipped a cancelled run"))
    figure.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    parts = [f"{strategy_label(s)} commits {counts[s][0]} tokens" if i == 0 else f"{strategy_label(s)} {counts[s][0]}"
             for i, s in enumerate(order)]
    clause = f"in the first {fmt_seconds(length)} after the first token, {join_words(parts)}"
    cancelling = [s for s in order if counts[s][1]]
    if cancelling:
        clause += "; " + join_words([f"{strategy_label(s)} cancels {counts[s][1]} runs" for s in cancelling])
    numbers = {"window_s": length, **{f"tokens.{s}": counts[s][0] for s in order},
               **{f"cancelled.{s}": counts[s][1] for s in order}}
    return FigureOut("timeline", "Timeline of a representative run", findings.sentence([clause]), figure, numbers)
