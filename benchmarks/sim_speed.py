"""Simulator speed: simulated tokens per wall-second and SimPy events per second, per strategy.

Usage:
    python benchmarks/sim_speed.py [SCENARIO] [--tokens N] [--repeat R] [--profile STRATEGY]
    python benchmarks/sim_speed.py --compare-rev REV [--pairs P] [--write FILE]

Runs every strategy on the scenario (default: the paper's 8-node CPU setup) with ``workload.generate_tokens=N``
and reports the best of R runs. One process, one core. ``--profile`` prints the top of a cProfile of one run.

``--compare-rev REV`` measures the code of a git revision (extracted with ``git archive`` into a temporary
folder) side by side with the working tree: for each strategy, P pairs of runs in alternating order (old, new,
new, old, ...), each in a fresh process whose ``PYTHONPATH`` points at that code, the same scenario file and
measurement for both; it reports the best of each side and the ratio new / old, with the load average before
and after (the machine is shared: compare ratios measured in one run, not numbers from different runs).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("iterative", "speculative", "pipeinfer")


def measure(scenario_path: str, strategy: str, tokens: int, repeat: int) -> dict[str, float]:
    """Best of ``repeat`` runs of the simulator (engine construction not timed) with the ``pipesim`` found on
    the path: this function runs unchanged against old revisions, so it uses only long-standing entry points."""
    import simpy

    from pipesim.scenario import load_scenario
    from pipesim.sim.engine import SimulationEngine

    scenario = load_scenario(scenario_path, [f"strategy.name={strategy}", f"workload.generate_tokens={tokens}"])
    best = None
    for _ in range(repeat):
        engine = SimulationEngine(scenario)
        counter = _count_events(simpy)
        start = time.perf_counter()
        trace = engine.run()
        wall = time.perf_counter() - start
        events = counter.stop()
        if best is None or wall < best["wall_s"]:
            best = {"wall_s": wall, "events": events, "tokens": len(trace.output_tokens)}
    assert best is not None
    best["tokens_per_wall_s"] = best["tokens"] / best["wall_s"]
    best["events_per_s"] = best["events"] / best["wall_s"]
    return best


class _count_events:
    """Counts SimPy events processed (wraps Environment.step for the duration)."""

    def __init__(self, simpy) -> None:
        self.count = 0
        self._environment = simpy.Environment
        self._original = simpy.Environment.step
        counter = self

        def step(env):
            counter.count += 1
            return counter._original(env)

        simpy.Environment.step = step

    def stop(self) -> int:
        self._environment.step = self._original
        return self.count


# -- comparing with a git revision ----------------------------------------------------------------

def extract_revision(rev: str, into: Path) -> str:
    """Extract the tree of ``rev`` into ``into`` (``git archive``); returns its full commit hash."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"sim_speed: --compare-rev {rev}: not a git revision here ({error.stderr.strip()})") from None
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "pipesim"],
                             capture_output=True, check=True).stdout
    tar_path = into / "rev.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return commit


def measure_in(code: Path, scenario: str, strategy: str, tokens: int, repeat: int) -> dict[str, float]:
    """``measure`` in a fresh process that imports ``pipesim`` from ``code`` (checked)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), scenario, "--child", strategy,
                          "--tokens", str(tokens), "--repeat", str(repeat)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"sim_speed: the code in {code} failed on {strategy}: {last}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    imported = Path(result.pop("pipesim_file")).resolve()
    if code.resolve() not in imported.parents:
        raise SystemExit(f"sim_speed: expected pipesim from {code}, the child imported {imported}")
    return result


def compare(rev: str, scenario: str, tokens: int, repeat: int, pairs: int) -> dict:
    """Old (``rev``) against new (the working tree), pair by pair, per strategy."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="sim-speed-rev-") as folder:
        commit = extract_revision(rev, Path(folder))
        sides = {"old": Path(folder), "new": ROOT}
        rows = []
        for strategy in STRATEGIES:
            best: dict[str, dict] = {}
            for pair in range(pairs):
                order = ("old", "new") if pair % 2 == 0 else ("new", "old")
                for side in order:
                    r = measure_in(sides[side], scenario, strategy, tokens, repeat)
                    if side not in best or r["wall_s"] < best[side]["wall_s"]:
                        best[side] = r
            old, new = best["old"], best["new"]
            rows.append({"strategy": strategy, "old": old, "new": new,
                         "ratio": new["tokens_per_wall_s"] / old["tokens_per_wall_s"]})
    return {"rev": rev, "commit": commit, "scenario": scenario, "tokens": tokens, "repeat": repeat, "pairs": pairs,
            "rows": rows, "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def comparison_markdown(result: dict, command: str) -> str:
    lines = [f"# Simulator speed: {result['rev']} ({result['commit'][:10]}) against the working tree", "",
             f"Command: `{command}` ({result['date']}, python {result['python']}; load average "
             f"{result['load_before']} before, {result['load_after']} after, on {os.cpu_count()} cores).",
             f"Scenario `{result['scenario']}`, {result['tokens']} tokens; each side best of {result['pairs']} "
             f"processes x {result['repeat']} runs, in alternating order; ratio = new / old simulated tokens per "
             "wall-second.", "",
             "| strategy | old tok / wall s | new tok / wall s | ratio | old events | new events | old wall s | "
             "new wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        old, new = row["old"], row["new"]
        lines.append(f"| {row['strategy']} | {old['tokens_per_wall_s']:,.0f} | {new['tokens_per_wall_s']:,.0f} | "
                     f"{row['ratio']:.2f}x | {old['events']:,} | {new['events']:,} | {old['wall_s']:.3f} | "
                     f"{new['wall_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", default="scenarios/paper-8node-cpu.yaml")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", choices=STRATEGIES)
    parser.add_argument("--compare-rev", metavar="REV", help="also measure this git revision; print the ratios")
    parser.add_argument("--pairs", type=int, default=2, help="with --compare-rev: old/new process pairs")
    parser.add_argument("--write", metavar="FILE", help="with --compare-rev: also write the Markdown here")
    parser.add_argument("--child", choices=STRATEGIES, help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.child:
        import pipesim

        result = measure(args.scenario, args.child, args.tokens, args.repeat)
        print(json.dumps({**result, "pipesim_file": pipesim.__file__}))
        return
    if args.compare_rev:
        scenario = str(Path(args.scenario).resolve())
        result = compare(args.compare_rev, scenario, args.tokens, args.repeat, args.pairs)
        result["scenario"] = args.scenario
        command = "python benchmarks/sim_speed.py " + " ".join(sys.argv[1:])
        text = comparison_markdown(result, command)
        print(text)
        if args.write:
            Path(args.write).write_text(text)
        return
    if args.profile:
        from pipesim.scenario import load_scenario
        from pipesim.sim.engine import SimulationEngine

        scenario = load_scenario(args.scenario, [f"strategy.name={args.profile}",
                                                 f"workload.generate_tokens={args.tokens}"])
        profiler = cProfile.Profile()
        profiler.enable()
        SimulationEngine(scenario).run()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return
    import simpy

    print(f"# sim_speed: {args.scenario}, {args.tokens} tokens, best of {args.repeat}, "
          f"python {platform.python_version()}, simpy {simpy.__version__}")
    print("| strategy | generated tokens | wall s | simulated tokens / wall s | events | events / s |")
    print("|---|---:|---:|---:|---:|---:|")
    for strategy in STRATEGIES:
        r = measure(args.scenario, strategy, args.tokens, args.repeat)
        print(f"| {strategy} | {r['tokens']} | {r['wall_s']:.3f} | {r['tokens_per_wall_s']:,.0f} | "
              f"{r['events']:,} | {r['events_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
