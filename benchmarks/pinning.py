"""Pinned vs unpinned ranks: SmolLM2 iterative decoding over 2 local ranks, jobs alternating between
``executor.pin_ranks=true`` and ``false``, each job several generations; tokens/s per generation, the spread of
each setting ((max - min) / median) and the machine's load over every job. A ratio measured in one run.

    python benchmarks/pinning.py [--jobs 3] [--generations 4] [--tokens 16] [--output benchmarks/results/pinning.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pipesim.calibration.machine_load import LoadSampler, describe

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "local-smollm2.yaml"


def job(pin: bool, generations: int, tokens: int) -> tuple[list[float], dict, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "t.json"
        command = [sys.executable, "-m", "pipesim.cli", "run", str(SCENARIO), "--ranks", "2", "--save-trace",
                   str(saved), "--set", f"executor.pin_ranks={str(pin).lower()}", "--set", "strategy.name=iterative",
                   "--set", f"workload.generate_tokens={tokens}"]
        command += ["--variant", "workload.seed=0"] * generations
        with LoadSampler() as load:
            subprocess.run(command, check=True, capture_output=True, timeout=600, cwd=ROOT)
        entries = json.loads(saved.read_text())
    return [e["metrics"]["tokens_per_s"] for e in entries], load.figures(), command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3, help="jobs per setting, alternating")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "pinning.md"))
    args = parser.parse_args(argv)
    values: dict[bool, list[float]] = {True: [], False: []}
    lines = ["# Pinned vs unpinned ranks (SmolLM2, iterative, 2 ranks)", "",
             "| job | pin_ranks | tokens/s per generation | machine load |", "|---|---|---|---|"]
    command: list[str] = []
    for k in range(args.jobs):
        for pin in (True, False):
            rates, load, command = job(pin, args.generations, args.tokens)
            values[pin] += rates
            lines.append(f"| {k} | {pin} | {', '.join(f'{r:.2f}' for r in rates)} | {describe(load)} |")
            print(lines[-1], flush=True)
    lines += ["", "| pin_ranks | generations | median tok/s | spread (max - min) / median |", "|---|---|---|---|"]
    for pin in (True, False):
        v = values[pin]
        median = statistics.median(v)
        lines.append(f"| {pin} | {len(v)} | {median:.2f} | {(max(v) - min(v)) / median:.1%} |")
    ratio = statistics.median(values[True]) / statistics.median(values[False])
    lines += ["", f"Pinned / unpinned median tokens/s: {ratio:.2f}.", "",
              f"Command: `python benchmarks/pinning.py --jobs {args.jobs} --generations {args.generations} "
              f"--tokens {args.tokens}`; each job is like `{shlex.join(command[2:])}` (with pin_ranks true or false)."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-7:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
