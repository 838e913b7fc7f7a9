"""``pipesim hardware list`` (the node and network catalogs) and ``pipesim plan SCENARIO`` (per node: layers,
memory needed and available, modelled step costs at 1, 8 and 64 tokens)."""

from __future__ import annotations

import argparse
import sys

from .hardware import NETWORK_PRESETS, NODE_TYPES
from .scenario import SET_HELP, Scenario, load_cli_scenario
from .units import format_bandwidth
from .world.costs import make_cost_model, scenario_nodes
from .world.memory import format_bytes, memory_plan

__all__ = ["register"]
STEP_TOKENS = (1, 8, 64)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``hardware`` and ``plan`` commands to a CLI's subparsers."""
    hardware = subparsers.add_parser("hardware", help="catalogs of node types and interconnects")
    actions = hardware.add_subparsers(dest="hardware_command", metavar="{list}")
    hardware.set_defaults(func=lambda args: (hardware.print_help(sys.stderr), 2)[1])
    listing = actions.add_parser("list", help="list node types (cluster.hardware) and networks (network.preset)")
    listing.set_defaults(func=_list)


    plan = subparsers.add_parser(
        "plan", help="per node: layers, memory needed/available, modelled step costs",
        description="Print, for each node of a scenario, its target layers, the memory its placement needs "
                    "(weights, KV cache, activations) next to what it has, and its modelled stage time for runs "
                    "of 1, 8 and 64 tokens (simulated costs). Exit 1 when a node does not fit.")
    plan.add_argument("scenario", nargs="?", default=None, help="scenario YAML file (default: built-in default)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    plan.set_defaults(func=_plan)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths,
                                                                                                 strict=True)))
                     for row in [header, *rows])


def _list(args: argparse.Namespace) -> int:
    rows = [(n.name, n.kind, f"{n.peak_flops[n.default_dtype] / 1e12:.1f} {n.default_dtype}",
             f"{n.memory_bandwidth / 1e9:.0f} GB/s", f"{n.memory / 1e9:.0f} GB", f"{n.compute_fraction:.2f}",
             f"{n.bandwidth_fraction:.2f}", f"{n.layer_floor * 1e6:.0f} us", n.description)
            for n in NODE_TYPES.values()]
    print("node types (cluster.hardware; peak TFLOP/s dense, sustained = peak x fraction):")
    print(_table(("name", "kind", "peak TF", "memory BW", "memory", "compute", "bandwidth", "layer floor",
                  "description"), rows))
    print("\nnetworks (network.preset):")
    print(_table(("name", "bandwidth", "latency", "description"),
                 [(p.name, format_bandwidth(p.bandwidth), f"{p.latency * 1e6:g} us", p.description)
                  for p in NETWORK_PRESETS.values()]))
    return 0


def plan_rows(scenario: Scenario) -> tuple[tuple[str, ...], list[tuple[str, ...]], bool]:
    """(header, one row per node, whether every node fits)."""
    plan = memory_plan(scenario)
    nodes = scenario_nodes(scenario)
    target = scenario.models.target_spec()
    profile = None
    if scenario.cluster.profile is not None:
        from .world.profile import HardwareProfile

        profile = HardwareProfile.load(scenario.cluster.profile)
    cost = make_cost_model(target, scenario, "target", profile)
    context = scenario.workload.prompt_tokens
    header = ("node", "layers", "weights", "kv cache", "activations", "needed", "available", "fits",
              *(f"step@{n} (ms)" for n in STEP_TOKENS))
    rows = []
    last = len(plan) - 1
    for i, (node, memory) in enumerate(zip(nodes, plan, strict=True)):
        start, end = memory.layers
        steps = [cost.stage_cost(node, end - start, n, context, n if i == last else 0).total * 1e3
                 for n in STEP_TOKENS] if end > start else []
        rows.append((node.name, f"{start}-{end - 1}" if end > start else "-", format_bytes(memory.weights),
                     format_bytes(memory.kv_cache), format_bytes(memory.activations), format_bytes(memory.needed),
                     "unknown" if memory.available is None else format_bytes(memory.available),
                     "yes" if memory.fits else "NO",
                     *([f"{t:.3f}" for t in steps] if steps else ["-"] * len(STEP_TOKENS))))
    return header, rows, all(m.fits for m in plan)


def _plan(args: argparse.Namespace) -> int:

    scenario = load_cli_scenario(args.scenario, args.set, None)
    header, rows, fits = plan_rows(scenario)
    target = scenario.models.target_spec()
    cluster = scenario.cluster
    print(f"plan: scenario {scenario.name!r}, target {target.name}, {cluster.count} nodes"
          f"{' of ' + cluster.hardware if cluster.hardware else ''}, cost model "
          f"{'calibrated profile' if cluster.profile else cluster.cost_model} (modelled, not measured)")
    print(_table(header, rows))
    if not fits:
        print("does not fit: at least one node needs more memory than it has", file=sys.stderr)
        return 1
    return 0
