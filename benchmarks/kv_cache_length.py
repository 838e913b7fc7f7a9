"""Benchmark of PipeInfer's throughput against generation length: the KV cache's sequence bookkeeping.

PipeInfer's stages hold a KV cache with ``strategy.n_partitions + 1`` sequence columns (1001 by default) and
one cell per position of the whole generation. The cache used to free emptied cells by scanning every cell's
every column after each ``seq_rm`` and to build each attention mask from all columns, so each KV operation
cost O(capacity x max_seqs): tokens/s fell as generations grew (capacity grows with ``generate_tokens``). It now
keeps a per-cell count of sequences and masks with only the columns the batch's tokens use. This benchmark runs
the same generations with the cache as shipped and patched back to the full scans (``legacy``), alternating,
and reports tokens/s and the ratio.

    python benchmarks/kv_cache_length.py [--rounds 2] [--output benchmarks/results/kv_cache_length.md]

Tiny random-weight model, real compute, 2 ranks, free oracle draft (``executor.oracle_cost=none``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "local-tiny.yaml"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "kv_cache_length.md"
SETS = ["executor.oracle_cost=none", "executor.timeout_s=300", "strategy.max_runs_in_flight=16"]
CASES = [(strategy, n) for strategy in ("pipeinfer", "iterative") for n in (200, 2000)]

RANK_WRAPPER = """
import sys
import torch
from pipesim.models.kv_cache import KVCache

if sys.argv.pop(1) == "legacy":  # the cache before the change: full scans of every cell and column
    def seq_rm(self, seq, p0=0, p1=None):
        in_range = self._in_range(p0, p1)
        if seq < 0:
            self.cell_seqs[in_range] = False
        else:
            self.cell_seqs[in_range, seq] = False
        self.cell_pos[~self.cell_seqs.any(dim=1)] = -1
        self.cell_nseq.copy_(self.cell_seqs.sum(dim=1))

    def attention_mask(self, positions, token_seqs, n_cells=None):
        n_cells = self.capacity if n_cells is None else n_cells
        n = positions.numel()
        cell_pos, cell_seqs = self.cell_pos[:n_cells], self.cell_seqs[:n_cells]
        shares = (token_seqs.to(torch.float32) @ cell_seqs.to(torch.float32).T) > 0
        return shares & (cell_pos[None, :] >= 0) & (cell_pos[None, :] <= positions.reshape(n, 1))

    KVCache.seq_rm = torch.inference_mode()(seq_rm)
    KVCache.attention_mask = attention_mask
from pipesim.executor.entry import main
sys.exit(main(sys.argv[1:]))
"""


def run_job(mode: str, strategy: str, n: int, wrapper: Path) -> float:
    """One 2-rank executor job with the cache in ``mode``; its tokens/s."""
    from pipesim.executor.launcher import find_mpiexec

    command = [find_mpiexec(), "-n", "2", sys.executable, str(wrapper), mode, str(SCENARIO), "--json",
               "--strategy", strategy, "--set", f"workload.generate_tokens={n}"]
    for assignment in SETS:
        command += ["--set", assignment]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        sys.exit(f"executor job failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return float(json.loads(result.stdout)["tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="jobs per mode and case, alternating (default 2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    results: dict[tuple[str, str, int], list[float]] = {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "rank.py"
        wrapper.write_text(RANK_WRAPPER)
        for r in range(args.rounds):
            for strategy, n in CASES:
                for mode in ("legacy", "shipped") if r % 2 == 0 else ("shipped", "legacy"):
                    results.setdefault((mode, strategy, n), []).append(run_job(mode, strategy, n, wrapper))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    wall = time.monotonic() - start

    def cell(mode: str, strategy: str, n: int) -> str:
        values = results[(mode, strategy, n)]
        return f"{statistics.median(values):.0f} ({min(values):.0f} - {max(values):.0f})"

    lines = [
        "# PipeInfer against generation length: the KV cache's sequence bookkeeping",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, shared), Python {platform.python_version()}; {args.rounds} jobs per mode and "
        f"case, alternating, {wall:.0f} s in all. Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.",
        "",
        f"Command: `python benchmarks/kv_cache_length.py --rounds {args.rounds}`. Scenario "
        f"`scenarios/local-tiny.yaml` (tiny random Llama, real compute, 2 ranks) with `{' '.join(SETS)}`. "
        "`legacy`: the KV cache patched back to freeing emptied cells by scanning all cells x all "
        "`n_partitions + 1` sequence columns after each `seq_rm`, and masking attention with all columns; "
        "`shipped`: per-cell sequence counts, masks from the columns in use. Median decode tokens/s (min - max).",
        "",
        "| strategy | generate_tokens | legacy (tok/s) | shipped (tok/s) | shipped / legacy |",
        "|---|---|---|---|---|",
    ]
    for strategy, n in CASES:
        old = statistics.median(results[("legacy", strategy, n)])
        new = statistics.median(results[("shipped", strategy, n)])
        lines.append(f"| {strategy} | {n} | {cell('legacy', strategy, n)} | {cell('shipped', strategy, n)} | "
                     f"{new / old:.2f} |")
    for mode in ("legacy", "shipped"):
        short = statistics.median(results[(mode, "pipeinfer", 200)])
        long = statistics.median(results[(mode, "pipeinfer", 2000)])
        lines.append("")
        lines.append(f"PipeInfer {mode}: tokens/s at 2000 tokens / at 200 tokens = {long / short:.2f}.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
