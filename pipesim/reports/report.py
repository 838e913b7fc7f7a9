"""``pipesim report DIR``: figures chosen for the study, captions that state findings, HTML and Markdown."""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import departures
from .configurations import configuration_table
from .document import Block, Bullets, Code, Heading, Image, Paragraph, Table, to_html, to_markdown
from .figures import FigureOut, heatmap_figure, throughput_figure, tuning_figure
from .findings import headline, sentence
from .formatting import fmt_pct, fmt_ratio, fmt_seconds, significant, strategy_label
from .pointfigures import itl_figure, representative_where, utilization_figure
from .sweep import RESULTS_CSV, read_meta, read_results
from .timeline import timeline_figure
from .traces import read_traces
from .validation import load_comparisons, validation_figure
from .view import StudyView, make_view

FIGURE_DIR = "figures"
DPI = 110


@dataclass
class ReportFiles:
    """What ``build_report`` wrote."""

    html: Path
    markdown: Path
    figures: list[FigureOut]
    folder: Path


def make_figures(view: StudyView, folder: Path) -> list[FigureOut]:
    """Every figure the study calls for, in reading order."""
    traces = {strategy: trace for strategy, (_entry, trace) in read_traces(folder).items()}
    representative = view.representative_rows().reset_index()
    comparisons = load_comparisons(folder, view.table, representative)
    candidates = [throughput_figure(view), heatmap_figure(view), tuning_figure(view), itl_figure(view, traces),
                  utilization_figure(view, traces), timeline_figure(traces, view.strategies),
                  validation_figure(comparisons, view.strategies)]
    return [figure for figure in candidates if figure is not None]


def _png(figure: FigureOut) -> bytes:
    buffer = io.BytesIO()
    figure.figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _value(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if kind == "s":
        return fmt_seconds(float(value))
    if kind == "pct":
        return fmt_pct(float(value))
    if kind == "x":
        return fmt_ratio(float(value))
    return significant(float(value))


def summary_table(view: StudyView) -> Table:
    """The representative point of each strategy, side by side (averaged over replicates)."""
    rows = view.representative_means()
    base = rows["tokens_per_s"].get(view.baseline) if view.baseline in rows.index else None
    body = []
    for strategy, row in rows.iterrows():
        speedup = row["tokens_per_s"] / base if base else None
        body.append([strategy_label(strategy), _value(row["tokens_per_s"], "n"), _value(speedup, "x"),
                     _value(row["ttft_s"], "s"), _value(row["itl_p50_s"], "s"), _value(row["itl_p99_s"], "s"),
                     _value(row.get("acceptance_rate"), "pct"), _value(row.get("mean_tokens_per_commit"), "n"),
                     _value(row["util_mean"], "pct"), _value(row["wasted_compute_fraction"], "pct")])
    headers = ["strategy", "tokens/s", f"vs {strategy_label(view.baseline)}" if view.baseline else "speedup",
               "TTFT", "ITL p50", "ITL p99", "acceptance", "tokens/commit", "node busy", "cancelled work"]
    return Table(headers, body)


def departure_table(view: StudyView) -> Table | None:
    entries = departures.departures(view)
    if not entries:
        return None
    return Table(["strategy", "points", "median |error|, nominal α", "largest error", "where",
                  "median |error|, drawn α"],
                 [[strategy_label(d.strategy), str(d.points), f"{d.median_error * 100:.2f}%",
                   f"{d.max_error * 100:+.2f}%", d.max_where,
                   "–" if d.median_error_realized is None else f"{d.median_error_realized * 100:.2f}%"]
                  for d in entries])


def configuration_blocks(meta: dict[str, Any]) -> list[Block]:
    """Study axes, fixed settings and the base scenario."""
    study = meta.get("study", {})
    rows = [[f"`{axis['name']}`", ", ".join(axis["labels"])] for axis in study.get("axes", [])]
    blocks: list[Block] = [Heading(2, "Configuration"),
                           Paragraph(f"Study **{study.get('name', '?')}** (`{study.get('source', '?')}`), base "
                                     f"scenario `{study.get('base', '?')}`. {study.get('description', '')}".strip()),
                           Table(["axis", "values"], rows)]
    settings = [[f"`{k}`", str(v)] for k, v in (study.get("set") or {}).items()]
    if settings:
        blocks += [Paragraph("Fixed settings applied to the base scenario:"), Table(["key", "value"], settings)]
    chosen = meta.get("representatives") or {}
    if chosen:
        first = next(iter(chosen.values()))["labels"]
        held = ", ".join(f"{k} = {v}" for k, v in first.items() if k != "strategy.name")
        blocks.append(Paragraph(f"Representative point (timeline, distributions, utilization): {held or 'the base'}."))
    run = [["points", str(meta.get("points", "?"))],
           ["distinct configurations", str(meta.get("unique_configurations", "?"))],
           ["simulated / reused from the folder", f"{meta.get('simulated', '?')} / {meta.get('reused', '?')}"],
           ["failed", str(meta.get("failed", 0))],
           ["ran on", f"{meta.get('backend', '?')} x{meta.get('workers', '?')}, "
                      f"{significant(float(meta.get('wall_s', 0.0)))} s"],
           ["pipesim", str(meta.get("pipesim", "?"))], ["started", str(meta.get("started", "?"))]]
    blocks += [Table(["sweep", ""], run)]
    base = study.get("base_document")
    if base:
        flat = _flatten(base)
        blocks += [Paragraph("Base scenario (after the study's fixed settings):"),
                   Table(["field", "value"], [[f"`{k}`", v] for k, v in flat]),
                   Code(yaml.safe_dump(base, sort_keys=False), summary="base scenario as YAML")]
    return blocks


def _flatten(document: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, name + ".")
        else:
            out.append((name, yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
                        .removesuffix("...").strip()))
    return out


def _cost_model_name(study: dict[str, Any]) -> str:
    cluster = (study.get("base_document") or {}).get("cluster") or {}
    return "calibrated (profile)" if cluster.get("profile") else str(cluster.get("cost_model") or "roofline")


def build_blocks(view: StudyView, figures: list[FigureOut], pngs: dict[str, bytes], title: str,
                 full_table: Any = None) -> list[Block]:
    study = view.study
    blocks: list[Block] = [Heading(1, title)]
    if study.get("description"):
        blocks.append(Paragraph(study["description"]))
    n_points = len(view.table)
    blocks.append(Paragraph(
        f"{n_points} simulated points over {len(view.axes)} axes "
        f"({', '.join(f'`{a.name}`' for a in view.axes)}); strategies: "
        f"{', '.join(strategy_label(s) for s in view.strategies)}. Throughput is the decode rate (tokens after the "
        f"first, per second); every number is simulated time from the {_cost_model_name(study)} cost model, not a "
        "measurement."))
    lead = sentence([headline(view.representative_means(), view.baseline, representative_where(view))])
    blocks += [Heading(2, "Findings"), Bullets([c for c in [lead, *(f.caption for f in figures)] if c])]
    replicates = [a for a in view.axes if a.is_replicate]
    note = ("" if not replicates else " Means over " + " x ".join(f"{len(a.labels)} `{a.name}` values"
                                                                   for a in replicates) + "; the figures of "
            "single runs (latency distribution, utilization, timeline) show the first.")
    blocks += [Heading(2, "At the representative point"), summary_table(view)]
    if note:
        blocks.append(Paragraph(note.strip()))
    blocks.append(Heading(2, "Figures"))
    for number, figure in enumerate(figures, start=1):
        blocks += [Heading(3, figure.title),
                   Image(figure.name, figure.title, figure.caption, f"{FIGURE_DIR}/{figure.name}.png",
                         pngs[figure.name], number)]
    table = departure_table(view)
    if table is not None:
        blocks += [Heading(2, "Simulation vs closed form"),
                   Paragraph("The dashed curves are closed forms evaluated on the simulator's own stage, link and "
                             "payload costs: iterative time per token = sum of stage times + link times; synchronous "
                             "speculation commits (1-α^(γ+1))/(1-α) tokens per iteration of γ draft steps and one "
                             "pass of γ+1 tokens."),
                   table, Bullets(departures.explanations(view))]
    if full_table is not None and (view.study.get("report", {}) or {}).get("configurations"):
        blocks += configuration_table(full_table, view.meta)
    blocks += configuration_blocks(view.meta)
    blocks += [Heading(2, "Files"),
               Paragraph(f"`{RESULTS_CSV}`: one row per point (axis values, resolved fields, `config_key`, every "
                         "metric, closed forms). Reproduce with:"),
               Code(f"pipesim sweep {study.get('source', 'STUDY.yaml')} --out runs/{study.get('name', 'study')}\n"
                    f"pipesim report runs/{study.get('name', 'study')}")]
    return blocks


def build_report(folder: str | Path, out: str | Path | None = None, title: str | None = None) -> ReportFiles:
    """Write report.html, report.md and figures/*.png for a sweep folder (into ``out``, default the folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {folder}")
    table = read_results(folder)
    meta = read_meta(folder)
    view = make_view(table, meta)
    if view.table.empty:
        raise ValueError(f"{folder}: no successful points to report")
    out = Path(out) if out is not None else folder
    (out / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
    figures = make_figures(view, folder)
    pngs = {}
    for figure in figures:
        pngs[figure.name] = _png(figure)
        (out / FIGURE_DIR / f"{figure.name}.png").write_bytes(pngs[figure.name])
    title = title or f"pipesim study: {view.study.get('name', folder.name)}"
    blocks = build_blocks(view, figures, pngs, title, table)
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, title))
    if out.resolve() != folder.resolve():
        if (folder / RESULTS_CSV).is_file():
            shutil.copyfile(folder / RESULTS_CSV, out / RESULTS_CSV)
        else:
            table.to_csv(out / RESULTS_CSV, index=False)
    return ReportFiles(page, markdown, figures, out)

