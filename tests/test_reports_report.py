"""Reports: every figure in the HTML and the Markdown, and captions whose numbers agree with the table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipesim.reports.commands import main as reports_main
from pipesim.reports.formatting import fmt_bandwidth, fmt_pct, fmt_seconds
from pipesim.reports.report import build_report
from pipesim.reports.study import load_study
from pipesim.reports.sweep import run_sweep
from pipesim.reports.validation import load_comparisons, validation_figure

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper-8node-cpu.yaml"
STRATEGIES = ["iterative", "speculative", "pipeinfer"]


def sweep(folder: Path, axes: dict, **extra) -> Path:
    document = {"name": "tiny", "base": str(PAPER), "axes": axes,
                "set": {"workload.generate_tokens": 12, "workload.prompt_tokens": 16}, **extra}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    run_sweep(load_study(path), folder / "run", jobs=1, progress=False)
    return folder / "run"


def captions(markdown: str) -> dict[str, str]:
    """Figure file stem -> caption, from the Markdown."""
    found = re.findall(r"!\[[^\]]*\]\(figures/(\w+)\.png\)\n\n\*Figure \d+\. (.+?)\*\n", markdown)
    return dict(found)


@pytest.fixture(scope="module")
def bandwidth_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bw")
    run = sweep(folder, {"network.bandwidth": ["10Mbit/s", "1Gbit/s", "10Gbit/s"], "strategy.name": STRATEGIES},
                representative={"network.bandwidth": "1Gbit/s"})
    written = build_report(run, folder / "report")
    return run, written, pd.read_parquet(run / "results.parquet")


def test_each_figure_is_in_the_html_and_the_markdown(bandwidth_report):
    _, written, _ = bandwidth_report
    names = [f.name for f in written.figures]
    assert names == ["throughput", "itl", "utilization", "timeline"]
    page = written.html.read_text()
    markdown = written.markdown.read_text()
    for name in names:
        assert re.search(rf'data-figure="{name}" src="data:image/png;base64,[A-Za-z0-9+/=]{{1000,}}"', page)
        assert f"](figures/{name}.png)" in markdown
        png = written.folder / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(captions(markdown)) == set(names)
    assert page.count("<figcaption>") == len(names)
    assert "src=\"figures/" not in page  # self-contained
    assert (written.folder / "results.csv").is_file()  # copied along with --out
    for section in ("## Findings", "## Simulation vs closed form", "## Configuration", "`network.bandwidth`"):
        assert section in markdown


def test_throughput_caption_matches_the_table(bandwidth_report):
    _, written, table = bandwidth_report
    caption = captions(written.markdown.read_text())["throughput"]
    rates = table.pivot_table(index="bandwidth_bps", columns="strategy", values="tokens_per_s")
    speedup = rates.div(rates["iterative"], axis=0).drop(columns="iterative")
    best = speedup.stack().idxmax()
    assert f"the largest speedup over iterative is {speedup.stack().max():.2f}x" in caption
    assert f"at {fmt_bandwidth(best[0])}" in caption
    if (rates["pipeinfer"] > rates["speculative"]).all():
        assert "PipeInfer beats speculative at every bandwidth from 10 Mbit/s to 10 Gbit/s" in caption
    else:
        assert "beats" in caption or "overtakes" in caption


def test_latency_and_utilization_captions_match_the_table(bandwidth_report):
    _, written, table = bandwidth_report
    found = captions(written.markdown.read_text())
    rows = table[table["network.bandwidth"] == "1Gbit/s"].set_index("strategy")
    fastest = rows["itl_p50_s"].idxmin()
    assert found["itl"].startswith("At 1 Gbit/s, ")
    assert f"median inter-token latency is {fmt_seconds(rows.loc[fastest, 'itl_p50_s'])}" in found["itl"]
    assert f"against {fmt_seconds(rows.loc['iterative', 'itl_p50_s'])} for iterative" in found["itl"]
    busy = [fmt_pct(rows.loc[s, "util_mean"]) for s in STRATEGIES]
    assert found["utilization"].startswith(f"At 1 Gbit/s, the average node is busy {busy[0]} of the time under "
                                           f"iterative, {busy[1]} under speculative and {busy[2]} under PipeInfer")
    wasted = rows["wasted_compute_fraction"].max()
    if wasted > 0.005:
        assert f"{fmt_pct(wasted)} of PipeInfer's target compute" in found["utilization"]


def test_timeline_caption_counts_the_committed_tokens(bandwidth_report):
    run, written, _ = bandwidth_report
    caption = captions(written.markdown.read_text())["timeline"]
    window = re.search(r"in the first (\S+ m?s) after", caption, re.I).group(1)
    seconds = float(window.split()[0]) * (1e-3 if window.endswith("ms") else 1.0)
    for strategy, label in (("iterative", "iterative"), ("speculative", "speculative"), ("pipeinfer", "PipeInfer")):
        records = pd.read_parquet(run / "traces" / f"{strategy}.records.parquet")
        commits = records[(records["kind"] == "tokens") & (records["n_tokens"] > 0)]
        t0 = commits["t0"].iloc[0]
        within = commits[(commits["t0"] > t0) & (commits["t0"] <= t0 + seconds * 1.0005 + 1e-9)]["n_tokens"].sum()
        count = int(re.search(rf"{label}(?: commits)? (\d+)", caption).group(1))
        assert abs(count - within) <= 1  # the window is printed to 3 significant digits


def test_acceptance_study_gets_a_heatmap_and_break_even_alphas(tmp_path):
    alphas = [0.1, 0.5, 0.9]
    run = sweep(tmp_path, {"acceptance.alpha": alphas, "network.bandwidth": ["100Mbit/s", "1Gbit/s", "10Gbit/s"],
                           "strategy.name": STRATEGIES}, report={"x": "acceptance.alpha", "facet": "network.bandwidth"})
    written = build_report(run)
    assert [f.name for f in written.figures][:2] == ["throughput", "heatmap"]
    found = captions(written.markdown.read_text())
    table = pd.read_parquet(run / "results.parquet")
    rates = table.pivot_table(index=["bandwidth_bps", "alpha"], columns="strategy", values="tokens_per_s")
    speedup = rates["speculative"] / rates["iterative"]
    expected = []
    for bandwidth in sorted(table["bandwidth_bps"].unique()):
        s = speedup.loc[bandwidth].reindex(alphas).to_numpy()
        if (s >= 1).all():
            expected.append("any")
        elif not s[-1] >= 1:
            expected.append("never")
        else:
            i = int(np.where(s < 1)[0][-1])
            expected.append(f"{alphas[i] + (1 - s[i]) / (s[i + 1] - s[i]) * (alphas[i + 1] - alphas[i]):.2f}")
    if set(expected) != {"any"}:
        assert f"speculative needs α ≥ {' / '.join(expected)}" in found["throughput"].lower()
    top = (rates.div(rates["iterative"], axis=0).drop(columns="iterative")).max().max()
    assert f"{top:.2f}x" in found["heatmap"]


def test_predicted_vs_measured_only_when_results_are_there(bandwidth_report, tmp_path):
    run, written, table = bandwidth_report
    assert "validation" not in [f.name for f in written.figures]
    assert load_comparisons(run, table).empty
    measured = table[["config_key", "strategy", "tokens_per_s", "ttft_s"]].copy()
    measured["tokens_per_s"] *= 1.1
    measured.to_csv(tmp_path / "measured-tiny.csv", index=False)
    comparisons = load_comparisons(tmp_path, table)
    assert len(comparisons) == 18 and set(comparisons["metric"]) == {"tokens_per_s", "ttft_s"}
    figure = validation_figure(comparisons, STRATEGIES)
    assert "decode tokens/s is off by 9% on average over 9 runs" in figure.caption
    assert "TTFT (s) is off by 0% on average" in figure.caption
    by_axes = table[["strategy", "network.bandwidth", "tokens_per_s"]].assign(tokens_per_s=lambda f: f["tokens_per_s"] * 2)
    by_axes.to_csv(tmp_path / "measured-tiny.csv", index=False)
    assert "off by 50% on average over 9 runs" in validation_figure(load_comparisons(tmp_path, table), STRATEGIES).caption
    representative = table[table["network.bandwidth"] == "1Gbit/s"]
    executor_lines = representative[["strategy", "tokens_per_s"]].assign(tokens_per_s=lambda f: f["tokens_per_s"] / 2)
    (tmp_path / "measured-tiny.csv").unlink()
    executor_lines.to_json(tmp_path / "measured-executor.jsonl", orient="records", lines=True)
    comparisons = load_comparisons(tmp_path, table, representative)
    assert len(comparisons) == 3 and (comparisons["error"].round(6) == 1.0).all()


def test_validation_csv_long_form(bandwidth_report, tmp_path):
    run, _, _ = bandwidth_report
    folder = tmp_path / "v"
    folder.mkdir()
    for name in ("results.parquet", "results.csv", "sweep.json"):
        (folder / name).write_bytes((run / name).read_bytes())
    pd.DataFrame({"metric": ["tokens_per_s"] * 2, "strategy": ["iterative", "pipeinfer"], "predicted": [1.0, 2.0],
                  "measured": [1.0, 2.5]}).to_csv(folder / "validation.csv", index=False)
    written = build_report(folder)
    caption = [f for f in written.figures if f.name == "validation"][0].caption
    assert "off by 10% on average over 2 runs (worst -20%, PipeInfer)" in caption


def test_a_study_of_strategies_only(tmp_path):
    run = sweep(tmp_path, {"strategy.name": ["iterative", "pipeinfer"]})
    written = build_report(run)
    assert [f.name for f in written.figures] == ["throughput", "itl", "utilization", "timeline"]
    table = pd.read_parquet(run / "results.parquet").set_index("strategy")
    speedup = table.loc["pipeinfer", "tokens_per_s"] / table.loc["iterative", "tokens_per_s"]
    assert f"the largest speedup over iterative is {speedup:.2f}x (PipeInfer)" in written.figures[0].caption


def test_report_command(bandwidth_report, tmp_path, capsys):
    run, _, _ = bandwidth_report
    assert reports_main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "report written" in capsys.readouterr().out
    assert reports_main(["report", str(tmp_path / "missing")]) == 2
    assert "sweep folder not found" in capsys.readouterr().err
