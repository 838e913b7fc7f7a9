"""Does the simulator still give the same results as a git revision, bit for bit, beyond the golden traces?

Usage: python benchmarks/sim_equivalence.py --rev REV [--tokens N] [--write FILE]

Simulates a grid of scenarios (every strategy; acceptance rates; bandwidths down to where links queue; return
modes; a calibrated profile with polling, dispatch and shared hosts; link emulation) with the code of ``REV``
(extracted with ``git archive``) and with the working tree, each in its own process, and compares for each the
digest of every record (``tests.golden.record_digest``: kind, times to 9 digits, place, run, tokens, bytes,
checked/accepted), the output tokens and the metrics. Exit status 1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PAPER = "scenarios/paper-8node-cpu.yaml"
PROFILE = ["cluster.count=4", "cluster.profile=reports/calibration/profile-tiny-emulated-4.yaml",
           "executor.compute=emulated"]


def cases(tokens: int) -> list[tuple[str, list[str]]]:
    grid: list[tuple[str, list[str]]] = []
    n = f"workload.generate_tokens={tokens}"
    for strategy in ("pipeinfer", "speculative", "iterative"):
        for alpha in (0.3, 0.7, 0.95):
            for bandwidth in ("10Mbit/s", "1Gbit/s", "100Gbit/s"):
                grid.append((PAPER, [f"strategy.name={strategy}", n, f"acceptance.alpha={alpha}",
                                     f"network.bandwidth={bandwidth}"]))
    grid += [(PAPER, ["strategy.name=pipeinfer", n, "head.return_mode=topk", "acceptance.seed=3"]),
             (PAPER, ["strategy.name=pipeinfer", n, "head.return_mode=ids", "strategy.micro_batch=1"]),
             (PAPER, ["strategy.name=pipeinfer", n, "strategy.early_cancellation=false"]),
             (PAPER, ["strategy.name=pipeinfer", n, "cluster.count=2", "placement.layer_split=null"]),
             ("scenarios/local-tiny.yaml", PROFILE),
             ("scenarios/local-tiny.yaml", [*PROFILE, "strategy.name=speculative"]),
             ("scenarios/local-tiny.yaml", [*PROFILE, "executor.link_emulation=true", "network.bandwidth=100Mbit/s"]),
             ("scenarios/local-tiny-speed.yaml", []),
             ("scenarios/local-tiny-speed.yaml", ["strategy.exit_layer=2"]),
             ("scenarios/pipespec-3model.yaml", []),
             ("scenarios/pipespec-3model.yaml", ["strategy.name=pipespec-sync"]),
             ("scenarios/local-tiny-chain.yaml", []),
             ("pipesim/data/default.yaml", [])]
    return grid


def entry(path: str, overrides: list[str]) -> dict:
    """One case with whatever ``pipesim`` is on the path."""
    from pipesim.metrics import compute_metrics
    from pipesim.scenario import load_scenario
    from pipesim.sim import simulate
    from tests.golden import record_digest

    trace = simulate(load_scenario(ROOT / path, overrides))
    metrics = compute_metrics(trace)
    return {"records": record_digest(trace.records), "n_records": len(trace.records),
            "output": hashlib.sha256(json.dumps(list(trace.output_tokens)).encode()).hexdigest()[:16],
            "metrics": json.dumps(metrics, sort_keys=True, default=str)}


def run_side(code: Path, tokens: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(tokens)], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"sim_equivalence: the code in {code} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="b6aaeba")
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--write", metavar="FILE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps([entry(path, overrides) for path, overrides in cases(args.tokens)]))
        return 0
    from sim_speed import extract_revision

    with tempfile.TemporaryDirectory(prefix="sim-equivalence-") as folder:
        commit = extract_revision(args.rev, Path(folder))
        old = run_side(Path(folder), args.tokens)
    new = run_side(ROOT, args.tokens)
    rows, same = [], 0
    for (path, overrides), a, b in zip(cases(args.tokens), old, new, strict=True):
        verdict = "same" if a == b else ", ".join(k for k in a if a[k] != b[k]) + " differ"
        same += a == b
        rows.append(f"| `{Path(path).name}` {' '.join(overrides)} | {a['n_records']:,} | {verdict} |")
    command = "python benchmarks/sim_equivalence.py " + " ".join(sys.argv[1:])
    text = "\n".join([f"# Simulator results against {args.rev} ({commit[:10]})", "",
                      f"Command: `{command.strip()}`. {same} of {len(rows)} cases identical (record digests, "
                      "output tokens, every metric).", "", "| case | records | result |", "|---|---:|---|", *rows])
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
