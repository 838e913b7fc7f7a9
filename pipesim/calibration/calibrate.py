"""``pipesim calibrate``: run the probe on the executor's ranks, fit the cost model, write a hardware profile.

The fitted forms (see ``fit.py``): per node, stage time = o + L·(a + b·n + d·n·c) [+ h0 + h1·m on the last
stage], times the node's concurrent slowdown s while ranks on its host compute at once (processor sharing in the
simulator, ``pipesim.sim.host_cpu``), chosen because each term is a physical cost (per-run overhead, weights read per layer, per-token matrix
work, attention over the cache, the output head) and the form stays linear in its coefficients; per link,
latency + bytes/bandwidth; the draft, a + b·n + d·n·c per forward; the head, the median time to sample one run's
predictions. A short measured iterative generation then shows what the microbenchmarks miss (messaging,
scheduling, Python): its time per token outside compute records, less the simulator's, is spread over the nodes
as per-run ``dispatch`` time, which keeps a node busy in the simulator but, as in the executor's records, is not
compute (a compute misfit stays a compute error).
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..cli_args import check_output_file, int_at_least, positive_float
from ..scenario import ScenarioError, load_scenario
from ..trace import records_from_json
from ..world.profile import HardwareProfile, LinkCoefficients, NodeCoefficients
from ..yamlio import YAMLFileError, read_json
from .fit import DraftSample, LinkSample, StageSample, fit_draft, fit_link, fit_stage
from .machine_load import LoadSampler, busy_warning, describe


def probe_command(mpiexec: str, ranks: int, scenario: str, raw: Path, sets: Sequence[str], repeats: int,
                  hostfile: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    command = [mpiexec, "-n", str(ranks)]
    if hostfile:
        command += ["-f", hostfile]
    command += [sys.executable, "-m", "pipesim.calibration.probe", scenario, "--out", str(raw),
                "--repeats", str(repeats), *extra]
    for assignment in sets:
        command += ["--set", assignment]
    return command


def fit_profile(raw: dict[str, Any], command: str = "") -> tuple[HardwareProfile, dict[str, Any]]:
    """Fit a hardware profile from the probe's raw samples; also returns fit-quality figures."""
    nodes: dict[str, NodeCoefficients] = {}
    links: dict[str, LinkCoefficients] = {}
    quality: dict[str, Any] = {"stage": {}, "links": {}}
    verify_overhead = 0.0
    in_situ = _in_situ_stage_samples(raw)
    for report in raw["ranks"]:
        stage = fit_stage([StageSample(**s) for s in report["stage"]] + in_situ.get(report["node"], []))
        coefficients = NodeCoefficients(stage.overhead, stage.layer_fixed, stage.layer_per_token,
                                        stage.layer_per_token_context, stage.head_fixed, stage.head_per_output,
                                        layer_single=stage.layer_single, head_single=stage.head_single,
                                        host=report["host"],
                                        concurrent_slowdown=concurrent_slowdown(report.get("concurrent")))
        quality["stage"][report["node"]] = vars(stage.quality)
        if report.get("draft"):
            draft = fit_draft([DraftSample(**s) for s in report["draft"]])
            coefficients.draft_fixed = draft.fixed
            coefficients.draft_per_token = draft.per_token
            coefficients.draft_per_token_context = draft.per_token_context
            quality["draft"] = vars(draft.quality)
        elif report["rank"] == 0:
            coefficients.draft_fixed = coefficients.draft_per_token = coefficients.draft_per_token_context = 0.0
        if report.get("sampling"):
            verify_overhead = statistics.median(s["seconds"] for s in report["sampling"][:2])
        if report.get("kv_transactions"):
            coefficients.kv_transaction = report["kv_transactions"]["seconds_per_transaction"]
        nodes[report["node"]] = coefficients
        for name, samples in report["links"].items():
            link = fit_link([LinkSample(**s) for s in samples])
            links[name] = LinkCoefficients(link.latency, link.bandwidth)
            quality["links"][name] = vars(link.quality)
    _in_situ_head_costs(raw, nodes, quality)
    if raw.get("speculative"):
        verify = [r.t1 - r.t0 for r in records_from_json(raw["speculative"]["trace"])
                  if r.kind == "compute" and r.what == "verify"]
        if verify:
            verify_overhead = statistics.median(verify)
    meta = {"command": command, "scenario": raw["scenario"], "sets": raw["sets"], "n_ranks": raw["n_ranks"],
            "compute": "real" if raw["real"] else "emulated", "threads_per_rank": raw["threads_per_rank"],
            "hosts": {r["node"]: r["host"] for r in raw["ranks"]},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # the measured generations the fit used (in situ samples, per-run dispatch): held-out validation checks it
            "calibrated_on": [k for k in ("iterative", "speculative") if raw.get(k)],
            "form": "stage = o + L*(a + b*n + d*n*c) [+ h0 + h1*m], x concurrent_slowdown while host-mates "
                    "compute; link = latency + bytes/bandwidth; draft = a + b*n + d*n*c"}
    model = raw.get("model") or "emulated"
    poll = None
    if raw.get("poll"):
        late = [r["sleep_overshoot"] for r in raw["ranks"] if "sleep_overshoot" in r]
        poll = {**raw["poll"], "overshoot": statistics.median(late) if late else 0.0}
    return HardwareProfile(model, nodes, links, verify_overhead, meta, poll), quality


def concurrent_slowdown(concurrent: dict[str, list[dict]] | None) -> float:
    """Median over the probe's points of (time with host-mates computing) / (time alone); 1 without host-mates.

    Never below 1: sharing a host cannot speed a stage up, so a ratio under 1 is measurement noise.
    """
    if not concurrent or not concurrent.get("together"):
        return 1.0
    alone = {(s["n_tokens"], s["context"]): s["seconds"] for s in concurrent["alone"]}
    ratios = [s["seconds"] / alone[key] for s in concurrent["together"]
              if (key := (s["n_tokens"], s["context"])) in alone and alone[key] > 0]
    return max(1.0, statistics.median(ratios)) if ratios else 1.0


def _in_situ_stage_samples(raw: dict[str, Any]) -> dict[str, list[StageSample]]:
    """Stage samples from the measured generations' compute records (the stages under real conditions: both
    ranks busy, messages in flight), which the microbenchmarks alone underestimate on a shared machine.

    Records carry the run's token count but not its position: the context is taken as the prompt length (the
    context term is small over a short generation). The last stage computes the head for every token of a run
    but a prefill's, which returns only its last prediction.
    """
    out: dict[str, list[StageSample]] = {}
    layers = {report["node"]: report["stage"][0]["n_layers"] for report in raw["ranks"] if report["stage"]}
    last = raw["ranks"][-1]["node"]
    for key in ("iterative", "speculative"):
        generation = raw.get(key)
        if not generation:
            continue
        trace = generation["trace"]
        prompt = int(trace["meta"].get("prompt_tokens", 0))
        records = records_from_json(trace)
        prefills = {r.run_id for r in records if r.kind == "launch" and r.what == "prefill"}
        for r in records:
            if r.kind != "compute" or r.what != "stage" or r.aborted or r.where not in layers:
                continue
            outputs = 0 if r.where != last else (1 if r.run_id in prefills else r.n_tokens)
            out.setdefault(r.where, []).append(StageSample(layers[r.where], r.n_tokens, prompt, outputs, r.t1 - r.t0))
    return out


def _in_situ_head_costs(raw: dict[str, Any], nodes: dict[str, NodeCoefficients], quality: dict[str, Any]) -> None:
    """Draft-step costs as the head sees them while it also computes and messages (from the measured speculative
    generation's draft records), which can differ from the isolated microbenchmark."""
    generation = raw.get("speculative")
    if not generation:
        return
    by_batch: dict[int, list[float]] = {}
    for r in records_from_json(generation["trace"]):
        if r.kind == "compute" and r.what == "draft":
            by_batch.setdefault(r.n_tokens, []).append(r.t1 - r.t0)
    samples = [DraftSample(n, 0, statistics.median(times)) for n, times in by_batch.items()]
    if len(samples) < 2:
        if len(samples) == 1 and samples[0].n_tokens == 1:
            head = nodes[raw["ranks"][0]["node"]]
            head.draft_fixed, head.draft_per_token = samples[0].seconds, head.draft_per_token or 0.0
            head.draft_per_token_context = 0.0
        return
    samples.append(samples[0])  # fit_draft wants 3 rows; a duplicate changes nothing
    fit = fit_draft(samples)
    head = nodes[raw["ranks"][0]["node"]]
    head.draft_fixed, head.draft_per_token, head.draft_per_token_context = fit.fixed, fit.per_token, 0.0
    quality["draft_in_situ"] = vars(fit.quality)


def add_residual_overhead(profile: HardwareProfile, raw: dict[str, Any], path: Path) -> dict[str, float]:
    """Compare the measured iterative generation with the simulator on the provisional profile; spread the
    residual time per token *outside compute* over the nodes as per-run dispatch time. Returns the figures.

    Only the non-compute part counts: a compute misfit (the machine ran slower or faster while the generation was
    measured) stays a compute error and is not charged to every run as dispatch.
    """
    from ..sim import simulate
    from ..trace import Trace

    measured = raw.get("iterative")
    if not measured:
        return {}
    tokens = measured["metrics"]["generated_tokens"]
    sets = [*raw["sets"], "strategy.name=iterative", f"workload.generate_tokens={tokens}",
            "executor.link_emulation=false", "network.bandwidth=1000TB/s", "network.latency=0",
            f"cluster.profile={path}"]
    measured_trace = Trace.from_json(measured["trace"])
    actual = decode_time_split(measured_trace)
    predicted = decode_time_split(simulate(load_scenario(raw["scenario"], sets)))
    residual = actual["other_s"] - predicted["other_s"]
    if residual > 0:
        for node in profile.nodes.values():
            node.dispatch += residual / len(profile.nodes)
    profile.save(path)
    after = decode_time_split(simulate(load_scenario(raw["scenario"], sets)))
    return {"measured_tokens_per_s": 1.0 / actual["token_s"], "predicted_before": 1.0 / predicted["token_s"],
            "predicted_after": 1.0 / after["token_s"], "residual_per_token_s": residual,
            "compute_per_token_s": {"measured": actual["compute_s"], "simulated": predicted["compute_s"]},
            "measured_repeats": raw.get("iterative_tokens_per_s") or [1.0 / actual["token_s"]]}


def decode_time_split(trace) -> dict[str, float]:
    """Seconds per decoded token of a generation, and how much of it compute records cover (``compute_s``) and
    what is left (``other_s``: messaging, polling, dispatch), between its first and last committed token."""
    commits = sorted(r.t0 for r in trace.records if r.kind == "tokens")
    n_tokens = sum(r.n_tokens for r in trace.records if r.kind == "tokens")
    if n_tokens < 2 or commits[-1] <= commits[0]:
        raise ValueError("the iterative check needs a generation of at least 2 tokens")
    first, last = commits[0], commits[-1]
    spans = sorted((max(r.t0, first), min(r.t1, last)) for r in trace.records
                   if r.kind == "compute" and r.t1 > first and r.t0 < last)
    covered, end = 0.0, first
    for a, b in spans:  # the union of the spans (a node's records may nest)
        if b > end:
            covered += b - max(a, end)
            end = b
    per_token, compute = (last - first) / (n_tokens - 1), covered / (n_tokens - 1)
    return {"token_s": per_token, "compute_s": compute, "other_s": per_token - compute}


def calibrate(scenario: str, ranks: int, out: Path, sets: Sequence[str] = (), repeats: int = 5,
              hostfile: str | None = None, raw_in: Path | None = None, timeout: float = 1800,
              probe_args: Sequence[str] = ()) -> tuple[HardwareProfile, dict[str, Any]]:
    """Probe (unless ``raw_in`` holds samples from a cluster launcher), fit, and save the profile to ``out``."""
    load_scenario(scenario, list(sets))  # one clear error line before anything starts
    from ..executor.launcher import find_mpiexec, run_job

    command = ""
    if raw_in is None:
        raw_path = out.with_suffix(".raw.json")
        cmd = probe_command(find_mpiexec(), ranks, scenario, raw_path, sets, repeats, hostfile, probe_args)
        command = shlex.join(cmd)
        # as `pipesim run`: signals to this process end the probe's ranks, a time limit stops the whole job
        with LoadSampler() as load:
            code = run_job(cmd, dict(os.environ), timeout)
        machine_load = load.figures()
        if code == 124:
            raise ScenarioError(f"calibration probe did not finish in {timeout:.0f} s")
        if code != 0:
            raise ScenarioError(f"calibration probe failed (exit {code})")
    else:
        raw_path = raw_in
        machine_load = None
    try:
        raw = read_json(raw_path, "raw calibration samples file")
    except YAMLFileError as error:
        raise ScenarioError(str(error)) from None
    profile, quality = fit_profile(raw, command)
    profile.meta["machine_load"] = machine_load  # over the probe job (None: fitted from samples taken elsewhere)
    profile.meta["cli"] = "pipesim calibrate " + shlex.join(
        [scenario, "--ranks", str(ranks), "--out", str(out), *[f"--set={s}" for s in sets]])
    profile.save(out)
    residual = add_residual_overhead(profile, raw, out)
    profile.meta["iterative_check"] = residual
    profile.meta["fit_quality"] = quality
    profile.save(out)
    return profile, quality


def default_profile_path(scenario: str) -> Path:
    """Where ``pipesim calibrate`` writes a profile unless told: ``runs/calibration/<scenario stem>.yaml``."""
    return Path("runs") / "calibration" / f"{Path(scenario).stem}.yaml"


def _cmd_calibrate(args) -> int:
    out = Path(args.out) if args.out else default_profile_path(args.scenario)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.quiet and not args.from_raw:
        from .probe import ITERATIVE_REPEATS

        print(f"calibrate: probing {args.ranks} ranks ({args.repeats} repeats per grid point, then "
              f"{ITERATIVE_REPEATS} iterative generations of {args.iterative_tokens} tokens); a real SmolLM2 "
              f"on 2 cores takes about 2-3 minutes, bounded by --timeout {args.timeout:.0f} s",
              file=sys.stderr, flush=True)
    profile, quality = calibrate(args.scenario, args.ranks, out, args.set, args.repeats, args.hostfile,
                                 Path(args.from_raw) if args.from_raw else None, args.timeout,
                                 ["--iterative-tokens", str(args.iterative_tokens)])
    print(f"hardware profile written to {out} ({len(profile.nodes)} nodes, {len(profile.links)} links)")
    for name, q in quality["stage"].items():
        node = profile.nodes[name]
        print(f"  {name} ({node.host}): per layer {node.layer_fixed * 1e3:.3f} ms + {node.layer_per_token * 1e3:.3f} "
              f"ms/token + {node.layer_per_token_context * 1e6:.3f} us/token/position; head "
              f"{node.head_fixed * 1e3:.2f} + {node.head_per_output * 1e3:.2f} ms/output; overhead "
              f"{node.overhead * 1e3:.2f} ms/run + dispatch {node.dispatch * 1e3:.2f} ms/run; fit median error {q['median_rel_error']:.1%}"
              + (f"; x{node.concurrent_slowdown:.2f} while host-mates compute" if node.concurrent_slowdown > 1 else ""))
        if node.layer_single is not None:
            print(f"    single-token runs: per layer {node.layer_single * 1e3:.3f} ms"
                  + (f", head {node.head_single * 1e3:.2f} ms" if node.head_single is not None else ""))
    relayed = {name: node.kv_transaction for name, node in profile.nodes.items() if node.kv_transaction is not None}
    if relayed:
        assumed = load_scenario(args.scenario, list(args.set)).cluster.kv_transaction_time
        print("  relayed KV transaction (PipeInfer's reference; profile term kv_transaction): "
              + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in relayed.items())
              + f" per transaction per node (the scenario assumes {assumed * 1e6:.1f} us)")
    if profile.poll:
        print(f"  idle polling: sleeps {profile.poll['first'] * 1e6:.0f} us doubling to "
              f"{profile.poll['longest'] * 1e3:.2f} ms, each {profile.poll['overshoot'] * 1e6:.0f} us late")
    for name, link in profile.links.items():
        print(f"  {name}: latency {link.latency * 1e6:.1f} us, bandwidth {link.bandwidth * 8 / 1e9:.2f} Gbit/s")
    if profile.meta.get("machine_load"):
        print(f"  machine load during the probe: {describe(profile.meta['machine_load'])}")
        warning = busy_warning(profile.meta["machine_load"])
        if warning:
            print(f"calibrate: warning: {warning}", file=sys.stderr)
    check = profile.meta.get("iterative_check") or {}
    if check:
        compute = check["compute_per_token_s"]
        repeats = ", ".join(f"{v:.2f}" for v in check.get("measured_repeats", []))
        print(f"  iterative check: measured {check['measured_tokens_per_s']:.2f} tok/s (median of {repeats}), simulated "
              f"{check['predicted_before']:.2f} from microbenchmarks, {check['predicted_after']:.2f} after the "
              f"per-run dispatch time of {check['residual_per_token_s'] * 1e3:.2f} ms/token (outside compute; "
              f"compute per token measured {compute['measured'] * 1e3:.1f} ms, simulated "
              f"{compute['simulated'] * 1e3:.1f} ms)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="measure the executor's ranks and fit a hardware profile for the simulator",
        description="Microbenchmark every rank (stage compute over tokens x context, ping-pong over message sizes, "
                    "sampling, draft steps), fit the simulator's cost model and write a hardware profile. On a "
                    "cluster: --hostfile for mpiexec, or run `srun python -m pipesim.calibration.probe SCENARIO "
                    "--out raw.json` yourself and fit it with --from-raw raw.json.")
    parser.add_argument("scenario", metavar="SCENARIO",
                        help="scenario YAML (its executor section picks the model and compute mode)")
    parser.add_argument("--ranks", type=int_at_least(1), default=2, metavar="N", help="number of ranks = cluster.count")
    parser.add_argument("--out", default=None, metavar="FILE", type=check_output_file,
                        help="where to write the profile (YAML; the raw samples go beside it as .raw.json) "
                             "(default: runs/calibration/<scenario name>.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario field (repeatable)")
    parser.add_argument("--repeats", type=int_at_least(1), default=5, metavar="N",
                        help="repetitions per grid point (medians)")
    parser.add_argument("--hostfile", metavar="FILE", help="host file passed to mpiexec (-f) on a cluster")
    parser.add_argument("--from-raw", metavar="FILE", help="fit samples a launcher already collected (raw JSON)")
    parser.add_argument("--iterative-tokens", type=int_at_least(1), default=32, metavar="N",
                        help="tokens of the measured iterative generation used for the per-run dispatch time")
    parser.add_argument("--timeout", type=positive_float, default=1800, metavar="SECONDS", help="bound on the probe job")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=_cmd_calibrate)
