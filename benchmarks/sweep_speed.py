"""How fast does a what-if study run? Time a 1,000-point sweep of the simulator (every point distinct).

The study: the PipeInfer paper's 8-node cluster, 10 link bandwidths (100 Mbit/s-100 Gbit/s) x 10 acceptance
rates (0.5-0.95) x {speculative, pipeinfer} x 5 acceptance seeds = 1,000 configurations, none shared, each
simulated from scratch into a fresh folder (nothing reused).

    python benchmarks/sweep_speed.py                       # 1,000 points on every core
    python benchmarks/sweep_speed.py --jobs 1 --points 100  # a smaller grid, serial
    python benchmarks/sweep_speed.py --profile 40           # where the time goes (40 points, one process)
    python benchmarks/sweep_speed.py --write benchmarks/results/sweep_speed.md --profile 40
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipesim.reports.outcome import evaluate
from pipesim.reports.parallel import default_jobs
from pipesim.reports.study import study_from_dict
from pipesim.reports.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper-8node-cpu.yaml"


def benchmark_study(points: int, tokens: int) -> dict:
    """A grid of about ``points`` distinct configurations (bandwidth x α x 2 strategies x 5 seeds)."""
    per_axis = max(1, round((points / 10) ** 0.5))
    bandwidths = [f"{v:.4g}Mbit/s" for v in np.geomspace(100, 100_000, per_axis)]
    alphas = [round(float(a), 3) for a in np.linspace(0.5, 0.95, per_axis)]
    return {"name": "sweep-speed", "base": str(PAPER), "set": {"workload.generate_tokens": tokens},
            "axes": {"network.bandwidth": bandwidths, "acceptance.alpha": alphas,
                     "strategy.name": ["speculative", "pipeinfer"], "acceptance.seed": [0, 1, 2, 3, 4]}}


def run(points: int, tokens: int, jobs: int | None) -> dict:
    study = study_from_dict(benchmark_study(points, tokens), "sweep-speed")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = run_sweep(study, folder, jobs=jobs, progress=False, traces=False)
        wall = time.perf_counter() - started
        assert result is not None
        table = result.table  # read from the folder: the sweep streams it there
    per_strategy = table.groupby("strategy")["sim_runtime_s"].agg(["mean", "max"]).round(4).to_dict("index")
    return {"points": len(table), "simulated": result.simulated, "failed": result.failed, "jobs": result.workers,
            "backend": result.backend, "wall_s": round(wall, 2), "points_per_s": round(len(table) / wall, 1),
            "cpu_s_per_point": per_strategy, "generate_tokens": tokens,
            "load_average": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(),
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def profile(points: int, tokens: int, top: int = 15) -> str:
    """cProfile of ``points`` points evaluated in this process (the workers' code path), by own time."""
    study = study_from_dict(benchmark_study(points, tokens), "sweep-speed")
    documents = [p.scenario.model_dump(mode="json") for p in study.points()]
    profiler = cProfile.Profile()
    profiler.enable()
    for document in documents:
        evaluate(document)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    text = text[text.index("   ncalls"):] if "   ncalls" in text else text
    return re.sub(r"/\S*/site-packages/", "", text.replace(str(ROOT) + "/", "")).rstrip()


def markdown(result: dict, command: str, hot: str | None) -> str:
    per_strategy = result.pop("cpu_s_per_point")
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    cpu = "\n".join(f"| {name} | {v['mean']:.3f} | {v['max']:.3f} |" for name, v in per_strategy.items())
    text = (f"# Sweep speed\n\n```\n{command}\n```\n\n| measure | value |\n|---|---|\n{rows}\n\n"
            f"Seconds per point in a worker (simulation + metrics + closed forms):\n\n"
            f"| strategy | mean | max |\n|---|---|---|\n{cpu}\n")
    if hot:
        text += f"\n## Where the time goes (cProfile, own time)\n\n```\n{hot}\n```\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1000, help="grid size (rounded to 10 x n^2)")
    parser.add_argument("--tokens", type=int, default=64, help="workload.generate_tokens of every point")
    parser.add_argument("--jobs", type=int, default=None, help=f"worker processes (default: {default_jobs()})")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="profile N points in one process (alone: print it; with --write: add it to the file)")
    parser.add_argument("--write", metavar="FILE", help="also write the result as Markdown")
    args = parser.parse_args(argv)
    if args.profile and not args.write:
        print(profile(args.profile, args.tokens))
        return 0
    result = run(args.points, args.tokens, args.jobs)
    print(json.dumps(result))
    if args.write:
        command = "python benchmarks/sweep_speed.py " + " ".join(sys.argv[1:])
        hot = profile(args.profile, args.tokens) if args.profile else None
        Path(args.write).write_text(markdown(dict(result), command.strip(), hot))
    return 0 if result["wall_s"] < 120 else 1


if __name__ == "__main__":
    sys.exit(main())
