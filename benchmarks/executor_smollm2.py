"""Benchmark of the executor: SmolLM2-135M over 2 local ranks (real compute), emulated links, oracle drafts.

One ``pipesim run`` job measures iterative, speculative and pipeinfer at oracle acceptance α in {0.3, 0.6, 0.9}
with link emulation at 1 Gbit/s and 100 Mbit/s (tokens/s, TTFT, ITL; speedups as ratios over iterative at the
same bandwidth), next to what the simulator predicts for the same scenarios. Writes a Markdown report.

    python benchmarks/executor_smollm2.py [--generate-tokens 48] [--output benchmarks/results/executor_smollm2.md]

Needs the model file: ``pipesim models fetch smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "local-smollm2.yaml"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "executor_smollm2.md"


def variants(alphas: list[float], bandwidths: list[str], latency: str) -> list[tuple[str, str, float | None]]:
    """(variant string, bandwidth, alpha) for every measured generation, iterative first per bandwidth."""
    out = []
    for bandwidth in bandwidths:
        link = f"executor.link_emulation=true;network.bandwidth={bandwidth};network.latency={latency}"
        out.append((f"strategy.name=iterative;{link}", bandwidth, None))
        for strategy in ("speculative", "pipeinfer"):
            for alpha in alphas:
                out.append((f"strategy.name={strategy};acceptance.alpha={alpha};{link}", bandwidth, alpha))
    return out


def measure(runs, generate_tokens: int, repeats: int, trace_path: Path) -> tuple[list[dict], list[str], float]:
    """Run all generations in one executor job, ``repeats`` rounds of every variant; per variant the round with
    the best tokens/s is kept. Returns the kept entries (in ``runs`` order), the command and the job's wall time."""
    command = [sys.executable, "-m", "pipesim.cli", "run", str(SCENARIO.relative_to(ROOT)), "--ranks", "2",
               "--json", "--set", f"workload.generate_tokens={generate_tokens}", "--save-trace", str(trace_path)]
    for _ in range(repeats):
        for variant, _, _ in runs:
            command += ["--variant", variant]
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"executor job failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    entries = json.loads(trace_path.read_text())
    best = {}
    for entry in entries:
        kept = best.get(entry["variant"])
        if kept is None or entry["metrics"]["tokens_per_s"] > kept["metrics"]["tokens_per_s"]:
            best[entry["variant"]] = entry
    return [best[variant] for variant, _, _ in runs], command, wall


def simulate(variant: str, generate_tokens: int) -> dict:
    from pipesim.metrics import compute_metrics
    from pipesim.scenario import load_scenario
    from pipesim.sim import simulate as run_simulation

    overrides = [f"workload.generate_tokens={generate_tokens}", *variant.split(";")]
    return compute_metrics(run_simulation(load_scenario(SCENARIO, overrides)))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(runs, entries, command, wall, generate_tokens: int, latency: str, repeats: int,
           load: tuple[float, float]) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    shown = "pipesim " + " ".join(shlex.quote(part) for part in command[3:])  # [python, -m, pipesim.cli, run, ...]
    lines = [
        "# Executor benchmark: SmolLM2-135M over 2 local ranks",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu} ({_cores()} cores), torch {torch.__version__}, "
        f"Python {platform.python_version()}; the whole job took {wall:.0f} s (model loading included). "
        f"Each configuration ran {repeats} time(s) in the job, rounds interleaved; the table keeps the round with the "
        f"best tokens/s. Load average (1 min) before/after the job: {load[0]:.1f}/{load[1]:.1f} — the machine is "
        "shared, so other jobs compete for its cores and the numbers are noisy.",
        "",
        "Command (`python benchmarks/executor_smollm2.py` runs it and writes this file):",
        "",
        "```",
        shown,
        "```",
        "",
        f"Setup: `scenarios/local-smollm2.yaml` — SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), layers "
        f"split 15/15 over rank 0 (head: stage 0, oracle draft, verification) and rank 1, one torch thread per rank, "
        f"chat prompt \"What is the capital of France?\" ({entries[0]['trace']['meta']['prompt_tokens']} tokens), "
        f"{generate_tokens} generated tokens, greedy. "
        f"Full logits return to the head (49152 x 4 B = 192 KiB per predicted token). Link emulation delays every "
        f"message by latency ({latency}) + bytes/bandwidth, FIFO per direction. The oracle draft proposes the "
        "target's own greedy token with probability α; its cost is the roofline of the scenario's draft model "
        "(tiny-llama: well under a millisecond per step), so the draft is nearly free here. Speedup = tokens/s over "
        "iterative at the same bandwidth. `sim tok/s` is the simulator's prediction for the same scenario with the "
        "scenario's uncalibrated roofline figures (30 GFLOP/s, 7 GB/s per node).",
        "",
    ]
    for bandwidth in dict.fromkeys(b for _, b, _ in runs):
        rows = [(run, entry) for run, entry in zip(runs, entries, strict=True) if run[1] == bandwidth]
        base = rows[0][1]["metrics"]["tokens_per_s"]
        sim_base = simulate(rows[0][0][0], generate_tokens)["tokens_per_s"]
        lines += [f"## {bandwidth}", "",
                  "| strategy | α | tok/s | speedup | TTFT ms | ITL mean ms | ITL p50 ms | ITL p99 ms | accepted | "
                  "tok/commit | cancelled | skipped+aborted | sim tok/s | sim speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (variant, _, alpha), entry in rows:
            m = entry["metrics"]
            sim = simulate(variant, generate_tokens)
            ok = entry["trace"]["meta"]["matches_reference"]
            strategy = m["strategy"] + ("" if ok in (True, None) else " (MISMATCH)")
            lines.append(
                f"| {strategy} | {_num(alpha, 1) if alpha is not None else '-'} | {_num(m['tokens_per_s'])} | "
                f"{_num(m['tokens_per_s'] / base)} | {_ms(m['ttft_s'])} | {_ms(m['itl_mean_s'])} | "
                f"{_ms(m['itl_p50_s'])} | {_ms(m['itl_p99_s'])} | {_num(m['acceptance_rate'])} | "
                f"{_num(m['mean_tokens_per_commit'])} | {m['runs_cancelled']} | "
                f"{m['stage_work_skipped'] + m['stage_work_aborted']} | {_num(sim['tokens_per_s'])} | "
                f"{_num(sim['tokens_per_s'] / sim_base)} |")
        lines.append("")
    lines += [
        "## Reading the numbers", "",
        "- One torch thread computes a stage in float32 here, and small batches are not memory-bound on this CPU: "
        "a run of 5 tokens costs about twice a run of 1 token, where the roofline charges nearly the same. "
        "Verifying γ+1 drafted tokens is therefore far from free, and the simulator's uncalibrated roofline "
        "overestimates every speculative speedup; a fitted hardware profile (`cluster.profile`) replaces it.",
        "- Both ranks share two cores (with whatever else runs on the machine). PipeInfer keeps both ranks busy "
        "with speculative runs, and the head computes stage 0 of runs that are later cancelled, so at low α it "
        "loses to iterative; early cancellation (the cancelled and skipped+aborted columns) limits the waste.",
        "- At 100 Mbit/s the full logits of one predicted token (192 KiB) occupy the link for about 16 ms, so "
        "runs with more outputs pay for them on the way back; `head.return_mode: ids` would remove most of it.",
        "",
    ]
    outputs = {tuple(entry["metrics"]["output_tokens"]) for entry in entries}
    text = entries[0]["metrics"]["output_text"]
    lines += ["## Output", "",
              f"All {len(entries)} generations produced the same {generate_tokens} tokens "
              f"({'identical' if len(outputs) == 1 else 'NOT identical'}), equal to target-only greedy decoding: "
              f"{text!r}", ""]
    return "\n".join(lines)


def _cores() -> int:
    return os.cpu_count() or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate-tokens", type=int, default=48)
    parser.add_argument("--alphas", default="0.3,0.6,0.9")
    parser.add_argument("--bandwidths", default="1Gbit/s,100Mbit/s")
    parser.add_argument("--latency", default="100us")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every configuration (best kept)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    from pipesim.models.fetch import find_model

    if find_model("smollm2") is None:
        sys.exit("SmolLM2 GGUF not fetched: run `pipesim models fetch smollm2` first")
    runs = variants([float(a) for a in args.alphas.split(",")], args.bandwidths.split(","), args.latency)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pipesim-bench-") as tmp:
        entries, command, wall = measure(runs, args.generate_tokens, args.repeats, Path(tmp) / "traces.json")
    load = (load_before, os.getloadavg()[0])
    command[command.index("--save-trace") + 1] = "traces.json"
    text = report(runs, entries, command, wall, args.generate_tokens, args.latency, args.repeats, load)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
