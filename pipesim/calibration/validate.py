"""``pipesim validate``: run the executor and the simulator (with a calibration profile) on the same grid of
configurations and seeds, and write the error table, a parity plot and a timeline comparison.

Predictions per configuration:
- ``predicted``: the simulator with the profile as calibrated (i.i.d. acceptance α);
- ``predicted_replay``: the same driven by the executor's own accept/reject sequence, so its error is the timing
  model's alone; the difference between the two is the acceptance model's share;
- ``predicted_anchored``: the simulator with the profile re-anchored inside the validation job. A shared machine's
  speed drifts (on the 2-core development VM the same stage forward takes 30 ms in one process and 45 ms in
  another a minute later), so the executor job also runs short anchor generations (iterative, and speculative
  when there is a draft) at the start and at the end of every round; each node's compute coefficients are scaled
  by the median ratio of its anchor runs' measured to modelled stage times (1-token runs and longer runs apart)
  and the per-run dispatch is re-derived from the round's median anchor iterative generation. A configuration is
  predicted with the anchors of the round it is measured in. The anchors are not configurations of the grid, and
  only the speed level moves: the profile's shape, the network, the overlap of stages and the acceptance stay as fitted.

Configurations run in ``rounds`` (each round in a rotated order between its anchors), and each configuration's
measurement is its median-throughput round, so slow drift of the machine spreads over all configurations.

Held out (``--calibrate-on iterative,speculative``): the profile must have been fitted on those strategies' runs
only (the probe's measured generations), the anchors are those strategies' alone, and the error on every other
strategy of the grid (PipeInfer, PipeSpec, SPEED) is reported apart as the headline: does a simulator calibrated
on simple runs predict the complex ones? Every configuration also carries the machine's load while it was measured
(CPU steal time and load average over its generation's wall-clock window, ``machine_load``), so an error can be
told from a disturbed machine.
"""

from __future__ import annotations

import copy
import json
import shlex
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cli_args import check_output_dir, int_at_least, positive_float
from ..metrics import compute_metrics, median_by_throughput
from ..scenario import ScenarioError, load_scenario
from ..sim import simulate
from ..trace import Trace, records_from_json
from ..world.profile import HardwareProfile
from ..yamlio import YAMLFileError, read_yaml
from .calibrate import add_residual_overhead
from .machine_load import LoadSampler

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
    rounds: int = 1
    anchor_tokens: int = 32
    strategy_sets: dict[str, list[str]] = field(default_factory=dict)  # extra overrides of one strategy's configs
    calibrate_on: list[str] | None = None  # held-out validation: the strategies calibration may use

    @classmethod
    def load(cls, path: str | Path | None) -> Grid:
        if path is None:
            return cls()
        try:
            data = read_yaml(path, "grid file")
        except YAMLFileError as error:
            raise ScenarioError(str(error)) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ScenarioError(f"{path}: a grid must be a YAML mapping, got a {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ScenarioError(f"{path}: unknown grid field(s) {sorted(unknown)}")
        grid = cls(**data)
        if not isinstance(grid.strategy_sets, dict) or not all(
                isinstance(v, list) for v in grid.strategy_sets.values()):
            raise ScenarioError(f"{path}: strategy_sets must map a strategy to a list of KEY=VALUE overrides, "
                                f"got {grid.strategy_sets!r}")
        for name in ("rounds", "anchor_tokens", "generate_tokens", "seed"):
            value = getattr(grid, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise ScenarioError(f"{path}: {name} must be an integer >= {0 if name == 'seed' else 1}, "
                                    f"got {value!r}")
        for name in ("strategies", "alphas", "bandwidths"):
            value = getattr(grid, name)
            if not isinstance(value, list) or not value:
                raise ScenarioError(f"{path}: {name} must be a non-empty list, got {value!r} "
                                    f"(e.g. {name}: {getattr(cls(), name)})")
        for alpha in grid.alphas:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
                raise ScenarioError(f"{path}: alphas: {alpha!r} is not an acceptance rate in [0, 1]")
        if not isinstance(grid.latency, str | int | float) or isinstance(grid.latency, bool):
            raise ScenarioError(f"{path}: latency must be a time such as 100us, got {grid.latency!r}")
        return grid

    def anchors(self, has_draft: bool) -> list[tuple[str, list[str]]]:
        """Anchor generations of every round: iterative (and speculative with a draft), no link emulation; with
        ``calibrate_on``, only those of its strategies."""
        common = ["executor.link_emulation=false", f"workload.generate_tokens={self.anchor_tokens}"]
        strategies = ["iterative"] + (["speculative"] if has_draft else [])
        if self.calibrate_on is not None:
            strategies = [s for s in strategies if s in self.calibrate_on]
        return [(f"anchor {s}", [f"strategy.name={s}", *common]) for s in strategies]

    def schedule(self, has_draft: bool) -> list[tuple[int, str, list[str]]]:
        """(round, label, overrides) of every executor generation: per round the anchors, the grid rotated, and
        the anchors again (the machine's speed moves within a round too, so anchors bracket it)."""
        grid, anchors = self.variants(), self.anchors(has_draft)
        out = []
        for r in range(self.rounds):
            shift = (r * len(grid)) // self.rounds
            out += [(r, label, sets) for label, sets in anchors]
            out += [(r, label, sets) for label, sets in grid[shift:] + grid[:shift]]
            out += [(r, label, sets) for label, sets in anchors]
        return out

    def held_out(self, strategy: str) -> bool | None:
        """Whether ``strategy``'s configurations are held out from calibration (None: no held-out split)."""
        return None if self.calibrate_on is None else strategy not in self.calibrate_on

    def variants(self) -> list[tuple[str, list[str]]]:
        """(label, scenario overrides) of every configuration."""
        out = []
        for bandwidth in self.bandwidths:
            link = ["executor.link_emulation=true", f"network.bandwidth={bandwidth}", f"network.latency={self.latency}"]
            for strategy in self.strategies:
                for alpha in ([None] if strategy == "iterative" else self.alphas):
                    sets = [f"strategy.name={strategy}", *self.strategy_sets.get(strategy, []), *link]
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
    from ..world.acceptance import AcceptanceModel
    from ..world.build import acceptance_seed

    prompt = int(trace.meta.get("prompt_tokens", scenario.workload.prompt_tokens))
    iid = AcceptanceModel("iid", scenario.acceptance_alpha(), prompt_len=prompt, seed=acceptance_seed(scenario))
    measured = replay_sequence(trace)
    horizon = len(measured) + 64  # speculation may look past the last committed token
    filled = [m if m is not None else int(iid.correct(prompt + i, 0))
              for i, m in enumerate(measured + [None] * (horizon - len(measured)))]
    return ["acceptance.model=replay", f"acceptance.sequence={json.dumps(filled)}"]


def run_executor(scenario: str, ranks: int, sets: list[str], variants: list[tuple[Any, ...]], out: Path,
                 timeout: float, progress: bool = False) -> tuple[list[dict], str]:
    """One executor job running every configuration (models loaded once); returns the saved traces. With
    ``progress``, a bar on stderr counts the generations as the job reports them."""
    from tqdm import tqdm

    from ..executor.launcher import _kill_group

    saved = out / "measured_traces.json"
    command = [sys.executable, "-m", "pipesim.cli", "run", scenario, "--ranks", str(ranks), "--json",
               "--save-trace", str(saved), "--set", "executor.stop_at_eos=false"]  # as many tokens as simulated
    for assignment in sets:
        command += ["--set", assignment]
    for *_, variant in variants:
        command += ["--variant", ";".join(variant)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    timer = threading.Timer(timeout, _kill_group, (process,))
    timer.start()
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)
    reader.start()
    try:
        with LoadSampler() as load, tqdm(total=len(variants), desc="validate: executor generations", unit="run",
                                         file=sys.stderr, disable=not progress) as bar:
            for line in process.stdout:
                if line.startswith("{"):
                    bar.update(1)
            returncode = process.wait()
    finally:
        timer.cancel()
    reader.join(timeout=5)
    if returncode != 0:
        raise ScenarioError(f"executor run failed (exit {returncode}): {''.join(errors).strip()[-500:]}")
    entries = json.loads(saved.read_text())
    for entry in entries:  # the machine's load over each generation's wall-clock window
        window = entry["trace"]["meta"].get("wall_clock")
        entry["machine_load"] = load.figures(*window) if window else load.figures()
    return entries, shlex.join(command)


def validate_profile(profile_path: Path, grid: Grid, out: Path, timeout: float = 3600,
                     progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Executor vs simulator on every configuration of ``grid`` for one profile; returns the tidy error rows."""
    profile = HardwareProfile.load(profile_path)
    scenario_path = profile.meta["scenario"]
    ranks = int(profile.meta["n_ranks"])
    base_sets = [*profile.meta.get("sets", []), f"workload.generate_tokens={grid.generate_tokens}",
                 f"workload.seed={grid.seed}"]
    has_draft = load_scenario(scenario_path, base_sets).models.draft is not None  # one clear error up front
    check_held_out(profile, grid, profile_path)
    schedule = grid.schedule(has_draft)
    saved, command = run_executor(scenario_path, ranks, base_sets, schedule, out, timeout, progress)
    runs: dict[str, list[tuple[int, dict]]] = {}
    for (round_index, label, _), entry in zip(schedule, saved, strict=True):
        runs.setdefault(label, []).append((round_index, entry))
    anchor_labels = {label for label, _ in grid.anchors(has_draft)}
    anchoring, anchored_paths = {}, {}
    for r in range(grid.rounds):
        anchors = [entry for label in anchor_labels for i, entry in runs[label] if i == r]
        anchored_paths[r] = out / f"profile-anchored-round{r}.yaml"
        anchoring[r] = anchor_profile(profile, profile_path, anchors, anchored_paths[r])
    rows, traces = [], {}
    compute = profile.meta.get("compute", "real")
    for label, variant in grid.variants():
        config = f"{compute} {ranks} ranks, {label}"
        round_index, entry = median_by_throughput(runs[label], lambda e: e[1]["metrics"])
        anchored_path = anchored_paths[round_index]
        measured_trace = Trace.from_json(entry["trace"])
        measured = compute_metrics(measured_trace)
        load = entry.get("machine_load") or {}
        load = {key: load.get(key) for key in ("steal_fraction", "busy_fraction", "load1_mean")}
        prompt = int(measured_trace.meta.get("prompt_tokens", 0)) or None
        common = [*base_sets, *variant, "network.profile_links=add",
                  *([f"workload.prompt_tokens={prompt}"] if prompt else [])]
        sets = [*common, f"cluster.profile={profile_path}"]
        scenario = load_scenario(scenario_path, sets)
        sim_trace = simulate(scenario)
        predicted = compute_metrics(sim_trace)
        replayed = predicted
        if scenario.strategy.name != "iterative":
            replayed = compute_metrics(simulate(load_scenario(scenario_path, sets + _replay_overrides(
                measured_trace, scenario))))
        anchored = compute_metrics(simulate(load_scenario(scenario_path, [*common, f"cluster.profile={anchored_path}"])))
        traces[config] = (sim_trace, measured_trace)
        pairs = [(m, measured[m], predicted[m], replayed[m], anchored[m]) for m in METRICS]
        pairs += [(f"node_utilization.{node}", measured["node_utilization"].get(node),
                   predicted["node_utilization"].get(node), replayed["node_utilization"].get(node),
                   anchored["node_utilization"].get(node)) for node in measured_trace.nodes]
        pairs.append(("acceptance_rate", measured["acceptance_rate"], predicted["acceptance_rate"],
                      replayed["acceptance_rate"], anchored["acceptance_rate"]))
        for metric, m_value, p_value, r_value, a_value in pairs:
            if m_value is None or p_value is None:
                continue
            rows.append({"config": config, "metric": metric, "predicted": p_value, "measured": m_value,
                         "rel_error": _rel(p_value, m_value),
                         "predicted_replay": r_value, "rel_error_replay": _rel(r_value, m_value),
                         "predicted_anchored": a_value, "rel_error_anchored": _rel(a_value, m_value),
                         "strategy": scenario.strategy.name, "held_out": grid.held_out(scenario.strategy.name),
                         "steal_fraction": load["steal_fraction"], "busy_fraction": load["busy_fraction"],
                         "load1_mean": load["load1_mean"], "compute": compute, "ranks": ranks,
                         "rounds": len(runs[label]), "round": round_index,
                         "measured_spread": _spread([e for _, e in runs[label]]),
                         "output_matches": measured_trace.output_tokens == sim_trace.output_tokens
                         if compute == "emulated" else entry["trace"]["meta"].get("matches_reference")})
    return pd.DataFrame(rows), {"command": command, "traces": traces, "anchoring": anchoring}


def check_held_out(profile: HardwareProfile, grid: Grid, profile_path: Path) -> None:
    """A held-out validation needs a profile calibrated on ``grid.calibrate_on`` strategies only, and at least one
    held-out strategy in the grid; otherwise one clear error."""
    if grid.calibrate_on is None:
        return
    used = profile.meta.get("calibrated_on")
    if used is None:
        raise ScenarioError(f"{profile_path}: the profile does not record the strategies it was calibrated on "
                            "(calibrated_on); re-run pipesim calibrate")
    outside = sorted(set(used) - set(grid.calibrate_on))
    if outside:
        raise ScenarioError(f"--calibrate-on {','.join(grid.calibrate_on)}: {profile_path} was also calibrated on "
                            f"{','.join(outside)}")
    if not any(grid.held_out(s) for s in grid.strategies):
        raise ScenarioError(f"--calibrate-on {','.join(grid.calibrate_on)}: the grid's strategies "
                            f"{grid.strategies} hold none out")


def _rel(value: float | None, measured: float) -> float:
    return (value - measured) / measured if measured and value is not None else np.nan


def _spread(entries: list[dict]) -> float:
    """(max - min) / median of a configuration's throughput over its rounds: the machine's own noise."""
    values = [e["metrics"].get("tokens_per_s") or 0.0 for e in entries]
    middle = float(np.median(values))
    return (max(values) - min(values)) / middle if middle else np.nan


def anchor_profile(profile: HardwareProfile, profile_path: Path, anchors: list[dict], out: Path) -> dict[str, Any]:
    """Scale each node's compute coefficients to the anchor generations' stage times; re-derive the dispatch.

    Writes the anchored profile to ``out`` and returns the scales (node -> {"single", "multi"}) and the dispatch.
    """
    ratios: dict[tuple[str, bool], list[float]] = {}
    for entry in anchors:
        trace = entry["trace"]
        meta = trace["meta"]
        ranges = meta["layer_ranges"]
        nodes = trace["nodes"]
        prompt = int(meta.get("prompt_tokens", 0))
        context = prompt + int(entry["metrics"].get("generated_tokens") or 0) // 2  # records carry no positions
        records = records_from_json(trace)
        prefills = {r.run_id for r in records if r.kind == "launch" and r.what == "prefill"}
        for r in records:
            if r.kind != "compute" or r.what != "stage" or r.aborted or r.run_id in prefills:
                continue
            t0, t1, where, n_tokens = r.t0, r.t1, r.where, r.n_tokens
            index = nodes.index(where)
            last = index == len(nodes) - 1
            modelled, _ = profile.node(where).stage_time(ranges[index][1] - ranges[index][0], n_tokens, context,
                                                         n_tokens if last else 0)
            if modelled > 0:
                ratios.setdefault((where, n_tokens == 1), []).append((t1 - t0) / modelled)
    anchored = copy.deepcopy(profile)
    scales: dict[str, dict[str, float]] = {}
    for name, node in anchored.nodes.items():
        single = statistics.median(ratios[(name, True)]) if ratios.get((name, True)) else None
        multi = statistics.median(ratios[(name, False)]) if ratios.get((name, False)) else None
        single, multi = single or multi or 1.0, multi or single or 1.0
        scales[name] = {"single": single, "multi": multi}
        if node.layer_single is not None:
            node.layer_single *= single
        else:  # the general form serves 1-token runs too: one scale for both
            single = multi
        if node.head_single is not None:
            node.head_single *= single
        for field_name in ("overhead", "layer_fixed", "layer_per_token", "layer_per_token_context", "head_fixed",
                           "head_per_output"):
            setattr(node, field_name, getattr(node, field_name) * multi)
        node.dispatch = 0.0
    anchored.meta = {**profile.meta, "anchored_from": str(profile_path), "anchor_scales": scales}
    anchored.save(out)
    iteratives = [e for e in anchors if e["trace"]["strategy"] == "iterative"]
    iterative = median_by_throughput(iteratives, lambda e: e["metrics"]) if iteratives else None
    dispatch = {}
    if iterative is not None:
        raw = {"iterative": iterative, "sets": profile.meta.get("sets", []), "scenario": profile.meta["scenario"]}
        dispatch = add_residual_overhead(anchored, raw, out)
        anchored.meta["iterative_check"] = dispatch
        anchored.save(out)
    return {"scales": scales, "dispatch": dispatch}


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Median and worst absolute relative error per metric family (node utilization as absolute error), over all
    configurations (``scope`` all), over each compute mode (real, emulated) apart, and with a held-out split over
    the held-out strategies (``held-out``, and each one), and the calibration strategies apart."""
    scopes = [("all", table)]
    if "compute" in table.columns and table["compute"].nunique() > 1:
        scopes += [(str(mode), part) for mode, part in table.groupby("compute")]
    if "held_out" in table.columns and table["held_out"].notna().any():
        held = table[table["held_out"] == True]  # noqa: E712 - a column of True/False/None
        scopes += [("held-out", held), ("calibration strategies", table[table["held_out"] == False])]  # noqa: E712
        scopes += [(f"held-out {strategy}", part) for strategy, part in held.groupby("strategy")]
    scopes = [(scope, part) for scope, part in scopes if len(part)]
    return pd.concat([_summarize_scope(scope, part) for scope, part in scopes], ignore_index=True)


def _summarize_scope(scope: str, table: pd.DataFrame) -> pd.DataFrame:
    out = []
    for family, part in table.groupby(table["metric"].str.split(".").str[0]):
        absolute = family == "node_utilization"
        row = {"scope": scope, "metric": family, "error": "absolute" if absolute else "relative",
               "configs": part["config"].nunique()}
        for suffix in ("", "_replay", "_anchored"):  # as calibrated, replaying acceptance, anchored in the job
            if absolute:
                err = (part[f"predicted{suffix}"] - part["measured"]).abs()
            else:
                err = part[f"rel_error{suffix}"].abs()
            row[f"median{suffix}"], row[f"worst{suffix}"] = err.median(), err.max()
        out.append(row)
    return pd.DataFrame(out)


COMPUTE_MARKERS = {"real": "o", "emulated": "s"}  # the parity plot's marker per compute mode


def metric_unit_label(metric: str) -> str:
    """The unit of a validated metric, for axis labels."""
    if metric.startswith("node_utilization"):
        return "fraction busy"
    if metric.endswith("per_s"):
        return "tokens/s"
    return "s" if metric.endswith("_s") else ""


def parity_figure(table: pd.DataFrame, path: Path):
    """Predicted against measured, one panel per metric: colour by strategy, marker by compute mode (circles
    real, squares emulated); returns the figure (also saved to ``path``)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from ..reports.figures import new_figure

    metrics = [m for m in METRICS if (table["metric"] == m).any()]
    figure = new_figure(4.0 * len(metrics), 4.0)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    colors = {"iterative": "#636363", "speculative": "#3182bd", "pipeinfer": "#de2d26", "pipespec": "#31a354",
              "speed": "#756bb1"}
    for ax, metric in zip(axes, metrics, strict=True):
        part = table[table["metric"] == metric]
        for (strategy, compute), rows in part.groupby(["strategy", "compute"]):
            ax.scatter(rows["measured"], rows["predicted"], s=22, label=f"{strategy}, {compute}",
                       color=colors.get(strategy), marker=COMPUTE_MARKERS.get(compute, "^"))
        lo = min(part["measured"].min(), part["predicted"].min()) * 0.9
        hi = max(part["measured"].max(), part["predicted"].max()) * 1.1
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="#bbbbbb", alpha=0.3, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # labelled minor ticks of a short log range overlap
            axis.set_minor_formatter(NullFormatter())
        median = part["rel_error"].abs().median()
        unit = metric_unit_label(metric)
        ax.set_title(f"{metric}: median |error| {median:.1%}", fontsize=9)
        ax.set_xlabel(f"measured (executor), {unit}" if unit else "measured (executor)")
        ax.set_ylabel(f"predicted (simulator), {unit}" if unit else "predicted (simulator)")
    strategies = sorted(set(table["strategy"]))
    handles = [Line2D([], [], ls="", marker="o", color=colors.get(s), label=s) for s in strategies]
    handles += [Line2D([], [], ls="", marker=COMPUTE_MARKERS.get(c, "^"), color="black", mfc="none",
                       label=f"{c} compute") for c in sorted(set(table["compute"]))]
    axes[0].legend(handles=handles, fontsize=8)
    figure.savefig(path)
    return figure


def trace_comparison_figure(simulated: Trace, measured: Trace, config: str, path: Path) -> None:
    from ..reports.timeline import timeline_figure

    out = timeline_figure({"simulated": simulated, "measured": measured}, ["simulated", "measured"])
    if out is None:
        return
    out.figure.suptitle(f"{config}: simulated (top) and measured (bottom) timelines", fontsize=10)
    out.figure.savefig(path)


def validate(profiles: list[Path], grid: Grid, out: Path, timeout: float = 3600,
             progress: bool = False) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    tables, commands, traces, anchoring = [], [], {}, {}
    for profile in profiles:
        sub = out / profile.stem
        sub.mkdir(parents=True, exist_ok=True)
        table, info = validate_profile(profile, grid, sub, timeout, progress)
        tables.append(table)
        commands.append(info["command"])
        traces.update(info["traces"])
        anchoring[str(profile)] = info["anchoring"]
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / "validation.csv", index=False)
    summary = summarize(table)
    summary.to_csv(out / "summary.csv", index=False)
    parity_figure(table, out / "parity.png")
    chosen = next((c for c in traces if "pipeinfer" in c and "a=0.6" in c),
                  next((c for c in traces if "pipeinfer" in c), next(iter(traces))))
    trace_comparison_figure(*traces[chosen], chosen, out / "timeline_comparison.png")
    _write_report(out, table, summary, profiles, grid, commands, chosen, anchoring)
    return table


def _write_report(out: Path, table: pd.DataFrame, summary: pd.DataFrame, profiles: list[Path], grid: Grid,
                  commands: list[str], chosen: str, anchoring: dict[str, Any]) -> None:
    overall = summary[summary["scope"] == "all"].set_index("metric")
    tps = overall.loc["tokens_per_s"] if "tokens_per_s" in overall.index else None
    lines = ["# Simulator vs executor: validation", ""]
    lines += _held_out_headline(summary, grid)
    lines += _load_paragraph(table)
    if tps is not None:
        lines += [f"Over {int(tps['configs'])} configurations, the simulator's tokens/s is off by a median "
                  f"{tps['median']:.1%} (worst {tps['worst']:.1%}) with the profile as calibrated and i.i.d. "
                  f"acceptance; by a median {tps['median_replay']:.1%} (worst {tps['worst_replay']:.1%}) when it "
                  "replays the executor's own accept/reject sequence (timing model alone); and by a median "
                  f"{tps['median_anchored']:.1%} (worst {tps['worst_anchored']:.1%}) with the profile re-anchored "
                  "to the anchor generations of the validation job itself (speed level of the machine at the time; "
                  "see below). Anchors for comparison: Vidur claims under 9% latency error, LLMServingSim "
                  "1.9-14.7%.", ""]
    spread = table[table["metric"] == "tokens_per_s"]["measured_spread"]
    lines += ["## Errors by metric", "", _markdown(summary), "",
              "Relative errors are (predicted - measured) / measured; node utilization errors are absolute.", "",
              f"Each configuration ran {grid.rounds} time(s), rounds in rotated order; the measurement is the "
              f"median-throughput round. The spread of a configuration's throughput over its rounds, (max - min) "
              f"/ median, was {spread.median():.1%} in the median (largest {spread.max():.1%}): the machine's own "
              "noise, a floor for any prediction.", "",
              "## Per configuration (tokens/s)", "",
              _markdown(table[table["metric"] == "tokens_per_s"][
                  ["config", *(["held_out"] if grid.calibrate_on is not None else []), "measured", "measured_spread",
                   "predicted", "rel_error", "predicted_replay", "rel_error_replay", "predicted_anchored",
                   "rel_error_anchored", "steal_fraction", "load1_mean", "output_matches"]]), "",
              "`steal_fraction`: CPU time the hypervisor took from this machine during the configuration's "
              "generation (/proc/stat); `load1_mean`: the 1-minute load average over it.", "",
              "## Anchoring", "",
              "`predicted_anchored` uses the profile scaled, per node, by the median ratio of measured to modelled "
              "stage time over the anchor generations that ran in the same job as the grid (1-token runs and longer "
              "runs apart) in the same round as the configuration's measurement, with the per-run dispatch "
              "re-derived from the anchor iterative generation; the profiles are saved beside the measured traces "
              "as `profile-anchored-round<r>.yaml`. Scales:", ""]
    for profile, rounds in anchoring.items():
        for r, info in rounds.items():
            scales = ", ".join(f"{node} x{s['single']:.2f} (1 token) x{s['multi']:.2f} (more)"
                               for node, s in info["scales"].items())
            lines += [f"- `{profile}`, round {r}: {scales}"]
    lines += ["",
              "![parity](parity.png)", "",
              f"![timelines](timeline_comparison.png)  \nTimelines of `{chosen}`.", "",
              "## How this was made", "", "Profiles: " + ", ".join(f"`{p}`" for p in profiles), "",
              f"Grid: `{json.dumps(vars(grid))}`", "", "Executor commands:", ""]
    lines += [f"    {c}" for c in commands]
    (out / "validation.md").write_text("\n".join(lines) + "\n")


def _held_out_headline(summary: pd.DataFrame, grid: Grid) -> list[str]:
    """The held-out paragraph (first in the report): error on the strategies calibration never saw."""
    if grid.calibrate_on is None:
        return []
    rows = summary.set_index(["scope", "metric"])
    if ("held-out", "tokens_per_s") not in rows.index:
        return []
    held = rows.loc[("held-out", "tokens_per_s")]
    lines = [f"**Held out.** Calibrated on {', '.join(grid.calibrate_on)} runs only, the simulator predicts the "
             f"tokens/s of the strategies it never saw ({int(held['configs'])} configurations) with a median "
             f"error of {held['median']:.1%} (worst {held['worst']:.1%}) as calibrated, "
             f"{held['median_anchored']:.1%} (worst {held['worst_anchored']:.1%}) re-anchored on the same "
             "strategies' anchor runs in the job."]
    for scope in [s for s in summary["scope"].unique() if s.startswith("held-out ")]:
        part = rows.loc[(scope, "tokens_per_s")]
        util = rows.loc[(scope, "node_utilization")] if (scope, "node_utilization") in rows.index else None
        lines[-1] += (f" {scope[len('held-out '):]}: median {part['median']:.1%}, worst {part['worst']:.1%}"
                      + (f", node utilization within {util['worst']:.3f}" if util is not None else "") + ";")
    if ("calibration strategies", "tokens_per_s") in rows.index:
        cal = rows.loc[("calibration strategies", "tokens_per_s")]
        lines[-1] += (f" the calibration strategies themselves: median {cal['median']:.1%} "
                      f"(worst {cal['worst']:.1%}).")
    return [*lines, ""]


def _load_paragraph(table: pd.DataFrame) -> list[str]:
    """How disturbed the machine was while the configurations were measured."""
    part = table[table["metric"] == "tokens_per_s"]
    if "steal_fraction" not in part or part["steal_fraction"].isna().all():
        return ["The machine's load was not observed (no /proc).", ""]
    steal, load = part["steal_fraction"].astype(float), part["load1_mean"].astype(float)
    return [f"Machine load while measured: CPU steal time a median {steal.median():.1%} of CPU time (largest "
            f"{steal.max():.1%}), 1-minute load average a median {load.median():.1f} (largest {load.max():.1f}) "
            "per configuration; see the per-configuration table.", ""]


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
    if args.tokens is not None:
        grid.generate_tokens = args.tokens
    if args.calibrate_on is not None:
        from ..scenario import STRATEGY_NAMES

        grid.calibrate_on = [s.strip() for s in args.calibrate_on.split(",") if s.strip()]
        unknown = [s for s in grid.calibrate_on if s not in STRATEGY_NAMES]
        if unknown or not grid.calibrate_on:
            raise ScenarioError(f"--calibrate-on {args.calibrate_on!r}: unknown strategy {','.join(unknown) or '(none)'}"
                                f" (choose from {', '.join(STRATEGY_NAMES)})")
    if args.rounds is not None:
        if args.rounds < 1:
            raise ScenarioError(f"--rounds must be >= 1, got {args.rounds}")
        grid.rounds = args.rounds
    table = validate([Path(p) for p in args.profile], grid, Path(args.out), args.timeout, progress=not args.quiet)
    summary = summarize(table)
    print(f"validation of {table['config'].nunique()} configurations written to {args.out}/validation.csv")
    for row in summary.itertuples(index=False):
        print(f"  {row.scope} {row.metric}: median |error| {row.median:.3g} (worst {row.worst:.3g}) {row.error}; "
              f"replaying measured acceptance: median {row.median_replay:.3g}; re-anchored in the job: median "
              f"{row.median_anchored:.3g} (worst {row.worst_anchored:.3g})")
    return 0


def _builtin_grid_summary() -> str:
    grid = Grid()
    return (f"strategies {', '.join(grid.strategies)} x alpha {', '.join(map(str, grid.alphas))} x bandwidth "
            f"{', '.join(grid.bandwidths)}, latency {grid.latency}, {grid.generate_tokens} tokens, "
            f"{grid.rounds} round")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate", help="run executor and simulator on the same configurations and report the simulator's error",
        description="For a grid of configurations (strategies x oracle alpha x emulated link bandwidth), run the "
                    "executor on the profile's scenario and ranks, simulate the same with the profile, and write "
                    "validation.csv (config, metric, predicted, measured, rel_error), a summary, a parity plot and "
                    "a simulated-vs-measured timeline into --out.")
    parser.add_argument("profile", nargs="+", metavar="PROFILE", help="hardware profile(s) from `pipesim calibrate`")
    parser.add_argument("--grid", metavar="FILE",
                        help="YAML with strategies, alphas, bandwidths, latency, generate_tokens, rounds, seed "
                             f"(default: the built-in grid, {_builtin_grid_summary()})")
    parser.add_argument("--tokens", type=int_at_least(1), metavar="N",
                        help="override the grid's generate_tokens (default: the grid's)")
    parser.add_argument("--rounds", type=int_at_least(1), metavar="N",
                        help="override the grid's rounds (each configuration runs this often, rotated order; the "
                             "median-throughput round counts) (default: the grid's)")
    parser.add_argument("--out", default="runs/validation", metavar="DIR", type=check_output_dir, help="output folder")
    parser.add_argument("--calibrate-on", metavar="S1,S2",
                        help="held-out validation: calibration (the profile, the anchors) used only these strategies' "
                             "runs; the error on the grid's other strategies is reported apart as the headline "
                             "(e.g. iterative,speculative)")
    parser.add_argument("--timeout", type=positive_float, default=3600, metavar="SECONDS",
                        help="bound on each executor job")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=_cmd_validate)
