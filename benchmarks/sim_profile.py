"""Where a simulation's time goes: cProfile (own and cumulative time) and a sampling view of one run.

Usage:
    python benchmarks/sim_profile.py [STRATEGY] [--tokens N] [--scenario FILE] [--top K] [--interval-ms MS]

One simulation of the scenario (default: the paper's 8-node CPU setup, PipeInfer, 2,000 tokens) under cProfile,
then the same simulation again under a sampling profiler: a ``SIGPROF`` timer (CPU time of this process) records
the Python stack every ``MS`` milliseconds; a function's *self* share is how often it was the innermost frame, its
*total* share how often it was on the stack. The sampler has no per-call overhead, so it shows the real balance
where cProfile's per-call cost inflates small functions. Prints Markdown. Whatever ``pipesim`` is on the path is
profiled (point ``PYTHONPATH`` at an extracted revision to profile old code).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _engine(scenario_path: str, strategy: str, tokens: int):
    from pipesim.scenario import load_scenario
    from pipesim.sim.engine import SimulationEngine

    scenario = load_scenario(scenario_path, [f"strategy.name={strategy}", f"workload.generate_tokens={tokens}"])
    return SimulationEngine(scenario)


def _short(path: str) -> str:
    path = re.sub(r"^.*/site-packages/", "", path)
    path = re.sub(r"^.*/(pipesim/)", r"\1", path)
    return re.sub(r"^.*/lib/python3\.\d+/", "", path)


def cprofile_tables(engine, top: int) -> tuple[str, float]:
    """The top of a cProfile of one run, by own time and by cumulative time; and the profiled wall time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    engine.run()
    profiler.disable()
    wall = time.perf_counter() - start
    parts = []
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
        text = out.getvalue()
        text = text[text.index("   ncalls"):] if "   ncalls" in text else text
        lines = [re.sub(r"\S*/(?=pipesim/)|\S*/site-packages/|\S*/lib/python3\.\d+/", "", line)
                 for line in text.rstrip().splitlines()]
        parts.append(f"By {key}:\n\n```\n" + "\n".join(lines) + "\n```")
    return "\n\n".join(parts), wall


def sample(engines, interval_s: float) -> tuple[Counter, Counter, int, float]:
    """Run each engine under a SIGPROF sampler: (self counts, total counts, samples, CPU seconds) per
    ``file:function``."""
    own: Counter = Counter()
    total: Counter = Counter()
    count = 0

    def handler(_signum, frame) -> None:
        nonlocal count
        count += 1
        seen = set()
        first = True
        while frame is not None:
            code = frame.f_code
            name = f"{_short(code.co_filename)}:{code.co_name}"
            if first:
                own[name] += 1
                first = False
            if name not in seen:
                total[name] += 1
                seen.add(name)
            frame = frame.f_back

    previous = signal.signal(signal.SIGPROF, handler)
    cpu = time.process_time()
    signal.setitimer(signal.ITIMER_PROF, interval_s, interval_s)
    try:
        for engine in engines:
            engine.run()
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, previous)
    return own, total, count, time.process_time() - cpu


def sampling_table(own: Counter, total: Counter, count: int, top: int) -> str:
    rows = ["| function | self % | total % |", "|---|---:|---:|"]
    for name, n in own.most_common(top):
        rows.append(f"| `{name}` | {100 * n / count:.1f} | {100 * total[name] / count:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", nargs="?", default="pipeinfer")
    parser.add_argument("--scenario", default=str(ROOT / "scenarios" / "paper-8node-cpu.yaml"))
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--interval-ms", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=5, help="sampled runs (samples add up)")
    args = parser.parse_args()
    import pipesim

    tables, wall = cprofile_tables(_engine(args.scenario, args.strategy, args.tokens), args.top)
    engines = [_engine(args.scenario, args.strategy, args.tokens) for _ in range(args.repeat)]
    own, total, count, cpu = sample(engines, args.interval_ms / 1e3)
    print(f"pipesim from `{_short(str(Path(pipesim.__file__).parent))}`; {args.strategy}, {args.tokens} tokens, "
          f"`{Path(args.scenario).name}`; one run under cProfile {wall:.2f} s; sampled: {args.repeat} runs, "
          f"{cpu:.2f} CPU s, {count} samples (one per {1e3 * cpu / max(count, 1):.1f} ms of CPU: the kernel's "
          f"timer tick bounds the {args.interval_ms} ms asked for).\n")
    print(f"Sampling view (self: innermost frame):\n\n{sampling_table(own, total, count, args.top)}\n")
    print(tables)


if __name__ == "__main__":
    sys.exit(main())
