"""Simulator vs kernel-shaped links: the executor over real TCP between network namespaces, each link shaped by
``tc tbf`` (``pipesim run --netns``), beside the executor with sleep-emulated links and the simulator, over link
bandwidths {10, 100, 1000} Mbit/s. Root only (namespaces); real compute with the profile's model.

Per bandwidth B and configuration (iterative; speculative and pipeinfer at α, PipeInfer with at most 4 valid runs in
flight: unbounded, its head floods a 10 Mbit/s link with runs whose full logits take half a second each to return):
- kernel-shaped: ``pipesim run --netns --netns-bandwidth B`` with ``executor.link_emulation=true`` and an
  unbounded emulated bandwidth, so the executor emulates only the latency (``netem`` delay does not work on these
  machines) and the kernel alone limits the bandwidth;
- sleep-emulated: ``pipesim run`` on shared memory with ``executor.link_emulation=true`` at B (latency + bytes/B);
- simulated: the simulator with the profile (compute as calibrated, the profile's shared-memory MPI transport
  added to every link) at B and the same latency. It knows nothing of TCP: what TCP costs beyond bytes/B shows up
  as the kernel-shaped error.
Every configuration runs ``--rounds`` times (rounds interleaved in one job per mode and bandwidth); the median
tokens/s counts. The machine's load (steal, load average) is sampled over every generation.

    python benchmarks/netns_validation.py PROFILE.yaml --out reports/calibration/netns [--tokens 16] [--rounds 2]
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

from pipesim.calibration.machine_load import LoadSampler
from pipesim.executor.netns import netns_unavailable_reason
from pipesim.metrics import compute_metrics, median_by_throughput
from pipesim.scenario import load_scenario
from pipesim.sim import simulate
from pipesim.trace import Trace
from pipesim.world.profile import HardwareProfile

BANDWIDTHS = ("10Mbit/s", "100Mbit/s", "1Gbit/s")
UNBOUNDED = "1000TB/s"  # the emulated bandwidth of kernel-shaped runs: the emulator adds latency only


def configurations(alpha: float) -> list[tuple[str, list[str]]]:
    return [("iterative", ["strategy.name=iterative"]),
            (f"speculative a={alpha}", ["strategy.name=speculative", f"acceptance.alpha={alpha}"]),
            (f"pipeinfer a={alpha}", ["strategy.name=pipeinfer", f"acceptance.alpha={alpha}",
                                      "strategy.max_runs_in_flight=4"])]


def run_job(scenario: str, ranks: int, sets: list[str], variants: list[list[str]], front: list[str],
            timeout: float) -> tuple[list[dict], str]:
    """One executor job of all ``variants``; returns the saved entries with the machine's load over each."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "traces.json"
        command = [sys.executable, "-m", "pipesim.cli", "run", scenario, "--ranks", str(ranks), *front,
                   "--save-trace", str(saved)]
        for assignment in sets:
            command += ["--set", assignment]
        for variant in variants:
            command += ["--variant", ";".join(variant)]
        with LoadSampler() as load:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise SystemExit(f"netns_validation: error: executor job failed (exit {result.returncode}): "
                             f"{result.stderr.strip()[-800:]}")
        entries = json.loads(saved.read_text())
    for entry in entries:
        entry["machine_load"] = load.figures(*entry["trace"]["meta"]["wall_clock"])
    return entries, shlex.join(command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="hardware profile from pipesim calibrate (its scenario, ranks, sets)")
    parser.add_argument("--out", required=True, help="output folder (netns_validation.md, .csv, .json)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument("--rounds", type=int, default=2, help="generations per configuration (median counts)")
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--latency", default="100us", help="emulated one-way latency of every link")
    parser.add_argument("--bandwidths", default=",".join(BANDWIDTHS))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--set", action="append", default=["executor.kv_headroom=4096"], metavar="KEY=VALUE",
                        help="extra scenario overrides for every run (default: executor.kv_headroom=4096, since "
                             "PipeInfer's head keeps launching runs while a slow link holds their results)")
    args = parser.parse_args(argv)
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"netns_validation: error: {reason}", file=sys.stderr)
        return 2
    profile_path = Path(args.profile)
    profile = HardwareProfile.load(profile_path)
    scenario, ranks = profile.meta["scenario"], int(profile.meta["n_ranks"])
    base = [*profile.meta.get("sets", []), f"workload.generate_tokens={args.tokens}", "workload.seed=0",
            f"network.latency={args.latency}", "executor.link_emulation=true", *args.set]
    configs = configurations(args.alpha)
    variants = [sets for _ in range(args.rounds) for _, sets in configs]
    rows, commands = [], []
    for bandwidth in args.bandwidths.split(","):
        modes = {"kernel-shaped": ([*base, f"network.bandwidth={UNBOUNDED}"], ["--netns", "--netns-bandwidth",
                                                                                bandwidth]),
                 "sleep-emulated": ([*base, f"network.bandwidth={bandwidth}"], [])}
        for mode, (sets, front) in modes.items():
            entries, command = run_job(scenario, ranks, sets, variants, front, args.timeout)
            commands.append(command)
            for index, (label, config_sets) in enumerate(configs):
                mine = entries[index::len(configs)]
                entry = median_by_throughput(mine, lambda e: e["metrics"])
                trace = Trace.from_json(entry["trace"])
                measured = compute_metrics(trace)
                prompt = int(trace.meta.get("prompt_tokens", 0))
                sim_sets = [*base, *config_sets, f"network.bandwidth={bandwidth}", "network.profile_links=add",
                            f"cluster.profile={profile_path}", f"workload.prompt_tokens={prompt}"]
                predicted = compute_metrics(simulate(load_scenario(scenario, sim_sets)))
                util = [abs(predicted["node_utilization"][n] - measured["node_utilization"][n]) for n in trace.nodes]
                load = entry["machine_load"]
                rows.append({"bandwidth": bandwidth, "mode": mode, "config": label,
                             "measured_tokens_per_s": measured["tokens_per_s"],
                             "round_tokens_per_s": [e["metrics"]["tokens_per_s"] for e in mine],
                             "predicted_tokens_per_s": predicted["tokens_per_s"],
                             "rel_error": (predicted["tokens_per_s"] - measured["tokens_per_s"])
                             / measured["tokens_per_s"],
                             "node_utilization_abs_error": max(util),
                             "matches_reference": trace.meta.get("matches_reference"),
                             "steal_fraction": load["steal_fraction"], "load1_mean": load["load1_mean"]})
            print(f"{bandwidth} {mode}: " + ", ".join(f"{r['config']} {r['measured_tokens_per_s']:.2f} tok/s "
                                                      f"(sim {r['predicted_tokens_per_s']:.2f})"
                                                      for r in rows[-len(configs):]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "netns_validation.json").write_text(json.dumps({"rows": rows, "commands": commands,
                                                           "profile": str(profile_path), "args": vars(args)},
                                                          indent=1))
    write_report(out / "netns_validation.md", rows, commands, args, profile_path)
    return 0


def write_report(path: Path, rows: list[dict], commands: list[str], args, profile_path: Path) -> None:
    def summary(mode: str) -> str:
        errors = [abs(r["rel_error"]) for r in rows if r["mode"] == mode]
        util = [r["node_utilization_abs_error"] for r in rows if r["mode"] == mode]
        return (f"median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}; node utilization within "
                f"{max(util):.3f}")

    steal = [r["steal_fraction"] for r in rows if r["steal_fraction"] is not None]
    load = [r["load1_mean"] for r in rows if r["load1_mean"] is not None]
    lines = ["# Simulator vs kernel-shaped links (network namespaces, MPI over TCP)", "",
             f"Tokens/s as simulated against the executor, {len(rows) // 2} configurations, with the profile as "
             f"calibrated (`{profile_path}`):", "",
             f"- **kernel-shaped** links (each rank in its own network namespace, MPI over TCP, every link shaped by "
             f"`tc tbf`): {summary('kernel-shaped')};",
             f"- **sleep-emulated** links (shared memory, the executor delays each message by latency + bytes/"
             f"bandwidth): {summary('sleep-emulated')}.", "",
             f"Latency stays emulated in both ({args.latency} one-way, by the executor; the kernel adds no delay: "
             "`netem` does not work on these machines). The simulator adds the profile's shared-memory MPI transport "
             "to every link; TCP's own per-message cost over veth is not modelled, and the token-bucket shaper lets "
             "a burst of max(8 KiB, 1 ms of traffic) through at once after an idle period.",
             "",
             f"Machine load while measured: CPU steal a median {statistics.median(steal):.1%} (largest "
             f"{max(steal):.1%}), 1-minute load average a median {statistics.median(load):.1f} (largest "
             f"{max(load):.1f}) on this 2-CPU VM shared with other jobs." if steal else "Machine load not observed.",
             "", "| bandwidth | links | config | measured tok/s | rounds | simulated tok/s | error | node util. |error| "
             "| output = target-only | steal | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = ", ".join(f"{v:.2f}" for v in r["round_tokens_per_s"])
        lines.append(f"| {r['bandwidth']} | {r['mode']} | {r['config']} | {r['measured_tokens_per_s']:.2f} | "
                     f"{rounds} | {r['predicted_tokens_per_s']:.2f} | {r['rel_error']:+.1%} | "
                     f"{r['node_utilization_abs_error']:.3f} | {r['matches_reference']} | "
                     f"{(r['steal_fraction'] or 0):.1%} | {(r['load1_mean'] or 0):.1f} |")
    lines += ["", "## How this was made", "",
              "    python benchmarks/netns_validation.py " + shlex.join(
                  [str(profile_path), "--out", str(path.parent), "--tokens", str(args.tokens), "--rounds",
                   str(args.rounds), "--alpha", str(args.alpha), "--latency", args.latency,
                   *[f"--set={a}" for a in args.set[1:]]]), "",
              "Executor jobs:", "", *[f"    {c}" for c in commands]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
