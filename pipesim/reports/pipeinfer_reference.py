"""The kept report on PipeInfer as its reference code runs it: ``python -m pipesim.reports.pipeinfer_reference``.

It simulates two shipped studies point by point (``scenarios/studies/pipeinfer-reference.yaml``: reference and
continuous PipeInfer, speculative and iterative over bandwidth and alpha; ``pipeinfer-ablation.yaml``: each
departure from the reference code turned on alone from the continuous variant and off alone from the reference)
and writes ``results.csv``, ``ablation.csv``, a timeline figure and ``report.md`` into ``reports/pipeinfer-reference``.
Every sentence with a number is computed from those tables; every number is simulated.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..metrics import compute_metrics
from ..sim import simulate
from .study import load_study
from .timeline import timeline_figure

ROOT = Path(__file__).resolve().parents[2]
MAIN_STUDY = "scenarios/studies/pipeinfer-reference.yaml"
ABLATION_STUDY = "scenarios/studies/pipeinfer-ablation.yaml"
OUT = "reports/pipeinfer-reference"
KEPT = ("tokens_per_s", "reference_decode_tokens_per_s", "ttft_s", "acceptance_rate", "runs_launched",
        "runs_cancelled", "wasted_compute_fraction", "wall_s")
SWITCHES = ("run pattern", "head priority", "synchronous prefill", "full cancelled traffic", "relayed KV transactions")
ON = {"run pattern": "continuous + reference run pattern", "head priority": "continuous + whole-run head priority",
      "synchronous prefill": "continuous + synchronous prefill",
      "full cancelled traffic": "continuous + full cancelled traffic",
      "relayed KV transactions": "continuous + relayed KV transactions"}
OFF = {"run pattern": "reference - its run pattern", "head priority": "reference - its head priority",
       "synchronous prefill": "reference - synchronous prefill",
       "full cancelled traffic": "reference - full cancelled traffic",
       "relayed KV transactions": "reference - relayed KV transactions"}


def _row(point, metrics: dict) -> dict:
    links = metrics["link_utilization"]
    busiest = max(links, key=links.get) if links else ""
    return {"point": point.index, **point.labels, **{key: metrics[key] for key in KEPT},
            "busiest_link": busiest, "busiest_link_utilization": links.get(busiest, 0.0)}


def simulate_study(path: str | Path, traces: dict | None = None, keep: dict | None = None) -> pd.DataFrame:
    """Every point of a study simulated; ``keep`` ({labels subset: name}) puts those points' traces in ``traces``."""
    rows = []
    for point in load_study(path).iter_points():
        trace = simulate(point.scenario)
        rows.append(_row(point, compute_metrics(trace)))
        for name, labels in (keep or {}).items():
            if all(point.labels.get(k) == v for k, v in labels.items()):
                traces[name] = trace
    return pd.DataFrame(rows)


def _v(frame: pd.DataFrame, column: str = "tokens_per_s", **labels) -> float:
    mask = pd.Series(True, index=frame.index)
    for key, value in labels.items():
        mask &= frame[key.replace("_", ".") if key in ("network_bandwidth", "acceptance_alpha") else key] == value
    values = frame.loc[mask, column]
    if len(values) != 1:
        raise ValueError(f"{labels} selects {len(values)} rows, not 1")
    return float(values.iloc[0])


def _g(value: float) -> str:
    return f"{value:.3g}"


def main_findings(main: pd.DataFrame) -> list[str]:
    """Sentences computed from the main table."""
    at = {"network_bandwidth": "1Gbit/s", "acceptance_alpha": "0.9"}
    ref, cont = _v(main, variant="pipeinfer-reference", **at), _v(main, variant="pipeinfer-continuous", **at)
    spec, it = _v(main, variant="speculative", **at), _v(main, variant="iterative", **at)
    lines = [f"At 1 Gbit/s and alpha 0.9, reference PipeInfer decodes {_g(ref)} tok/s: {ref / it:.2f}x iterative "
             f"and {ref / spec:.2f}x speculative; the continuous variant decodes {_g(cont)} tok/s, "
             f"{cont / ref:.2f}x the reference."]
    grid = [(b, a) for b in main["network.bandwidth"].unique() for a in main["acceptance.alpha"].unique()]

    def wins(first: str, second: str) -> int:
        return sum(1 for b, a in grid if _v(main, variant=first, network_bandwidth=b, acceptance_alpha=a)
                   > _v(main, variant=second, network_bandwidth=b, acceptance_alpha=a))

    lines.append(f"Reference PipeInfer beats speculative at {wins('pipeinfer-reference', 'speculative')} of "
                 f"{len(grid)} (bandwidth, alpha) points, the continuous variant at "
                 f"{wins('pipeinfer-continuous', 'speculative')}; the continuous variant beats the reference at "
                 f"{wins('pipeinfer-continuous', 'pipeinfer-reference')} of {len(grid)}.")
    return lines


def ablation_table(ablation: pd.DataFrame) -> list[str]:
    """Markdown rows: each switch on alone from continuous, off alone from the reference, at both bandwidths."""
    rows = ["| departure | bandwidth | continuous + it (tok/s) | vs continuous | reference without it (tok/s) "
            "| vs reference |", "|---|---|---|---|---|---|"]
    for bandwidth in ablation["network.bandwidth"].unique():
        cont = _v(ablation, variant="continuous", network_bandwidth=bandwidth)
        ref = _v(ablation, variant="reference", network_bandwidth=bandwidth)
        for switch in SWITCHES:
            on = _v(ablation, variant=ON[switch], network_bandwidth=bandwidth)
            off = _v(ablation, variant=OFF[switch], network_bandwidth=bandwidth)
            rows.append(f"| {switch} | {bandwidth} | {_g(on)} | {on / cont - 1:+.0%} | {_g(off)} | {off / ref - 1:+.0%} |")
    return rows


def ablation_findings(ablation: pd.DataFrame) -> list[str]:
    lines = []
    for bandwidth in ablation["network.bandwidth"].unique():
        ref = _v(ablation, variant="reference", network_bandwidth=bandwidth)
        gains = {s: _v(ablation, variant=OFF[s], network_bandwidth=bandwidth) / ref for s in SWITCHES}
        costs = {s: _v(ablation, variant=ON[s], network_bandwidth=bandwidth)
                 / _v(ablation, variant="continuous", network_bandwidth=bandwidth) for s in SWITCHES}
        best = max(gains, key=gains.get)
        worst = min(costs, key=costs.get)
        lines.append(f"At {bandwidth}, removing the {best} from the reference helps most ({gains[best]:.2f}x its "
                     f"{_g(ref)} tok/s); adding the {worst} alone to the continuous variant costs the most "
                     f"({costs[worst]:.2f}x its tok/s).")
    return lines


def slow_link_findings(ablation: pd.DataFrame) -> list[str]:
    """What happens at 10 Mbit/s, and why (from the ablation table's counters)."""
    b = "10Mbit/s"
    if b not in set(ablation["network.bandwidth"]):
        return []
    ref = ablation[(ablation["variant"] == "reference") & (ablation["network.bandwidth"] == b)].iloc[0]
    header = ablation[(ablation["variant"] == OFF["full cancelled traffic"])
                      & (ablation["network.bandwidth"] == b)].iloc[0]
    return [f"At 10 Mbit/s the reference decodes {_g(ref['tokens_per_s'])} tok/s: its busiest link "
            f"({ref['busiest_link']}) is busy {ref['busiest_link_utilization']:.0%} of the time and it launches "
            f"{int(ref['runs_launched'])} runs, cancelling {int(ref['runs_cancelled'])}. A cancelled run still "
            f"carries its activations on and returns its full logits, so the return link fills with results nobody "
            f"reads; sending cancelled runs as headers instead gives {_g(header['tokens_per_s'])} tok/s, "
            f"{int(header['runs_launched'])} runs launched, busiest link {header['busiest_link_utilization']:.0%}."]


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    variants = list(dict.fromkeys(frame["variant"]))
    columns = [(b, a) for b in dict.fromkeys(frame["network.bandwidth"]) for a in dict.fromkeys(frame["acceptance.alpha"])]
    rows = ["| tokens/s | " + " | ".join(f"{b}, α {a}" for b, a in columns) + " |",
            "|---|" + "---|" * len(columns)]
    for variant in variants:
        rows.append(f"| {variant} | " + " | ".join(
            _g(_v(frame, variant=variant, network_bandwidth=b, acceptance_alpha=a)) for b, a in columns) + " |")
    return rows


def build(out: Path) -> list[str]:
    """Simulate both studies and write the report folder; returns the findings."""
    out.mkdir(parents=True, exist_ok=True)
    traces: dict = {}
    keep = {"pipeinfer-reference": {"variant": "pipeinfer-reference", "network.bandwidth": "1Gbit/s",
                                    "acceptance.alpha": "0.9"},
            "pipeinfer-continuous": {"variant": "pipeinfer-continuous", "network.bandwidth": "1Gbit/s",
                                     "acceptance.alpha": "0.9"}}
    main = simulate_study(ROOT / MAIN_STUDY, traces, keep)
    ablation = simulate_study(ROOT / ABLATION_STUDY)
    main.to_csv(out / "results.csv", index=False)
    ablation.to_csv(out / "ablation.csv", index=False)
    findings = main_findings(main) + ablation_findings(ablation) + slow_link_findings(ablation)
    figure = timeline_figure(traces, ["pipeinfer-reference", "pipeinfer-continuous"])
    lines = ["# PipeInfer as its reference code runs it", "",
             "Simulated (pipesim's simulator; every number below is simulated, none measured) on the PipeInfer "
             "paper's 8-node CPU cluster as its script runs it: 7 target nodes and the draft on a node of its own "
             "(`scenarios/paper-8node-cpu-draft-node.yaml`, 48 generated tokens). The reference "
             "variant follows AutonomicPerfectionist/PipeInfer `examples/speculative/speculative.cpp` (run pattern, "
             "head priority, synchronous prefill), `ggml-mpi.c`/`llama.cpp` (cancelled runs' traffic, relayed "
             "`seq_rm`/`seq_cp` transactions at an assumed `cluster.kv_transaction_time` of 10 us); the "
             "continuous variant is pipesim's earlier model. Regenerate: `python -m pipesim.reports.pipeinfer_reference`.",
             "", "## Findings", "", *[f"- {line}" for line in findings], "",
             "## Throughput (tokens/s after the first token)", "", *_markdown_table(main), "",
             "## Ablation: each departure alone (alpha 0.9)", "", *ablation_table(ablation), ""]
    if figure is not None:
        buffer = io.BytesIO()
        figure.figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
        (out / "timeline.png").write_bytes(buffer.getvalue())
        lines += ["## Timeline at 1 Gbit/s, alpha 0.9", "", "![timeline](timeline.png)", "",
                  f"*{figure.caption}*", ""]
    lines += ["Tables: `results.csv` (studies `scenarios/studies/pipeinfer-reference.yaml`) and `ablation.csv` "
              "(`scenarios/studies/pipeinfer-ablation.yaml`).", ""]
    (out / "report.md").write_text("\n".join(lines))
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipesim.reports.pipeinfer_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT, help="report folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for line in build(Path(args.out)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
