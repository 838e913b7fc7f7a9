"""Executor pieces without MPI: protocol layouts, clock offsets, link emulation, drafts, pre-flight checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipesim.executor.clock import offset_from_samples
from pipesim.executor.commands import rank_arguments
from pipesim.executor.drafts import Drafter, EmulatedRunner, FreeRunner, ReferenceTokens
from pipesim.executor.emulation import LinkEmulator
from pipesim.executor.errors import ExecutorSetupError
from pipesim.executor.launcher import find_mpiexec, launch_command
from pipesim.executor.options import load_variants, variant_overrides
from pipesim.executor.plan import make_plan
from pipesim.executor.protocol import (
    TAG_RUN,
    PredictionMessage,
    RunMessage,
    decode_cancel,
    decode_predictions,
    decode_run,
    describe,
    encode_cancel,
    encode_run,
    frame,
    predictions_from_ids,
    unframe,
)
from pipesim.models.fetch import find_model
from pipesim.scenario import load_scenario
from pipesim.scheduling import KVOp, RequestDraft
from pipesim.world.acceptance import AcceptanceModel, OracleDraft
from pipesim.world.costs import NodeProfile, RooflineCostModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "local-tiny.yaml"


# -- protocol ---------------------------------------------------------------------------------------------

def test_run_message_round_trip_with_kv_ops():
    ops = (KVOp("cp", 0, dst=3), KVOp("rm", 2, p0=5, p1=9), KVOp("keep", 0), KVOp("rm", 0, p0=7))
    msg = RunMessage(42, (5, 6, 7), (10, 11, 12), (3,), 1, ops)
    assert decode_run(encode_run(msg)) == msg
    skipped = decode_run(encode_run(msg.skipped()))
    assert not skipped.computed and skipped.kv_ops == ops and skipped.tokens == msg.tokens
    stop = decode_run(encode_run(RunMessage.stop_message()))
    assert stop.stop and not stop.computed


def test_frame_carries_send_time_and_payload_size():
    body = encode_cancel([4, 5, 6])
    payload = np.ones(10, dtype=np.float32)
    sent, count, rest = unframe(frame(body, 123.456789, payload))
    assert sent == pytest.approx(123.456789, abs=1e-9)
    assert count == 10 and decode_cancel(rest) == (4, 5, 6)
    assert unframe(frame(body, 1.0, None))[1] == -1


@pytest.mark.parametrize("mode", ["logits", "topk", "ids"])
def test_predictions_in_every_return_mode_decode_to_the_argmax(mode):
    ids = [7, 0, 255, 19]
    message = predictions_from_ids(9, ids, mode, vocab_size=256, top_k=4)
    body, payload = message.encode()
    decoded = decode_predictions(body, payload)
    assert decoded.run_id == 9 and decoded.greedy() == ids


def test_real_logits_argmax_and_topk():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    expected = list(np.argmax(logits, axis=1))
    assert PredictionMessage(1, "logits", 3, 50, None, logits).greedy() == expected
    order = np.argsort(-logits, axis=1)[:, :4]
    values = np.take_along_axis(logits, order, axis=1)
    shuffled = order[:, ::-1].copy(), values[:, ::-1].copy()  # the head must not rely on the order
    assert PredictionMessage(1, "topk", 3, 4, shuffled[0], shuffled[1]).greedy() == expected


def test_transfer_notes_follow_the_simulator():
    run = encode_run(RunMessage(3, (1,), (0,), (0,), 0, ()))
    assert describe(TAG_RUN, run, has_payload=True) == ("activations", 3)
    assert describe(TAG_RUN, run, has_payload=False) == ("header", 3)


# -- clock and links --------------------------------------------------------------------------------------

def test_clock_offset_uses_the_least_rtt_sample():
    # remote clock = local + 5.0; the noisy sample (long RTT, asymmetric) must not win
    samples = [(0.0, 5.9, 2.0), (10.0, 15.0005, 10.001), (20.0, 25.3, 20.4)]
    assert offset_from_samples(samples) == pytest.approx(5.0, abs=1e-3)


def test_link_emulation_is_a_fifo_per_direction():
    scenario = load_scenario(TINY, ["network.bandwidth=8Mbit/s", "network.latency=1ms"])
    link = LinkEmulator(scenario, ["n0", "n1"])
    start, end, arrival = link.arrival(0, 1, 0.0, 1000)  # 1000 B at 1 MB/s: 1 ms on the wire
    assert (start, end, arrival) == pytest.approx((0.0, 0.001, 0.002))
    start2, _, arrival2 = link.arrival(0, 1, 0.0005, 1000)  # queued behind the first
    assert start2 == pytest.approx(0.001) and arrival2 == pytest.approx(0.003)
    assert link.arrival(1, 0, 0.0005, 1000)[0] == pytest.approx(0.0005)  # the other direction is free


# -- drafts -----------------------------------------------------------------------------------------------

def _oracle(alpha: float, reference: list[int]) -> OracleDraft:
    return OracleDraft(ReferenceTokens(reference, 256), AcceptanceModel("iid", alpha, seed=3))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_oracle_draft_proposes_reference_tokens_with_probability_alpha(alpha):
    reference = list(range(100, 140))
    drafter = Drafter(FreeRunner(), _oracle(alpha, reference))
    task = drafter.begin(RequestDraft(1, tuple(reference[:10]), 4, 10))
    while not task.done:
        task.step()
    right = [t == reference[10 + i] for i, t in enumerate(task.tokens)]
    assert len(task.tokens) == 4 and all(r == (alpha == 1.0) for r in right)


def test_oracle_decisions_are_fixed_per_position():
    reference = list(range(100, 200))
    first = [_oracle(0.5, reference).propose(reference[:n], 1, n).tokens[0] for n in range(20, 60)]
    again = [_oracle(0.5, reference).propose(reference[:n], 1, n).tokens[0] for n in range(20, 60)]
    assert first == again and 0 < sum(t == reference[20 + i] for i, t in enumerate(first)) < 40


def test_draft_runner_rewinds_to_the_common_prefix():
    runner = FreeRunner()
    assert runner.rewind([1, 2, 3]) == [1, 2, 3]
    runner.feed([1, 2, 3])
    runner.feed([4])
    assert runner.rewind([1, 2, 3, 4, 5]) == [5]  # 1..4 cached
    assert runner.rewind([1, 2, 9]) == [9] and runner.cached == [1, 2]


def test_emulated_draft_step_sleeps_its_roofline_cost():
    import time

    from pipesim.models.catalog import get_model_spec

    node = NodeProfile("n0", 1e9, 1e9, overhead_per_run=0.01)
    cost = RooflineCostModel(get_model_spec("tiny-llama"), 4.0)
    runner = EmulatedRunner(cost, node, time.perf_counter)
    start = time.perf_counter()
    runner.feed([1, 2, 3])
    assert time.perf_counter() - start >= cost.model_cost(node, 3, 0) > 0.01
    assert runner.cached == [1, 2, 3]


def test_model_runner_rolls_back_its_kv_cache():
    pytest.importorskip("torch")
    from pipesim.executor.torch_backend import ModelRunner
    from pipesim.models.llama import greedy_generate
    from pipesim.models.tiny import build_tiny_stage, make_tiny_model_weights

    model = build_tiny_stage(make_tiny_model_weights(seed=0))
    prompt = [3, 17, 250, 9]
    expected = greedy_generate(model, prompt, 4)
    runner = ModelRunner(model, 64)
    task = Drafter(runner).begin(RequestDraft(1, tuple(prompt), 4, 4))
    while not task.done:
        task.step()
    assert task.tokens == expected
    # a rejected draft: the context continues differently after 2 tokens; the cache rolls back
    context = (*prompt, expected[0], (expected[1] + 1) % 256)
    task = Drafter(runner).begin(RequestDraft(2, context, 2, len(context)))
    while not task.done:
        task.step()
    assert runner.kv.seq_positions(0) == list(range(len(context) + 1))
    assert task.tokens == greedy_generate(model, list(context), 2)


# -- pre-flight checks ------------------------------------------------------------------------------------

def test_plan_of_the_tiny_scenario():
    plan = make_plan(load_scenario(TINY), 2)
    assert plan.layer_ranges == [(0, 2), (2, 4)] and plan.target.kind == "tiny"
    # PipeInfer's reference relays the code's loops over sequences 0..max_seq, max_seq = n_partitions + 1
    assert plan.max_seqs == plan.scenario.strategy.n_partitions + 2
    compact = make_plan(load_scenario(TINY, ["strategy.kv_transactions=compact"]), 2)
    assert compact.max_seqs == compact.scenario.strategy.n_partitions + 1


@pytest.mark.parametrize("overrides, ranks, message", [
    ([], 3, "3 ranks do not match cluster.count=2"),
    (["executor.model=/nonexistent/model.gguf"], 2, "executor.model='/nonexistent/model.gguf': model file not found"),
    (["cluster.count=5", "models.target=llama-2-7b"], 5, "5 ranks is more pipeline stages than the 4 layers"),
    (["executor.draft=model"], 2, "executor.draft=model needs executor.draft_model"),
    (["executor.compute=emulated", "executor.oracle_cost=model", "executor.draft_model=tiny-llama"], 2,
     "needs executor.compute=real"),
    (["executor.prompt=hello"], 2, "has no tokenizer"),
    (["executor.fault_rank=7"], 2, "executor.fault_rank=7 is not a rank"),
    (["strategy.name=speed", "strategy.exit_layer=1", "executor.compute=emulated", "executor.early_exit=real"], 2,
     "executor.early_exit=real runs the model's own head: it needs executor.compute=real"),
])
def test_bad_input_is_one_clear_error(overrides, ranks, message):
    with pytest.raises(ExecutorSetupError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        make_plan(load_scenario(TINY, overrides), ranks)
    assert "\n" not in str(info.value)


def test_smollm2_plan_reads_the_gguf_header():
    if find_model("smollm2") is None:
        pytest.skip("SmolLM2 GGUF not fetched (pipesim models fetch smollm2)")
    plan = make_plan(load_scenario(ROOT / "scenarios" / "local-smollm2.yaml"), 2)
    assert (plan.target.n_layers, plan.target.vocab_size) == (30, 49152)
    assert plan.target.has_tokenizer and plan.target.has_chat_template


# -- front end --------------------------------------------------------------------------------------------

def test_variants_and_rank_arguments():
    assert variant_overrides("strategy.name=pipeinfer; acceptance.alpha=0.3;") == [
        "strategy.name=pipeinfer", "acceptance.alpha=0.3"]
    variants = load_variants(TINY, ["workload.generate_tokens=8"], "speculative",
                             ["acceptance.alpha=0", "acceptance.alpha=1"], timeout=9)
    assert [s.acceptance.alpha for _, s in variants] == [0.0, 1.0]
    assert all(s.strategy.name == "speculative" and s.executor.timeout_s == 9 for _, s in variants)

    from pipesim.cli import build_parser

    args = build_parser().parse_args(["run", str(TINY), "--ranks", "2", "--set", "a.b=1", "--variant", "x=1;y=2",
                                      "--json", "--save-trace", "out.json"])
    argv = rank_arguments(args)
    assert argv[0] == str(TINY) and "--json" in argv and argv[argv.index("--variant") + 1] == "x=1;y=2"
    assert argv[argv.index("--save-trace") + 1] == "out.json"


def test_mpiexec_is_found_next_to_python_first():
    command = launch_command(3, ["s.yaml"], mpiexec=find_mpiexec())
    assert command[1:4] == ["-n", "3", sys.executable] and command[-3:] == ["-m", "pipesim.executor", "s.yaml"][-3:]
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        assert find_mpiexec() == str(beside)


def test_front_end_imports_neither_torch_nor_mpi4py():
    code = ("import sys, pipesim.cli, pipesim.executor.commands, pipesim.executor_config; "
            "pipesim.cli.build_parser(); "
            "bad = [m for m in ('torch', 'mpi4py') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

