"""Peak memory of one simulation, with records and metrics-only, as the number of generated tokens grows.

Usage: python benchmarks/sim_memory.py [--tokens 2000 20000] [--strategy pipeinfer] [--write FILE]

Each measurement runs in a fresh process: ``tracemalloc`` peak of the Python heap over ``SimulationEngine.run``
and ``compute_metrics`` (the engine built beforehand), plus the process's peak RSS. With records the peak grows
with the records kept (tens of bytes per record); metrics-only (``records=False``, what sweeps use) keeps a few
numbers per generated token and per run, so its peak barely moves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "paper-8node-cpu.yaml"


def measure(strategy: str, tokens: int, records: bool) -> dict:
    """One simulation in this process: the tracemalloc peak (bytes) and the record count."""
    from pipesim.metrics import compute_metrics
    from pipesim.scenario import load_scenario
    from pipesim.sim.engine import SimulationEngine

    scenario = load_scenario(SCENARIO, [f"strategy.name={strategy}", f"workload.generate_tokens={tokens}"])
    engine = SimulationEngine(scenario, records=records)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    trace = engine.run()
    metrics = compute_metrics(trace)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"strategy": strategy, "tokens": tokens, "records": records, "peak_bytes": peak,
            "n_records": len(trace.records), "generated": metrics["generated_tokens"],
            "tokens_per_s": metrics["tokens_per_s"],
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--strategy", default="pipeinfer")
    parser.add_argument("--with-records-up-to", type=int, default=20000,
                        help="also measure with records kept up to this many tokens")
    parser.add_argument("--write", metavar="FILE")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        strategy, tokens, records = args.child
        print(json.dumps(measure(strategy, int(tokens), records == "1")))
        return
    rows = []
    for tokens in args.tokens:
        for records in (False, True):
            if records and tokens > args.with_records_up_to:
                continue
            run = subprocess.run([sys.executable, __file__, "--child", args.strategy, str(tokens), str(int(records))],
                                 capture_output=True, text=True, check=True, env={**os.environ})
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    command = "python benchmarks/sim_memory.py " + " ".join(sys.argv[1:])
    lines = ["# Simulator memory: records kept, or metrics only", "",
             f"Command: `{command.strip()}` ({datetime.now(timezone.utc).isoformat(timespec='seconds')}, python "
             f"{platform.python_version()}); scenario `scenarios/paper-8node-cpu.yaml`, strategy {args.strategy}; "
             "each row a fresh process; peak = tracemalloc peak over `run()` and `compute_metrics` (the Python "
             "heap the simulation adds), RSS = the process's peak resident memory.", "",
             "| tokens | mode | records kept | peak (MB) | peak per token (bytes) | process peak RSS (MB) | "
             "tokens/s (simulated) |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = "records" if r["records"] else "metrics-only"
        lines.append(f"| {r['tokens']:,} | {mode} | {r['n_records']:,} | {r['peak_bytes'] / 1e6:.2f} | "
                     f"{r['peak_bytes'] / r['tokens']:,.0f} | {r['max_rss_kb'] / 1e3:.0f} | {r['tokens_per_s']:.4g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
