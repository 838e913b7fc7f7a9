"""SPEED in the executor: early exits from the rank holding the exit layer, greedy equivalence, cancellations.

Each fixture is one ``pipesim run`` job with many generations (``--variant``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipesim.executor.errors import ExecutorSetupError
from pipesim.executor.plan import make_plan
from pipesim.executor.protocol import (
    TAG_EARLY,
    EarlyExitMessage,
    RunMessage,
    decode_early_exit,
    decode_run,
    describe,
    encode_early_exit,
    encode_run,
)
from pipesim.models.fetch import find_model
from pipesim.scenario import load_scenario
from pipesim.scheduling import KVOp

from .test_executor_mpi import by_variant, run_job

ROOT = Path(__file__).resolve().parents[1]
SPEED = ROOT / "scenarios" / "local-tiny-speed.yaml"
SMOLLM2 = ROOT / "scenarios" / "local-smollm2.yaml"
SEEDS = (0, 1)
ALPHAS = (0.0, 0.5, 1.0)
EXIT_LAYERS = (1, 2)  # 2 ranks of the 4-layer tiny model: layer 1 is on rank 0, layer 2 on rank 1
N_TOKENS = 40


# -- pieces without MPI -------------------------------------------------------------------------------------

def test_run_header_carries_the_exit_layer():
    msg = RunMessage(7, (1, 2, 3), (4, 5, 6), (2,), 2, (KVOp("cp", 0, dst=2),), exit_layer=3)
    decoded = decode_run(encode_run(msg))
    assert decoded == msg and decoded.exit_layer == 3
    assert decode_run(encode_run(msg.skipped())).exit_layer == 3
    plain = RunMessage(7, (1,), (4,), (0,), 0, ())
    assert decode_run(encode_run(plain)).exit_layer is None
    assert len(encode_run(plain)) == 6 + 2 + 1  # no exit layer: the layout of the other strategies


def test_early_exit_message_round_trip():
    message = EarlyExitMessage(12, 40, -1)
    body = encode_early_exit(message)
    assert decode_early_exit(body) == message
    assert describe(TAG_EARLY, body, False) == ("early-exit", 12)


@pytest.mark.parametrize("overrides, field", [
    (["executor.compute=emulated", "executor.early_exit=real"], "executor.early_exit=real"),
    (["executor.exit_adapter=/nonexistent/adapter.pt", "executor.early_exit=real"], "executor.exit_adapter="),
    (["executor.exit_adapter=shipped"], "needs executor.early_exit=real"),
])
def test_bad_speed_settings_are_one_clear_error(overrides, field):
    with pytest.raises(ExecutorSetupError, match=field) as info:
        make_plan(load_scenario(SPEED, overrides), 2)
    assert "\n" not in str(info.value)


def test_early_exit_defaults():
    assert make_plan(load_scenario(SPEED, ["executor.early_exit=null"]), 2).early_exit == "oracle"
    assert make_plan(load_scenario(SPEED, ["executor.compute=emulated"]), 2).early_exit == "oracle"
    plan = make_plan(load_scenario(SPEED, ["executor.early_exit=real"]), 2)
    assert plan.early_exit == "real" and not plan.oracle and plan.max_seqs == 17


# -- tiny random model, real compute, 2 ranks ---------------------------------------------------------------

def speed_variant(seed: int, exit_layer: int | None, alpha: float | None = None, early: str = "oracle") -> str:
    parts = [f"executor.seed={seed}", f"workload.seed={seed}"]
    if exit_layer is None:
        return ";".join([*parts, "strategy.name=iterative"])
    parts += [f"strategy.exit_layer={exit_layer}", f"executor.early_exit={early}"]
    if alpha is not None:
        parts.append(f"acceptance.alpha={alpha}")
    return ";".join(parts)


SPEED_VARIANTS = [
    *(speed_variant(seed, None) for seed in SEEDS),
    *(speed_variant(seed, k, alpha) for seed in SEEDS for k in EXIT_LAYERS for alpha in ALPHAS),
    *(speed_variant(seed, k, early="real") for seed in SEEDS for k in (0, 2)),
]


def make_adapter(path: Path, exit_layer: int) -> Path:
    """A (perturbed, so it changes the exit's predictions) ExitAdapter for the seed-0 tiny model."""
    import torch

    from pipesim.models.early_exit import ExitAdapter
    from pipesim.models.llama import LlamaStage
    from pipesim.models.tiny import make_tiny_model_weights, tiny_config

    model = LlamaStage.from_weights(tiny_config("tiny-llama"), make_tiny_model_weights("tiny-llama", seed=0))
    adapter = ExitAdapter.for_model(model, exit_layer + 1)  # the adapter counts layers: after layer k is k + 1
    with torch.no_grad():
        adapter.bias.copy_(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3)))
    return adapter.save(path)


ADAPTER_VARIANT = "executor.seed=0;workload.seed=0;strategy.exit_layer=1;executor.early_exit=real;" \
                  "executor.exit_adapter={path}"


@pytest.fixture(scope="module")
def speed_job(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("speed")
    adapter = make_adapter(tmp / "exit1.pt", 1)
    variants = [*SPEED_VARIANTS, ADAPTER_VARIANT.format(path=adapter)]
    entries = by_variant(run_job(SPEED, 2, variants, tmp, f"workload.generate_tokens={N_TOKENS}"))
    entries["adapter"] = entries.pop(variants[-1])
    return entries


@pytest.mark.mpi
def test_speed_greedy_output_equals_iterative(speed_job):
    for seed in SEEDS:
        baseline = speed_job[speed_variant(seed, None)]["metrics"]["output_tokens"]
        assert len(baseline) == N_TOKENS
        for k in EXIT_LAYERS:
            for alpha in ALPHAS:
                entry = speed_job[speed_variant(seed, k, alpha)]
                assert entry["metrics"]["output_tokens"] == baseline, (seed, k, alpha)
                assert entry["trace"]["meta"]["matches_reference"] is True
        for k in (0, 2):
            entry = speed_job[speed_variant(seed, k, early="real")]
            assert entry["metrics"]["output_tokens"] == baseline, (seed, k, "real")
            assert entry["trace"]["meta"]["early_exit"] == "real"


@pytest.mark.mpi
def test_a_trained_exit_adapter_is_used_and_output_stays_exact(speed_job):
    entry = speed_job["adapter"]
    assert entry["metrics"]["output_tokens"] == speed_job[speed_variant(0, None)]["metrics"]["output_tokens"]
    assert entry["trace"]["meta"]["early_exit"] == "real" and entry["metrics"]["runs_speculative"] > 0


@pytest.mark.mpi
def test_speed_acceptance_and_cancellations_follow_alpha(speed_job):
    for seed in SEEDS:
        for k in EXIT_LAYERS:
            wrong = speed_job[speed_variant(seed, k, 0.0)]["metrics"]
            assert wrong["drafted_accepted"] == 0 and wrong["runs_cancelled"] > 0, (seed, k)
            assert speed_job[speed_variant(seed, k, 0.5)]["metrics"]["runs_cancelled"] > 0, (seed, k)
            right = speed_job[speed_variant(seed, k, 1.0)]["metrics"]
            assert right["acceptance_rate"] >= 0.9 and right["runs_speculative"] >= N_TOKENS - 2, (seed, k)


@pytest.mark.mpi
def test_early_exits_come_from_the_rank_holding_the_exit_layer(speed_job):
    for k, node in ((1, "n0"), (2, "n1")):
        records = speed_job[speed_variant(0, k, 0.5)]["trace"]["records"]
        exits = {r[3] for r in records if r[0] == "compute" and r[9] == "exit" and r[10] == k}
        assert exits == {node}, k
        early_transfers = [r for r in records if r[0] == "transfer" and r[9] == "early-exit"]
        assert bool(early_transfers) == (node == "n1")
        assert all(r[3] == "n1->n0" for r in early_transfers)


# -- SmolLM2-135M with the real early exit --------------------------------------------------------------------

def _shipped_adapter_layers() -> set[int]:
    table = ROOT / "pipesim" / "data" / "exit_adapters" / "acceptance.json"
    if not table.is_file():
        return set()
    return {int(k) for k in json.loads(table.read_text()).get("smollm2", {}).get("layers", {})}


@pytest.mark.mpi
@pytest.mark.smollm2
def test_smollm2_speed_with_the_real_early_exit_equals_iterative(tmp_path):
    if find_model("smollm2") is None:
        pytest.skip("SmolLM2-135M GGUF not fetched: run `pipesim models fetch smollm2`")
    exit_layer = 12  # on rank 0 (layers 0-14)
    real = f"strategy.name=speed;strategy.exit_layer={exit_layer};strategy.n_partitions=16"
    variants = ["strategy.name=iterative", real, real.replace(f"exit_layer={exit_layer}", "exit_layer=20")]
    if exit_layer + 1 in _shipped_adapter_layers():  # the adapter module counts layers (exit after layer k: k+1)
        variants.append(f"{real};executor.exit_adapter=shipped")
    entries = by_variant(run_job(SMOLLM2, 2, variants, tmp_path, "workload.generate_tokens=12"))
    baseline = entries[variants[0]]["metrics"]
    for variant in variants[1:]:
        metrics = entries[variant]["metrics"]
        assert metrics["output_tokens"] == baseline["output_tokens"], variant
        assert entries[variant]["trace"]["meta"]["early_exit"] == "real"
        assert metrics["runs_speculative"] > 0


# -- emulated compute: 8 ranks --------------------------------------------------------------------------------

EMULATED = """
name: emulated-speed-8
models: {target: llama-2-7b, target_quantization: q4_k_m}
cluster: {count: 8, flops: 20T, memory_bandwidth: 1TB/s}
network: {bandwidth: 10Gbit/s, latency: 50us}
acceptance: {alpha: 0.7}
workload: {prompt_tokens: 32, generate_tokens: 40}
strategy: {name: speed, exit_layer: 8, n_partitions: 16}
executor: {compute: emulated, timeout_s: 60}
"""


@pytest.mark.mpi
def test_emulated_speed_on_8_ranks(tmp_path):
    scenario = tmp_path / "emulated.yaml"
    scenario.write_text(EMULATED)
    variants = ["strategy.name=iterative", "strategy.exit_layer=8", "strategy.exit_layer=2;acceptance.alpha=0.3",
                "strategy.exit_layer=20;executor.link_emulation=true;head.return_mode=topk"]
    entries = run_job(scenario, 8, variants, tmp_path)
    baseline = entries[0]["metrics"]["output_tokens"]
    for entry in entries:
        assert entry["trace"]["meta"]["matches_reference"] is True, entry["variant"]
        assert entry["metrics"]["output_tokens"] == baseline
    for entry, node in zip(entries[1:], ("n2", "n0", "n5"), strict=True):
        exits = {r[3] for r in entry["trace"]["records"] if r[0] == "compute" and r[9] == "exit"}
        assert exits == {node}, entry["variant"]
        assert entry["metrics"]["runs_speculative"] > 0
    assert entries[2]["metrics"]["runs_cancelled"] > 0
    assert np.isfinite(entries[1]["metrics"]["tokens_per_s"])
