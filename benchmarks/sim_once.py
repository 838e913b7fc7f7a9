"""One simulation of the paper's 8-node scenario, for whole-process measurements (instruction counts, memory).

Usage: python benchmarks/sim_once.py STRATEGY TOKENS [SCENARIO]

Under ``valgrind --tool=callgrind`` the instruction count of a run is the same whatever else the machine does, so
two revisions compare exactly: the count at TOKENS minus the count at 10 tokens is the per-token cost.
"""

from __future__ import annotations

import sys

from pipesim.scenario import load_scenario
from pipesim.sim.engine import SimulationEngine


def main() -> None:
    strategy, tokens = sys.argv[1], int(sys.argv[2])
    path = sys.argv[3] if len(sys.argv) > 3 else "scenarios/paper-8node-cpu.yaml"
    scenario = load_scenario(path, [f"strategy.name={strategy}", f"workload.generate_tokens={tokens}"])
    SimulationEngine(scenario).run()


if __name__ == "__main__":
    main()
