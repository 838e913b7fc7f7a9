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
SETS = ["executor.oracle_cost=none", "executor.timeout_s=300"]
CASES = [(strategy, n) for strategy in ("pipeinfer", "iterative") for n in (200, 1000)]

RANK_WRAPPER = """
import sys
import torch
from pipesim.models.kv_cache import KVCache

if sys.argv.pop(1) == "legacy":  # the cache's methods before the change, verbatim: full scans
    def _free_empty(self):
        self.cell_pos[~self.cell_seqs.any(dim=1)] = -1

    def seq_cp(self, src, dst, p0=0, p1=None):
        self._check_seq(src, "src")
        self._check_seq(dst, "dst")
        sel = self.cell_seqs[:, src] & self._in_range(p0, p1)
        self.cell_seqs[sel, dst] = True

    def seq_rm(self, seq, p0=0, p1=None):
        in_range = self._in_range(p0, p1)
        if seq < 0:
            self.cell_seqs[in_range] = False
        else:
            self._check_seq(seq, "seq")
            self.cell_seqs[in_range, seq] = False
        _free_empty(self)

    def seq_keep(self, seq):
        self._check_seq(seq, "seq")
        keep = self.cell_seqs[:, seq].clone()
        self.cell_seqs.zero_()
        self.cell_seqs[:, seq] = keep
        _free_empty(self)

    def attention_mask(self, positions, token_seqs, n_cells=None):
        n_cells = self.capacity if n_cells is None else n_cells
        n = positions.numel()
        self._check_token_seqs(token_seqs, n)
        cell_pos, cell_seqs = self.cell_pos[:n_cells], self.cell_seqs[:n_cells]
        shares = (token_seqs.to(torch.float32) @ cell_seqs.to(torch.float32).T) > 0
        return shares & (cell_pos[None, :] >= 0) & (cell_pos[None, :] <= positions.reshape(n, 1))

    for method in (seq_cp, seq_rm, seq_keep):
        setattr(KVCache, method.__name__, torch.inference_mode()(method))
    KVCache.attention_mask = attention_mask
from pipesim.executor.entry import main
sys.exit(main(sys.argv[1:]))
"""


def run_job(mode: str, strategy: str, n: int, wrapper: Path) -> float | None:
    """One 2-rank executor job with the cache in ``mode``; its tokens/s (None: the job failed)."""
    from pipesim.executor.launcher import find_mpiexec

    command = [find_mpiexec(), "-n", "2", sys.executable, str(wrapper), mode, str(SCENARIO), "--json",
               "--strategy", strategy, "--set", f"workload.generate_tokens={n}"]
    for assignment in SETS:
        command += ["--set", assignment]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:  # recorded as a failed job (its first error line), not a number
        lines = [line for line in result.stderr.splitlines() if line.startswith("rank ")] or ["?"]
        print(f"{mode} {strategy} {n}: failed: {lines[0]}", file=sys.stderr)
        return None
    return float(json.loads(result.stdout)["tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="jobs per mode and case, alternating (default 2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    results: dict[tuple[str, str, int], list[float]] = {}
    failures: dict[tuple[str, str, int], int] = {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "rank.py"
        wrapper.write_text(RANK_WRAPPER)
        for r in range(args.rounds):
            for strategy, n in CASES:
                for mode in ("legacy", "shipped") if r % 2 == 0 else ("shipped", "legacy"):
                    rate = run_job(mode, strategy, n, wrapper)
                    if rate is None:
                        failures[(mode, strategy, n)] = failures.get((mode, strategy, n), 0) + 1
                    else:
                        results.setdefault((mode, strategy, n), []).append(rate)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    wall = time.monotonic() - start

    def median(mode: str, strategy: str, n: int) -> float | None:
        values = results.get((mode, strategy, n))
        return statistics.median(values) if values else None

    def cell(mode: str, strategy: str, n: int) -> str:
        values = results.get((mode, strategy, n), [])
        text = f"{statistics.median(values):.0f} ({min(values):.0f} - {max(values):.0f})" if values else "-"
        failed = failures.get((mode, strategy, n), 0)
        return text + (f", {failed} job(s) failed" if failed else "")

    lines = [
        "# PipeInfer against generation length: the KV cache's sequence bookkeeping",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, shared), Python {platform.python_version()}; {args.rounds} jobs per mode and "
        f"case, alternating, {wall:.0f} s in all. Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.",
        "",
        f"Command: `python benchmarks/kv_cache_length.py --rounds {args.rounds}`. Scenario "
        f"`scenarios/local-tiny.yaml` (tiny random Llama, real compute, 2 ranks) with `{' '.join(SETS)}`. "
        "`legacy`: the KV cache's `seq_cp`/`seq_rm`/`seq_keep`/`attention_mask` patched back to the code before "
        "the change (freeing emptied cells by scanning all cells x all `n_partitions + 1` sequence columns, "
        "masking attention with all columns); "
        "`shipped`: per-cell sequence counts, masks from the columns in use. Median decode tokens/s (min - max).",
        "",
        "| strategy | generate_tokens | legacy (tok/s) | shipped (tok/s) | shipped / legacy |",
        "|---|---|---|---|---|",
    ]
    for strategy, n in CASES:
        old, new = median("legacy", strategy, n), median("shipped", strategy, n)
        ratio = f"{new / old:.2f}" if old and new else "-"
        lines.append(f"| {strategy} | {n} | {cell('legacy', strategy, n)} | {cell('shipped', strategy, n)} | "
                     f"{ratio} |")
    for mode in ("legacy", "shipped"):
        short, long = median(mode, "pipeinfer", 200), median(mode, "pipeinfer", 1000)
        if short and long:
            lines += ["", f"PipeInfer {mode}: tokens/s at 1000 tokens / at 200 tokens = {long / short:.2f}."]
    if failures:
        lines += ["", "Failed jobs are not in the medians (their first error line went to stderr when the "
                  "benchmark ran)."]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
