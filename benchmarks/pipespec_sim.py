"""PipeSpec in the simulator: 2- and 3-model chains against speculative and iterative decoding, across α.

Usage: python benchmarks/pipespec_sim.py [--tokens N] > benchmarks/results/pipespec_sim.md

Setting: scenarios/pipespec-3model.yaml (GPU-class nodes, 100 Gbit/s). The target (Llama-3.1-70B, f16) runs on
four nodes; PipeSpec puts each draft on a node of its own (1B on n0, 8B on n1). The baselines use the same four
target nodes: iterative, and speculative (γ=4) with the 1B draft on the target's head node. α is how often the
1B's token equals the target's; in the 3-model chain the 8B agrees with the target at sqrt(α) (it is better).
PipeSpec and pipespec-sync run their default "reference" variants (BradMcDanel/pipespec decoding.py; the study in
reports/pipespec compares them with the earlier "capped" semantics). All numbers are simulated tokens/s (decode
rate after the first token).
"""

from __future__ import annotations

import argparse

from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.sim import simulate

SCENARIO = "scenarios/pipespec-3model.yaml"
ALPHAS = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]


def rate(sets: list[str]) -> float:
    return compute_metrics(simulate(load_scenario(SCENARIO, sets)))["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    tokens = f"workload.generate_tokens={args.tokens}"
    alone = ["cluster.count=4", "placement.chain_nodes=null", "models.draft=llama-3.2-1b", tokens]
    iterative = rate(["strategy.name=iterative", *alone])
    print(f"# PipeSpec vs speculative vs iterative (simulated, {SCENARIO}, {args.tokens} tokens, reference variants)\n")
    print(f"Command: `python benchmarks/pipespec_sim.py --tokens {args.tokens}`\n")
    print("| α (1B vs target) | iterative tok/s | speculative γ=4 | pipespec-sync 2-model | pipespec 2-model "
          "| pipespec-sync 3-model | pipespec 3-model | best speedup over iterative |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for alpha in ALPHAS:
        speculative = rate(["strategy.name=speculative", "strategy.gamma=4", f"acceptance.alpha={alpha}", *alone])
        two = ["models.chain=[llama-3.2-1b]", "placement.chain_nodes=[[0],[2,3,4,5]]",
               f"acceptance.chain_alphas=[{alpha}]", tokens]
        three = [f"acceptance.chain_alphas=[{alpha},{alpha ** 0.5:.4f}]", tokens]
        row = [speculative,
               rate(["strategy.name=pipespec-sync", *two]), rate(["strategy.name=pipespec", *two]),
               rate(["strategy.name=pipespec-sync", *three]), rate(["strategy.name=pipespec", *three])]
        cells = " | ".join(f"{value:.1f}" for value in row)
        print(f"| {alpha} | {iterative:.1f} | {cells} | {max(row) / iterative:.2f}x |")


if __name__ == "__main__":
    main()
