"""The executor end to end under mpiexec: greedy equivalence, cancellation, KV reuse, failures, bad input.

Each fixture is one ``pipesim run`` job running many generations (``--variant``), since starting ranks that
import torch costs seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipesim import cli
from pipesim.metrics import compute_metrics
from pipesim.models.fetch import find_model
from pipesim.scenario import load_scenario
from pipesim.sim import simulate

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "local-tiny.yaml"
SMOLLM2 = ROOT / "scenarios" / "local-smollm2.yaml"
ALPHAS = (0.0, 0.3, 0.7, 1.0)
SEEDS = (0, 1, 2)
LONG = 1000  # tokens of the KV-reuse generation
LONG_PARTITIONS = 8


def run_pipesim(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipesim.cli", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_job(scenario: Path, ranks: int, variants: list[str], tmp: Path, *sets: str) -> list[dict]:
    """Run one job; returns per generation {variant, metrics, trace, json} (``json``: its stdout line)."""
    saved = tmp / "traces.json"
    argv = [str(scenario), "--ranks", str(ranks), "--json", "--save-trace", str(saved)]
    for assignment in sets:
        argv += ["--set", assignment]
    for variant in variants:
        argv += ["--variant", variant]
    result = run_pipesim(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    entries = json.loads(saved.read_text())
    assert len(lines) == len(entries) == len(variants)
    for entry, line in zip(entries, lines, strict=True):
        entry["json"] = line
    return entries


def by_variant(entries: list[dict]) -> dict[str, dict]:
    return {entry["variant"]: entry for entry in entries}


# -- tiny random model, real compute, 2 ranks ---------------------------------------------------------------

def tiny_variant(seed: int, strategy: str, alpha: float | None = None, extra: str = "") -> str:
    parts = [f"executor.seed={seed}", f"workload.seed={seed}", f"strategy.name={strategy}"]
    if alpha is not None:
        parts.append(f"acceptance.alpha={alpha}")
    return ";".join(parts) + (f";{extra}" if extra else "")


TINY_VARIANTS = [
    *(tiny_variant(seed, "iterative") for seed in SEEDS),
    *(tiny_variant(seed, strategy, alpha) for seed in SEEDS for strategy in ("speculative", "pipeinfer")
      for alpha in ALPHAS),
    # a real second-model draft: the target's own weights (accepts) and another random model (rejects)
    *(tiny_variant(0, strategy, extra=f"executor.draft=model;executor.draft_model={draft};strategy.min_confidence=0")
      for strategy in ("speculative", "pipeinfer") for draft in ("tiny-llama@0", "tiny-llama@77")),
    tiny_variant(0, "pipeinfer", 0.6, f"workload.generate_tokens={LONG};strategy.n_partitions={LONG_PARTITIONS}"),
]


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("tiny")
    # a free oracle draft: with the draft's modelled sleep, whether PipeInfer speculates at all depends on how fast
    # this machine runs the real tiny pipeline (a quiet machine returns predictions before a draft finishes)
    # 64 KV partitions, not the code's 1000: PipeInfer's reference relays its KV transactions as real messages
    # (4 x partitions + 8 around each verification, executor/kv_relay.py), which at 1000 would make this job minutes
    # long; test_smollm2_strategies_equal_target_only_decoding runs the default pool
    return by_variant(run_job(TINY, 2, TINY_VARIANTS, tmp, "workload.generate_tokens=48", "executor.oracle_cost=none",
                              "strategy.n_partitions=64"))


def test_greedy_outputs_equal_target_only_decoding(tiny_job):
    for seed in SEEDS:
        baseline = tiny_job[tiny_variant(seed, "iterative")]["metrics"]["output_tokens"]
        assert len(baseline) == 48
        for strategy in ("speculative", "pipeinfer"):
            for alpha in ALPHAS:
                entry = tiny_job[tiny_variant(seed, strategy, alpha)]
                assert entry["metrics"]["output_tokens"] == baseline, (seed, strategy, alpha)
                assert entry["trace"]["meta"]["matches_reference"] is True
    model_drafts = [v for v in tiny_job if "executor.draft=model" in v]
    for variant in model_drafts:
        assert tiny_job[variant]["metrics"]["output_tokens"] == tiny_job[tiny_variant(0, "iterative")]["metrics"][
            "output_tokens"], variant


def test_acceptance_follows_the_oracle_alpha(tiny_job):
    for seed in SEEDS:
        for strategy in ("speculative", "pipeinfer"):
            assert tiny_job[tiny_variant(seed, strategy, 0.0)]["metrics"]["drafted_accepted"] == 0
            perfect = tiny_job[tiny_variant(seed, strategy, 1.0)]["metrics"]
            assert perfect["acceptance_rate"] >= 0.9  # the last verification may be cut short at the limit
    own = tiny_variant(0, "speculative", extra="executor.draft=model;executor.draft_model=tiny-llama@0;"
                                               "strategy.min_confidence=0")
    assert tiny_job[own]["metrics"]["acceptance_rate"] >= 0.9  # the target itself as the draft


def test_pipeinfer_cancels_and_stages_skip_or_abort(tiny_job):
    skipped_or_aborted = 0
    for seed in SEEDS:
        for alpha in ALPHAS[:-1]:
            metrics = tiny_job[tiny_variant(seed, "pipeinfer", alpha)]["metrics"]
            assert metrics["runs_cancelled"] > 0 and metrics["runs_invalidated"] > 0, (seed, alpha)
            skipped_or_aborted += metrics["stage_work_skipped"] + metrics["stage_work_aborted"]
    assert skipped_or_aborted > 0


def test_no_stage_finishes_a_run_after_seeing_its_cancellation(tiny_job):
    for variant, entry in tiny_job.items():
        records = entry["trace"]["records"]
        seen = {(r[3], r[4]): r[1] for r in records if r[0] == "cancel_seen"}
        for kind, _t0, t1, where, run_id, *_rest, what, _stage, _level, _speculative, aborted in records:
            if kind == "compute" and what == "stage" and not aborted:
                t_seen = seen.get((where, run_id))
                assert t_seen is None or t1 <= t_seen + 1e-6, (variant, where, run_id)


def test_kv_partitions_return_to_the_pool(tiny_job):
    entry = tiny_job[TINY_VARIANTS[-1]]
    meta, metrics = entry["trace"]["meta"], entry["metrics"]
    assert metrics["generated_tokens"] == LONG and meta["matches_reference"] is True
    assert meta["max_partitions_used"] <= LONG_PARTITIONS
    bound = meta["prompt_tokens"] + LONG + LONG_PARTITIONS * 3 + 1  # committed + what the partitions can hold
    assert max(meta["kv_max_cells"]) <= bound
    launches = [r for r in entry["trace"]["records"] if r[0] == "launch" and r[9] == "spec"]
    t_end = entry["trace"]["t_end"]
    assert any(r[1] > t_end - 0.2 * (t_end - entry["trace"]["t_start"]) for r in launches)  # still speculating


def test_json_has_the_simulator_keys_plus_outputs(tiny_job):
    simulated = subprocess.run([sys.executable, "-m", "pipesim.cli", "simulate", str(TINY), "--json"],
                               capture_output=True, text=True, check=True, cwd=ROOT, timeout=120)
    keys = set(json.loads(simulated.stdout))
    for entry in tiny_job.values():
        line = entry["json"]
        assert set(line) == keys | {"output_tokens", "output_text", "variant"}
        assert line["engine"] == "measured" and line["output_text"] is None


def test_trace_records_are_those_of_the_simulator(tiny_job):
    entry = tiny_job[tiny_variant(0, "pipeinfer", 0.3)]
    trace = entry["trace"]
    kinds = {r[0] for r in trace["records"]}
    assert {"launch", "compute", "transfer", "tokens", "invalidate", "cancel_sent", "cancel_seen"} <= kinds
    # record fields: 9 what, 10 stage, 13 aborted
    notes = {f"stage{r[10]}" if r[9] == "stage" else r[9] for r in trace["records"] if r[0] == "compute"}
    assert {"stage0", "stage1", "draft"} <= notes
    links = {r[3] for r in trace["records"] if r[0] == "transfer"}
    assert links == {"n0->n1", "n1->n0"}
    assert trace["engine"] == "measured" and trace["nodes"] == ["n0", "n1"]
    assert trace["t_start"] < trace["t_end"] and len(trace["meta"]["clock_offsets"]) == 2
    tokens = [r for r in trace["records"] if r[0] == "tokens"]
    assert all(trace["t_start"] <= r[1] <= trace["t_end"] for r in tokens)
    assert sum(r[5] for r in tokens) == 48


# -- SmolLM2-135M, real compute, 2 ranks ---------------------------------------------------------------------

@pytest.mark.smollm2
def test_smollm2_strategies_equal_target_only_decoding(tmp_path):
    if find_model("smollm2") is None:
        pytest.skip("SmolLM2-135M GGUF not fetched: run `pipesim models fetch smollm2`")
    variants = ["strategy.name=iterative", "strategy.name=speculative;acceptance.alpha=0.7",
                "strategy.name=pipeinfer;acceptance.alpha=0.7", "strategy.name=pipeinfer;acceptance.alpha=0.3"]
    entries = by_variant(run_job(SMOLLM2, 2, variants, tmp_path, "workload.generate_tokens=20"))
    baseline = entries[variants[0]]["metrics"]
    assert "Paris" in baseline["output_text"]
    for variant in variants[1:]:
        metrics = entries[variant]["metrics"]
        assert metrics["output_tokens"] == baseline["output_tokens"], variant
        assert metrics["output_text"] == baseline["output_text"]
        assert entries[variant]["trace"]["meta"]["matches_reference"] is True
    assert entries[variants[3]]["metrics"]["runs_cancelled"] > 0


# -- emulated compute: 8 ranks on a 2-core machine ---------------------------------------------------------

EMULATED = """
name: emulated-8
models: {target: llama-2-7b, target_quantization: q4_k_m, draft: tinyllama-1.1b, draft_quantization: q4_k_m}
cluster: {count: 8, flops: 20T, memory_bandwidth: 1TB/s}
network: {bandwidth: 10Gbit/s, latency: 50us}
acceptance: {alpha: 0.7}
workload: {prompt_tokens: 32, generate_tokens: 40}
executor: {compute: emulated, timeout_s: 60}
"""


def test_emulated_protocol_on_8_ranks_matches_the_synthetic_target(tmp_path):
    scenario = tmp_path / "emulated.yaml"
    scenario.write_text(EMULATED)
    variants = ["strategy.name=iterative", "strategy.name=speculative", "strategy.name=pipeinfer",
                "strategy.name=pipeinfer;executor.link_emulation=true;network.bandwidth=1Gbit/s;head.return_mode=topk",
                "strategy.name=speculative;executor.link_emulation=true;head.return_mode=ids",
                # PipeInfer's continuous variant, and each reference switch on it alone
                "strategy.name=pipeinfer;strategy.variant=continuous",
                "strategy.name=pipeinfer;strategy.variant=continuous;strategy.pipeinfer_run_pattern=reference",
                "strategy.name=pipeinfer;strategy.variant=continuous;strategy.pipeinfer_head_priority=run",
                "strategy.name=pipeinfer;strategy.variant=continuous;strategy.pipeinfer_sync_prefill=true"]
    entries = run_job(scenario, 8, variants, tmp_path)
    baseline = entries[0]["metrics"]["output_tokens"]
    for entry in entries:
        assert entry["trace"]["meta"]["matches_reference"] is True, entry["variant"]
        assert entry["metrics"]["output_tokens"] == baseline
        assert entry["trace"]["nodes"] == [f"n{i}" for i in range(8)]
    stages = {r[10] for r in entries[2]["trace"]["records"] if r[0] == "compute" and r[9] == "stage"}
    assert set(range(8)) <= stages
    # PipeInfer's reference: runs a stage did not compute still travel whole, and their logits return; not so in
    # the continuous variant
    transfers = [r for r in entries[2]["trace"]["records"] if r[0] == "transfer"]
    computed = {r[4]: r[6] for r in transfers if r[9] == "activations"}  # a run's frame is the same on every link
    skipped = [r for r in transfers if r[9] == "skipped-activations"]
    assert skipped and any(r[9] == "skipped-predictions" for r in transfers)
    pairs = [(r[6], computed[r[4]]) for r in skipped if r[4] in computed]
    assert pairs and all(a == b for a, b in pairs)
    assert not any(r[9].startswith("skipped-") for r in entries[5]["trace"]["records"] if r[0] == "transfer")
    cancels_seen = {r[3] for r in entries[2]["trace"]["records"] if r[0] == "cancel_seen"}
    assert cancels_seen <= {f"n{k}" for k in range(1, 8)} and cancels_seen  # cancellations travel backwards
    # synchronous speculation launches the same runs in both engines: the counters mean the same in each
    simulated = compute_metrics(simulate(load_scenario(scenario, ["strategy.name=speculative"])))
    measured = entries[1]["metrics"]
    assert measured["runs_speculative"] == simulated["runs_speculative"] > 0
    assert measured["runs_launched"] == simulated["runs_launched"] == simulated["runs_speculative"] + 1


# -- failures, time limits, bad input ----------------------------------------------------------------------

def test_a_failing_rank_ends_the_whole_job_quickly():
    start = time.monotonic()
    result = run_pipesim(str(TINY), "--ranks", "3", "--set", "cluster.count=3", "--set", "executor.compute=emulated",
                         "--set", "executor.fault_rank=1", timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1: InjectedFault: injected fault at run" in result.stderr
    assert elapsed < 30


def test_every_wait_is_bounded_by_the_timeout():
    start = time.monotonic()
    result = run_pipesim(str(TINY), "--ranks", "2", "--strategy", "iterative", "--set", "executor.compute=emulated",
                         "--set", "workload.generate_tokens=1000000", "--timeout", "2", timeout=60)
    assert result.returncode != 0
    assert "ExecutorTimeout" in result.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "3"], "3 ranks do not match cluster.count=2"),
    (["--set", "executor.model=/nonexistent/tiny.gguf"], "model file not found"),
    (["--ranks", "5", "--set", "cluster.count=5"], "cluster.count=5 is more stages than the target's 4 layers"),
])
def test_bad_input_fails_before_mpiexec_starts(monkeypatch, capsys, argv, message):
    def no_launch(*_args, **_kwargs):
        raise AssertionError("mpiexec must not start on bad input")

    monkeypatch.setattr("pipesim.executor.commands.run_job", no_launch)
    assert cli.main(["run", str(TINY), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_each_rank_checks_again_when_started_directly():
    from pipesim.executor.launcher import find_mpiexec

    result = subprocess.run([find_mpiexec(), "-n", "3", sys.executable, "-m", "pipesim.executor", str(TINY)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["pipesim run: error: 3 ranks do not match cluster.count=2 of scenario 'local-tiny' "
                     "(one rank per node: use --ranks 2 or --set cluster.count=3)"]


def test_emulated_ranks_never_import_torch(tmp_path):
    from pipesim.executor.launcher import find_mpiexec

    wrapper = tmp_path / "no_torch.py"
    wrapper.write_text("import sys\nsys.modules['torch'] = None  # importing torch now fails\n"
                       "from pipesim.executor.entry import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([find_mpiexec(), "-n", "3", sys.executable, str(wrapper), str(TINY), "--json",
                             "--set", "cluster.count=3", "--set", "executor.compute=emulated",
                             "--variant", "strategy.name=speculative", "--variant", "strategy.name=pipeinfer"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 2


MESSENGER_SCRIPT = '''
import sys, time
from mpi4py import MPI
from pipesim.executor.clock import Clock
from pipesim.executor.messaging import Messenger
from pipesim.executor.protocol import TAG_RUN, RunMessage, encode_run

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
messenger = Messenger(comm, Clock(MPI.Wtime), ["n0", "n1"], [], None, 5e-4)
found_at_once = 0
for i in range(20):
    comm.Barrier()
    if rank == 0:
        messenger.send(1, TAG_RUN, encode_run(RunMessage(i, (1,), (i,), (0,), 0, ())))
        deadline = time.monotonic() + 10
        while messenger._sending and time.monotonic() < deadline:
            messenger.progress()
            time.sleep(1e-4)
    else:
        time.sleep(0.005)  # the message comes in while this rank sleeps
        found_at_once += messenger.poll()
        messenger.wait(time.monotonic() + 10, "the test message")
        assert messenger.take() is not None
if rank == 1:
    print("found at the first poll:", found_at_once)
'''


def test_a_message_that_came_during_a_sleep_is_found_by_the_next_poll(tmp_path):
    """MPICH's Iprobe matches before it makes progress: the messenger must not need a second wake-up (which
    cost every idle rank a whole poll interval per message, about 0.6 ms here)."""
    from pipesim.executor.launcher import find_mpiexec

    script = tmp_path / "messenger.py"
    script.write_text(MESSENGER_SCRIPT)
    result = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, str(script)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "found at the first poll: 20" in result.stdout


def test_speculation_waits_for_kv_room_instead_of_overflowing(tmp_path):
    """Slow links and a small KV headroom: PipeInfer used to fill the stages' caches and die (KVCacheFullError);
    the head now waits for verifications to free partitions, in the executor and in the simulator alike."""
    sets = ["executor.link_emulation=true", "network.latency=50ms", "workload.generate_tokens=24",
            "executor.kv_headroom=8", "executor.oracle_cost=none"]
    entry = run_job(TINY, 2, ["strategy.name=pipeinfer"], tmp_path, *sets)[0]
    meta = entry["trace"]["meta"]
    assert meta["matches_reference"] is True
    assert meta["kv_capacity"] == 16 + 24 + 8 and max(meta["kv_max_cells"]) <= meta["kv_capacity"]
    throttled = compute_metrics(simulate(load_scenario(TINY, sets)))
    roomy = compute_metrics(simulate(load_scenario(TINY, [*sets, "executor.kv_headroom=100000"])))
    assert throttled["generated_tokens"] == 24 and throttled["runs_launched"] < roomy["runs_launched"]


def test_an_uncalibrated_run_says_how_far_the_simulator_is():
    sets = ["--set", "workload.generate_tokens=12", "--set", "strategy.name=iterative"]
    result = run_pipesim(str(TINY), "--ranks", "2", *sets)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: the scenario's node figures")]
    predicted = compute_metrics(simulate(load_scenario(TINY, [sets[1], sets[3]])))["tokens_per_s"]
    assert len(notes) == 1 and f"predicts {predicted:.4g} tokens/s" in notes[0] and "pipesim calibrate" in notes[0]
    profile = ROOT / "reports" / "calibration" / "profile-tiny-emulated-4.yaml"
    calibrated = run_pipesim(str(TINY), "--ranks", "4", *sets, "--set", "cluster.count=4", "--set",
                             f"cluster.profile={profile}", "--set", "executor.compute=emulated")
    assert calibrated.returncode == 0, calibrated.stderr[-2000:]
    assert "node figures are not calibrated" not in calibrated.stdout
