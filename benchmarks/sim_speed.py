"""Simulator speed: simulated tokens per wall-second and SimPy events per second, per strategy.

Usage: python benchmarks/sim_speed.py [SCENARIO] [--tokens N] [--repeat R] [--profile STRATEGY]

Runs every strategy on the scenario (default: the paper's 8-node CPU setup) with ``workload.generate_tokens=N``
and reports the best of R runs. One process, one core. ``--profile`` prints the top of a cProfile of one run.
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import time

import simpy

from pipesim.scenario import load_scenario
from pipesim.sim.engine import SimulationEngine

STRATEGIES = ("iterative", "speculative", "pipeinfer")


def measure(scenario_path: str, strategy: str, tokens: int, repeat: int) -> dict[str, float]:
    scenario = load_scenario(scenario_path, [f"strategy.name={strategy}", f"workload.generate_tokens={tokens}"])
    best = None
    for _ in range(repeat):
        engine = SimulationEngine(scenario)
        counter = _count_events()
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

    def __init__(self) -> None:
        self.count = 0
        self._original = simpy.Environment.step
        counter = self

        def step(env):
            counter.count += 1
            return counter._original(env)

        simpy.Environment.step = step

    def stop(self) -> int:
        simpy.Environment.step = self._original
        return self.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", default="scenarios/paper-8node-cpu.yaml")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", choices=STRATEGIES)
    args = parser.parse_args()
    if args.profile:
        scenario = load_scenario(args.scenario, [f"strategy.name={args.profile}",
                                                 f"workload.generate_tokens={args.tokens}"])
        profiler = cProfile.Profile()
        profiler.enable()
        SimulationEngine(scenario).run()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return
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
