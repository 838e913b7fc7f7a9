"""How much of a validation's error is the processor-sharing model: re-simulate every configuration of a kept
validation with the profile as fitted and with ``concurrent_slowdown`` set to 1 on every node (host-mates never
slow each other), beside the measured tokens/s. Simulation only (the measured numbers come from the table).

    python benchmarks/sharing_check.py PROFILE.yaml GRID.yaml VALIDATION.csv [--output FILE.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from pipesim.calibration.validate import Grid
from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.sim import simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("grid")
    parser.add_argument("validation_csv")
    parser.add_argument("--output", help="write the Markdown table here (default: print it)")
    args = parser.parse_args(argv)
    document = yaml.safe_load(Path(args.profile).read_text())
    fitted = {name: node.get("concurrent_slowdown", 1.0) for name, node in document["nodes"].items()}
    for node in document["nodes"].values():
        node["concurrent_slowdown"] = 1.0
    grid = Grid.load(args.grid)
    table = pd.read_csv(args.validation_csv)
    measured = table[table["metric"] == "tokens_per_s"].set_index("config")["measured"]
    scenario = document["meta"]["scenario"]
    base = [*document["meta"].get("sets", []), f"workload.generate_tokens={grid.generate_tokens}",
            f"workload.seed={grid.seed}", "network.profile_links=add"]
    lines = [f"Processor sharing in `{args.profile}` (fitted: "
             + ", ".join(f"{n} x{s:.2f}" for n, s in fitted.items()) + f"), against `{args.validation_csv}`:", "",
             "| config | measured tok/s | simulated, sharing as fitted | error | simulated, no sharing | error |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        unshared = Path(tmp) / "profile-no-sharing.yaml"
        unshared.write_text(yaml.safe_dump(document))
        for label, sets in grid.variants():
            config = next((c for c in measured.index if c.endswith(label)), None)
            if config is None:
                continue
            value = measured[config]
            predicted = [compute_metrics(simulate(load_scenario(scenario, [*base, *sets, f"cluster.profile={p}"])))[
                "tokens_per_s"] for p in (args.profile, unshared)]
            lines.append(f"| {label} | {value:.2f} | {predicted[0]:.2f} | {(predicted[0] - value) / value:+.0%} | "
                         f"{predicted[1]:.2f} | {(predicted[1] - value) / value:+.0%} |")
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
