"""What a scenario describes, in a few lines, and the unit of every metric: the header of ``simulate`` and ``run``."""

from __future__ import annotations

import sys
from typing import Any

from .scenario import Scenario
from .units import format_bandwidth

# metric -> unit (shown beside the value); keys ending in _s are seconds unless listed
UNITS: dict[str, str] = {
    "generated_tokens": "tokens",
    "tokens_per_s": "tokens/s, decode rate after the first token",
    "e2e_tokens_per_s": "tokens/s, generated tokens / wall_s",
    "ttft_s": "s, time to first token",
    "itl_mean_s": "s, inter-token latency",
    "itl_p50_s": "s",
    "itl_p99_s": "s",
    "acceptance_rate": "drafted tokens accepted / checked",
    "drafted_checked": "tokens",
    "drafted_accepted": "tokens",
    "mean_tokens_per_commit": "tokens",
    "node_utilization": "fraction of wall_s busy",
    "link_utilization": "fraction of wall_s busy",
    "wasted_compute_fraction": "of target compute, on invalidated runs",
    "runs_launched": "runs (a run: tokens through the pipeline)",
    "runs_speculative": "runs",
    "runs_invalidated": "runs",
    "runs_cancelled": "runs",
    "stage_work_skipped": "stage runs",
    "stage_work_aborted": "stage runs",
    "wall_s": "s, start to last token",
    "reference_ttft_s": "s, PipeInfer's code: first token to second",
    "reference_decode_tokens_per_s": "tokens/s, PipeInfer's code: all tokens / time since the first",
    "ms_per_token": "ms, PipeSpec's paper: whole request / tokens",
}


def metric_unit(key: str, simulated: bool) -> str:
    """The unit label of a metric; times say whether they are simulated or measured."""
    unit = UNITS.get(key, "s" if key.endswith("_s") else "")
    if unit.startswith("s") and (key.endswith("_s") and not key.endswith("per_s")):
        unit = unit.replace("s", "s " + ("simulated" if simulated else "measured"), 1)
    return unit


def _si(value: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(value: float) -> str:
    if value == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def describe_scenario(scenario: Scenario) -> list[str]:
    """A few lines: description, models, nodes, network, strategy and acceptance, workload."""
    m, c, n, a, w, s = (scenario.models, scenario.cluster, scenario.network, scenario.acceptance,
                        scenario.workload, scenario.strategy)
    lines = []
    if scenario.description:
        lines.append(f"  {scenario.description.strip()}")
    models = f"{m.target} ({m.target_quantization or 'f16'})"
    if m.chain:
        models += ", chain " + " -> ".join(m.chain)
    elif m.draft:
        models += f", draft {m.draft} ({m.draft_quantization or 'f16'})"
    lines.append(f"  models:     target {models}")
    if c.profile:
        nodes = f"{c.count} nodes, costs from the calibrated profile {c.profile}"
    else:
        nodes = (f"{c.count} nodes, {_si(c.flops, 'FLOP/s')}, {_si(c.memory_bandwidth, 'B/s')} memory, "
                 f"{_seconds(c.overhead_per_run)} per run each (not calibrated)")
        if c.overrides:
            nodes += f", {len(c.overrides)} overridden"
    lines.append(f"  nodes:      {nodes}")
    links = f", {len(n.links)} links overridden" if n.links else ""
    lines.append(f"  network:    {format_bandwidth(n.bandwidth)}, {_seconds(n.latency)} latency{links}")
    params = ", ".join(f"{k}={v}" for k, v in s.params().items() if v is not None)
    lines.append(f"  strategy:   {s.name}" + (f" ({params})" if params else ""))
    alpha: Any = a.alpha
    if a.model == "positional" and a.alphas:
        alpha = "by depth " + ", ".join(f"{x:g}" for x in a.alphas)
    rule = f"alpha {alpha}"
    if a.model == "markov":
        rule = f"right with {a.p_after_accept:g} after a right position, {a.p_after_reject:g} after a wrong one"
    confidence = (f", confidence Beta{tuple(a.confidence_right)} right / Beta{tuple(a.confidence_wrong)} wrong"
                  if a.confidence else "")
    lines.append(f"  acceptance: {a.model}, {rule}{confidence}, seed {a.seed}")
    lines.append(f"  workload:   {w.prompt_tokens} prompt tokens, {w.generate_tokens} to generate, seed {w.seed}")
    return lines


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return str(value)


def print_metrics(metrics: dict[str, Any], file=None, simulated: bool | None = None) -> None:
    """Metrics as an aligned table: key, value and (when ``simulated`` is given) its unit."""
    file = file or sys.stdout
    width = max(len(k) for k in metrics)
    values = {key: format_value(value) for key, value in metrics.items()}
    value_width = min(24, max(len(v) for v in values.values()))
    for key, value in values.items():
        unit = metric_unit(key, simulated) if simulated is not None else ""
        line = f"{key:<{width}}  {value:<{value_width}}  {unit}" if unit else f"{key:<{width}}  {value}"
        print(line.rstrip(), file=file)
