"""Golden traces: compact simulator outputs for a few scenarios per strategy, to guard refactors.

Each case is a scenario with overrides; its golden entry holds the headline metrics and a digest of the trace's
records (kind, times, place, run, tokens, bytes, checked/accepted; sorted, so the order in which an engine
appends records of one instant does not count). A change that moves an entry says why in its commit.

Regenerate (after a deliberate change): ``python -m tests.golden --write``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

GOLDEN_FILE = Path(__file__).with_name("golden_traces.json")
ROOT = Path(__file__).resolve().parent.parent

# (case name, scenario path relative to the repository, overrides)
CASES: list[tuple[str, str, list[str]]] = [
    ("default-pipeinfer", "pipesim/data/default.yaml", []),
    ("paper-iterative", "scenarios/paper-8node-cpu.yaml", ["strategy.name=iterative", "workload.generate_tokens=64"]),
    ("paper-speculative", "scenarios/paper-8node-cpu.yaml",
     ["strategy.name=speculative", "workload.generate_tokens=64"]),
    ("paper-pipeinfer", "scenarios/paper-8node-cpu.yaml", ["strategy.name=pipeinfer", "workload.generate_tokens=64"]),
    ("paper-pipeinfer-alpha0.3-topk", "scenarios/paper-8node-cpu.yaml",
     ["strategy.name=pipeinfer", "workload.generate_tokens=64", "acceptance.alpha=0.3", "head.return_mode=topk"]),
    ("tiny-speed", "scenarios/local-tiny-speed.yaml", []),
    ("tiny-pipeinfer-profile", "scenarios/local-tiny.yaml",
     ["cluster.count=4", "cluster.profile=reports/calibration/profile-tiny-emulated-4.yaml",
      "executor.compute=emulated"]),
    # the continuous variant reproduces the traces PipeInfer had before the reference became the default
    ("default-pipeinfer-continuous", "pipesim/data/default.yaml", ["strategy.variant=continuous"]),
    ("paper-pipeinfer-continuous", "scenarios/paper-8node-cpu.yaml",
     ["strategy.name=pipeinfer", "workload.generate_tokens=64", "strategy.variant=continuous"]),
    ("paper-pipeinfer-alpha0.3-topk-continuous", "scenarios/paper-8node-cpu.yaml",
     ["strategy.name=pipeinfer", "workload.generate_tokens=64", "acceptance.alpha=0.3", "head.return_mode=topk",
      "strategy.variant=continuous"]),
    ("tiny-pipeinfer-profile-continuous", "scenarios/local-tiny.yaml",
     ["cluster.count=4", "cluster.profile=reports/calibration/profile-tiny-emulated-4.yaml",
      "executor.compute=emulated", "strategy.variant=continuous"]),
    ("pipespec-3model", "scenarios/pipespec-3model.yaml", []),
    ("pipespec-3model-sync", "scenarios/pipespec-3model.yaml", ["strategy.name=pipespec-sync"]),
    ("tiny-chain", "scenarios/local-tiny-chain.yaml", []),
    # the earlier PipeSpec semantics by name: these reproduce the entries the three cases above had before the
    # reference variants became the default
    ("pipespec-3model-capped", "scenarios/pipespec-3model.yaml",
     ["strategy.variant=capped", "strategy.lookahead=16", "strategy.max_verify=8"]),
    ("pipespec-3model-sync-verify-only", "scenarios/pipespec-3model.yaml",
     ["strategy.name=pipespec-sync", "strategy.variant=verify-only", "strategy.lookahead=16", "strategy.max_verify=8"]),
    ("tiny-chain-capped", "scenarios/local-tiny-chain.yaml",
     ["strategy.variant=capped", "strategy.lookahead=4", "strategy.max_verify=8"]),
]

METRIC_KEYS = ("generated_tokens", "tokens_per_s", "e2e_tokens_per_s", "ttft_s", "acceptance_rate",
               "drafted_checked", "drafted_accepted", "runs_launched", "runs_invalidated", "runs_cancelled",
               "stage_work_skipped", "stage_work_aborted", "wasted_compute_fraction", "wall_s")


def _round(value: float) -> str:
    return f"{value:.9g}"


def record_digest(records) -> str:
    """A digest of the records' content, independent of the order of records and of free-text notes."""
    rows = sorted(
        (str(r.kind), _round(r.t0), _round(r.t1), str(r.where), int(r.run_id), int(r.n_tokens), _round(r.nbytes),
         int(r.checked), int(r.accepted))
        for r in records)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def golden_entry(case: tuple[str, str, list[str]]) -> dict:
    """Simulate one case and return its compact golden entry."""
    from pipesim.metrics import compute_metrics
    from pipesim.scenario import load_scenario
    from pipesim.sim import simulate

    _name, path, overrides = case
    trace = simulate(load_scenario(ROOT / path, overrides))
    metrics = compute_metrics(trace)
    counts: dict[str, int] = {}
    for r in trace.records:
        counts[str(r.kind)] = counts.get(str(r.kind), 0) + 1
    return {
        "metrics": {key: metrics[key] for key in METRIC_KEYS},
        "node_utilization": metrics["node_utilization"],
        "record_counts": dict(sorted(counts.items())),
        "records_digest": record_digest(trace.records),
        "output_digest": hashlib.sha256(json.dumps(list(trace.output_tokens)).encode()).hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN_FILE.name}")
    args = parser.parse_args()
    entries = {case[0]: golden_entry(case) for case in CASES}
    text = json.dumps(entries, indent=1, sort_keys=True) + "\n"
    if args.write:
        GOLDEN_FILE.write_text(text)
        print(f"wrote {GOLDEN_FILE} ({len(entries)} cases)")
    else:
        print(text)


if __name__ == "__main__":
    main()
