"""Does a sweep's memory stay flat as it grows? Peak RSS of the sweep process and its workers, per grid size.

The grid: the PipeInfer paper's 8-node cluster, very small points (8 generated tokens, 16 prompt tokens),
{speculative, pipeinfer} x 10 link bandwidths x as many acceptance seeds as the size asks: every point a
distinct configuration, simulated from scratch into a fresh folder (streamed results, cache, no traces).
Each size runs in a fresh process, so its peaks are its own.

    python benchmarks/sweep_memory.py --points 1000 10000               # print one JSON line per size
    python benchmarks/sweep_memory.py --points 1000 10000 100000 --write benchmarks/results/sweep_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper-8node-cpu.yaml"
BANDWIDTHS = [f"{v}Mbit/s" for v in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)]


def grid(points: int) -> dict:
    seeds = max(1, round(points / (2 * len(BANDWIDTHS))))
    return {"name": "sweep-memory", "base": str(PAPER),
            "set": {"workload.generate_tokens": 8, "workload.prompt_tokens": 16},
            "axes": {"strategy.name": ["speculative", "pipeinfer"], "network.bandwidth": BANDWIDTHS,
                     "acceptance.seed": {"range": [0, seeds]}}}


def _status_kib(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class WorkerPeaks:
    """Samples the peak RSS (VmHWM) of this process' children while a sweep runs."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for task in Path("/proc/self/task").iterdir():
                try:
                    pids = [int(p) for p in (task / "children").read_text().split()]
                except FileNotFoundError:
                    continue
                for pid in pids:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), _status_kib(pid, "VmHWM"))


def child(points: int, jobs: int) -> dict:
    """One sweep of about ``points`` points in this process; its peaks in MiB."""
    from pipesim.reports.study import study_from_dict
    from pipesim.reports.sweep import run_sweep

    study = study_from_dict(grid(points), "sweep-memory")
    with tempfile.TemporaryDirectory() as folder, WorkerPeaks() as workers:
        started = time.perf_counter()
        result = run_sweep(study, folder, jobs=jobs, progress=False, traces=False)
        wall = time.perf_counter() - started
        cache_mib = (Path(folder) / "cache.sqlite").stat().st_size / 2**20
        table_mib = (Path(folder) / "results.parquet").stat().st_size / 2**20
    assert result is not None
    largest_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    worker_peaks = sorted(round(kib / 1024, 1) for kib in workers.peaks.values())
    sweep_peak = _status_kib("self", "VmHWM") / 1024
    return {"points": result.points, "simulated": result.simulated, "failed": result.failed,
            "jobs": result.workers, "wall_s": round(wall, 1), "points_per_s": round(result.points / wall, 1),
            "sweep_process_peak_rss_mib": round(sweep_peak, 1),
            "largest_worker_peak_rss_mib": round(largest_child, 1), "worker_peaks_sampled_mib": worker_peaks,
            "total_peak_rss_mib_upper_bound": round(sweep_peak + sum(worker_peaks), 1),
            "cache_sqlite_mib": round(cache_mib, 1), "results_parquet_mib": round(table_mib, 2),
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def markdown(rows: list[dict], command: str, started_load: list[float]) -> str:
    keys = ["points", "wall_s", "points_per_s", "sweep_process_peak_rss_mib", "largest_worker_peak_rss_mib",
            "total_peak_rss_mib_upper_bound", "cache_sqlite_mib", "results_parquet_mib", "load_average_after"]
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    body = "".join("| " + " | ".join(str(r[k]) for k in keys) + " |\n" for r in rows)
    return (f"# Sweep memory\n\n```\n{command}\n```\n\n"
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, python {platform.python_version()}, "
            f"{os.cpu_count()} cores, load average at start {started_load}.\n\n{head}{body}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[1000, 10000], help="grid sizes (20 x seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--write", metavar="FILE", help="also write the results as Markdown")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.jobs)))
        return 0
    started_load = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for points in args.points:
        run = subprocess.run([sys.executable, __file__, "--child", str(points), "--jobs", str(args.jobs)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.write:
        command = "python benchmarks/sweep_memory.py " + " ".join(sys.argv[1:])
        Path(args.write).write_text(markdown(rows, command.strip(), started_load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
