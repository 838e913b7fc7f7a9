"""``pipesim validate``: run the executor and the simulator (with a calibration profile) on the same grid of
configurations and seeds, and write the error table, a parity plot and a timeline comparison.

Two predictions per configuration:
- ``predicted``: the simulator as a user would run it (i.i.d. acceptance α);
- ``predicted_replay``: the simulator driven by the executor's own accept/reject sequence, so its error is the
  timing model's alone; the difference between the two is the acceptance model's share.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..metrics import compute_metrics
from ..scenario import ScenarioError, load_scenario
from ..sim import simulate
from ..trace import Trace
from .profile import HardwareProfile

METRICS = ("tokens_per_s", "ttft_s", "itl_p50_s", "itl_p99_s")


@dataclass
class Grid:
    """Configurations to validate: strategies x α x emulated bandwidth (iterative once per bandwidth)."""

    strategies: list[str] = field(default_factory=lambda: ["iterative", "speculative", "pipeinfer"])
    alphas: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    bandwidths: list[str] = field(default_factory=lambda: ["1Gbit/s", "100Mbit/s"])
    latency: str = "100us"
    generate_tokens: int = 48
    seed: int = 0

    @classmethod
    def load(cls, path: str | Path | None) -> Grid:
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ScenarioError(f"{path}: unknown grid field(s) {sorted(unknown)}")
        return cls(**data)

    def variants(self) -> list[tuple[str, list[str]]]:
        """(label, scenario overrides) of every configuration."""
        out = []
        for bandwidth in self.bandwidths:
            link = ["executor.link_emulation=true", f"network.bandwidth={bandwidth}", f"network.latency={self.latency}"]
            for strategy in self.strategies:
                for alpha in ([None] if strategy == "iterative" else self.alphas):
                    sets = [f"strategy.name={strategy}", *link]
                    label = f"{strategy} bw={bandwidth}"
                    if alpha is not None:
                        sets.append(f"acceptance.alpha={alpha}")
                        label += f" a={alpha}"
                    out.append((label, sets))
        return out


def replay_sequence(trace: Trace) -> list[int | None]:
    """Per generated position, whether the draft was right (1), wrong (0) or never checked (None).

    Each commit holds its accepted drafted tokens first; when it checked more than it accepted, the position right
    after them held a rejected draft (its token is the target's correction).
    """
    sequence: list[int | None] = []
    for r in trace.records:
        if r.kind != "tokens" or not r.n_tokens:
            continue
        marks: list[int | None] = [1] * r.accepted
        if r.checked > r.accepted:
            marks.append(0)
        marks += [None] * (r.n_tokens - len(marks))
        sequence.extend(marks[: r.n_tokens])
    return sequence


def _replay_overrides(trace: Trace, scenario) -> list[str]:
    """Acceptance overrides that replay the measured sequence; unchecked positions keep the i.i.d. draw."""
    from ..sim.acceptance import AcceptanceModel

    acc, workload = scenario.acceptance, scenario.workload
    prompt = int(trace.meta.get("prompt_tokens", workload.prompt_tokens))
    iid = AcceptanceModel("iid", acc.alpha, prompt_len=prompt, seed=acc.seed + 7919 * workload.seed)
    measured = replay_sequence(trace)
    horizon = len(measured) + 64  # speculation may look past the last committed token
    filled = [m if m is not None else int(iid.correct(prompt + i, 0))
              for i, m in enumerate(measured + [None] * (horizon - len(measured)))]
    return ["acceptance.model=replay", f"acceptance.sequence={json.dumps(filled)}"]


def run_executor(scenario: str, ranks: int, sets: list[str], variants: list[tuple[str, list[str]]], out: Path,
                 timeout: float) -> tuple[list[dict], str]:
    """One executor job running every configuration (models loaded once); returns the saved traces."""
    saved = out / "measured_traces.json"
    command = [sys.executable, "-m", "pipesim.cli", "run", scenario, "--ranks", str(ranks),
               "--save-trace", str(saved)]
    for assignment in sets:
        command += ["--set", assignment]
    for _, variant in variants:
        command += ["--variant", ";".join(variant)]
    result = subprocess.run(command, timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise ScenarioError(f"executor run failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return json.loads(saved.read_text()), shlex.join(command)


def validate_profile(profile_path: Path, grid: Grid, out: Path, timeout: float = 3600) -> tuple[pd.DataFrame, dict]:
    """Executor vs simulator on every configuration of ``grid`` for one profile; returns the tidy error rows."""
    profile = HardwareProfile.load(profile_path)
    scenario_path = profile.meta["scenario"]
    ranks = int(profile.meta["n_ranks"])
    base_sets = [*profile.meta.get("sets", []), f"workload.generate_tokens={grid.generate_tokens}",
                 f"workload.seed={grid.seed}"]
    variants = grid.variants()
    load_scenario(scenario_path, base_sets)  # one clear error before the job starts
    saved, command = run_executor(scenario_path, ranks, base_sets, variants, out, timeout)
    rows, traces = [], {}
    compute = profile.meta.get("compute", "real")
    for (label, variant), entry in zip(variants, saved, strict=True):
        config = f"{compute} {ranks} ranks, {label}"
        measured_trace = Trace.from_json(entry["trace"])
        measured = compute_metrics(measured_trace)
        prompt = int(measured_trace.meta.get("prompt_tokens", 0)) or None
        sets = [*base_sets, *variant, f"cluster.profile={profile_path}", "network.profile_links=add",
                *([f"workload.prompt_tokens={prompt}"] if prompt else [])]
        scenario = load_scenario(scenario_path, sets)
        sim_trace = simulate(scenario)
        predicted = compute_metrics(sim_trace)
        replayed = predicted
        if scenario.strategy.name != "iterative":
            replayed = compute_metrics(simulate(load_scenario(scenario_path, sets + _replay_overrides(
                measured_trace, scenario))))
        traces[config] = (sim_trace, measured_trace)
        pairs = [(m, measured[m], predicted[m], replayed[m]) for m in METRICS]
        pairs += [(f"node_utilization.{node}", measured["node_utilization"].get(node),
                   predicted["node_utilization"].get(node), replayed["node_utilization"].get(node))
                  for node in measured_trace.nodes]
        pairs.append(("acceptance_rate", measured["acceptance_rate"], predicted["acceptance_rate"],
                      replayed["acceptance_rate"]))
        for metric, m_value, p_value, r_value in pairs:
            if m_value is None or p_value is None:
                continue
            rows.append({"config": config, "metric": metric, "predicted": p_value, "measured": m_value,
                         "rel_error": (p_value - m_value) / m_value if m_value else np.nan,
                         "predicted_replay": r_value,
                         "rel_error_replay": (r_value - m_value) / m_value if m_value and r_value is not None
                         else np.nan,
                         "strategy": scenario.strategy.name, "compute": compute, "ranks": ranks,
                         "output_matches": measured_trace.output_tokens == sim_trace.output_tokens
                         if compute == "emulated" else entry["trace"]["meta"].get("matches_reference")})
    return pd.DataFrame(rows), {"command": command, "traces": traces}


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Median and worst absolute relative error per metric family (node utilization as absolute error)."""
    out = []
    for family, part in table.groupby(table["metric"].str.split(".").str[0]):
        if family == "node_utilization":
            err = (part["predicted"] - part["measured"]).abs()
            err_replay = (part["predicted_replay"] - part["measured"]).abs()
            unit = "absolute"
        else:
            err, err_replay, unit = part["rel_error"].abs(), part["rel_error_replay"].abs(), "relative"
        out.append({"metric": family, "error": unit, "configs": part["config"].nunique(),
                    "median": err.median(), "worst": err.max(), "median_replay": err_replay.median(),
                    "worst_replay": err_replay.max()})
    return pd.DataFrame(out)


def parity_figure(table: pd.DataFrame, path: Path) -> None:
    from ..reports.figures import new_figure

    metrics = [m for m in METRICS if (table["metric"] == m).any()]
    figure = new_figure(4.0 * len(metrics), 4.0)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    colors = {"iterative": "#636363", "speculative": "#3182bd", "pipeinfer": "#de2d26"}
    for ax, metric in zip(axes, metrics, strict=True):
        part = table[table["metric"] == metric]
        for strategy, rows in part.groupby("strategy"):
            ax.scatter(rows["measured"], rows["predicted"], s=22, label=strategy, color=colors.get(strategy),
                       marker="o" if (rows["compute"] == "real").all() else "s")
        lo = min(part["measured"].min(), part["predicted"].min()) * 0.9
        hi = max(part["measured"].max(), part["predicted"].max()) * 1.1
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="#bbbbbb", alpha=0.3, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        median = part["rel_error"].abs().median()
        ax.set_title(f"{metric}: median |error| {median:.1%}", fontsize=9)
        ax.set_xlabel("measured (executor)")
        ax.set_ylabel("predicted (simulator)")
    axes[0].legend(fontsize=8, title="circles: real compute; squares: emulated", title_fontsize=7)
    figure.savefig(path)


def trace_comparison_figure(simulated: Trace, measured: Trace, config: str, path: Path) -> None:
    from ..reports.timeline import timeline_figure

    out = timeline_figure({"simulated": simulated, "measured": measured}, ["simulated", "measured"])
    if out is None:
        return
    out.figure.suptitle(f"{config}: simulated (top) and measured (bottom) timelines", fontsize=10)
    out.figure.savefig(path)


def validate(profiles: list[Path], grid: Grid, out: Path, timeout: float = 3600) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    tables, commands, traces = [], [], {}
    for profile in profiles:
        sub = out / profile.stem
        sub.mkdir(parents=True, exist_ok=True)
        table, info = validate_profile(profile, grid, sub, timeout)
        tables.append(table)
        commands.append(info["command"])
        traces.update(info["traces"])
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / "validation.csv", index=False)
    summary = summarize(table)
    summary.to_csv(out / "summary.csv", index=False)
    parity_figure(table, out / "parity.png")
    chosen = next((c for c in traces if "pipeinfer" in c and "a=0.6" in c), next(iter(traces)))
    trace_comparison_figure(*traces[chosen], chosen, out / "timeline_comparison.png")
    _write_report(out, table, summary, profiles, grid, commands, chosen)
    return table


def _write_report(out: Path, table: pd.DataFrame, summary: pd.DataFrame, profiles: list[Path], grid: Grid,
                  commands: list[str], chosen: str) -> None:
    tps = summary.set_index("metric").loc["tokens_per_s"] if "tokens_per_s" in set(summary["metric"]) else None
    lines = ["# Simulator vs executor: validation", ""]
    if tps is not None:
        lines += [f"Over {int(tps['configs'])} configurations, the simulator's tokens/s is off by a median "
                  f"{tps['median']:.1%} (worst {tps['worst']:.1%}) with i.i.d. acceptance, and by a median "
                  f"{tps['median_replay']:.1%} (worst {tps['worst_replay']:.1%}) when it replays the executor's "
                  "own accept/reject sequence (timing model alone). Anchors: Vidur claims under 9% latency error, "
                  "LLMServingSim 1.9-14.7%.", ""]
    lines += ["## Errors by metric", "", _markdown(summary), "",
              "Relative errors are (predicted - measured) / measured; node utilization errors are absolute.", "",
              "## Per configuration (tokens/s)", "",
              _markdown(table[table["metric"] == "tokens_per_s"][
                  ["config", "measured", "predicted", "rel_error", "predicted_replay", "rel_error_replay",
                   "output_matches"]]), "",
              "![parity](parity.png)", "",
              f"![timelines](timeline_comparison.png)  \nTimelines of `{chosen}`.", "",
              "## How this was made", "", "Profiles: " + ", ".join(f"`{p}`" for p in profiles), "",
              f"Grid: `{json.dumps(vars(grid))}`", "", "Executor commands:", ""]
    lines += [f"    {c}" for c in commands]
    (out / "validation.md").write_text("\n".join(lines) + "\n")


def _markdown(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cmd_validate(args) -> int:
    grid = Grid.load(args.grid)
    if args.tokens:
        grid.generate_tokens = args.tokens
    table = validate([Path(p) for p in args.profile], grid, Path(args.out), args.timeout)
    summary = summarize(table)
    print(f"validation of {table['config'].nunique()} configurations written to {args.out}/validation.csv")
    for row in summary.itertuples(index=False):
        print(f"  {row.metric}: median |error| {row.median:.3g} (worst {row.worst:.3g}) {row.error}; "
              f"replaying measured acceptance: median {row.median_replay:.3g}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate", help="run executor and simulator on the same configurations and report the simulator's error",
        description="For a grid of configurations (strategies x oracle alpha x emulated link bandwidth), run the "
                    "executor on the profile's scenario and ranks, simulate the same with the profile, and write "
                    "validation.csv (config, metric, predicted, measured, rel_error), a summary, a parity plot and "
                    "a simulated-vs-measured timeline into --out.")
    parser.add_argument("profile", nargs="+", help="hardware profile(s) from `pipesim calibrate`")
    parser.add_argument("--grid", help="YAML with strategies, alphas, bandwidths, latency, generate_tokens, seed")
    parser.add_argument("--tokens", type=int, help="override the grid's generate_tokens")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--timeout", type=float, default=3600, help="bound on each executor job, seconds")
    parser.set_defaults(func=_cmd_validate)
