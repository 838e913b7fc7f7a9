"""What a message costs and what a metric means, from outside the engines: the executor's real frames, numbers
computed by hand from the model shape, and traces written by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipesim.executor.protocol import RunMessage, encode_cancel, encode_run, frame, predictions_from_ids
from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.scheduling import KVOp, Run
from pipesim.scheduling.records import Record
from pipesim.sim import simulate
from pipesim.trace import Trace
from pipesim.world.build import build_world

DEFAULT = "pipesim/data/default.yaml"  # Llama-2-7B: d_model 4096, vocab 32000


def _frame_bytes(body, payload=None) -> int:
    """Bytes of a message as the executor sends it (its int64 frame, then its float32 payload)."""
    data = frame(body, 0.0, payload)
    return data.nbytes + (payload.nbytes if payload is not None else 0)


@pytest.mark.parametrize("mode,per_output", [("logits", 32000 * 4), ("topk", 8 * (8 + 4)), ("ids", 8)])
def test_prediction_bytes_are_the_executors_frames(mode, per_output):
    payloads = build_world(load_scenario(DEFAULT, [f"head.return_mode={mode}"])).target.payloads
    for n in (1, 5):
        message = predictions_from_ids(7, list(range(n)), mode, 32000, 8)
        body, payload = message.encode()
        assert payloads.predictions(n) == _frame_bytes(body, payload)
        assert payloads.predictions(n) == 8 * (3 + 4) + n * per_output  # by hand: prefix, header, per output


def test_run_and_cancel_bytes_are_the_executors_frames():
    payloads = build_world(load_scenario(DEFAULT)).target.payloads
    run = Run(run_id=3, tokens=[5, 6, 7], positions=[40, 41, 42], seq_ids=(2,), speculative=True,
              kv_ops=(KVOp("cp", 0, dst=2), KVOp("rm", 1)))
    message = RunMessage.of_run(run)
    activations = np.zeros((3, 4096), dtype=np.float32)
    assert payloads.activations(3, 2) == _frame_bytes(encode_run(message), activations.reshape(-1))
    assert payloads.header(3, 2) == _frame_bytes(encode_run(message.skipped()))
    assert payloads.activations(3, 2) == 8 * (3 + 6 + 2 * 3 + 1 + 5 * 2) + 3 * 4096 * 4
    assert payloads.cancel(4) == _frame_bytes(encode_cancel([1, 2, 3, 4])) == 8 * (3 + 4)


def test_runs_speculative_counts_the_runs_that_carry_drafted_tokens():
    speculative = compute_metrics(simulate(load_scenario(DEFAULT, ["strategy.name=speculative"])))
    # every verification run carries gamma drafted tokens (the oracle never stops early); the prefill none
    assert speculative["runs_speculative"] == speculative["runs_launched"] - 1 > 0
    iterative = compute_metrics(simulate(load_scenario(DEFAULT, ["strategy.name=iterative"])))
    assert iterative["runs_speculative"] == 0 and iterative["runs_launched"] == 128


def _hand_trace() -> Trace:
    """Two nodes; commits of 1, 3 and 2 tokens at 1.0, 2.0 and 4.0 s; run 2 invalidated after computing."""
    R = Record
    records = [
        R("launch", 0.0, 0.0, "n0", 1, 4, what="prefill"),
        R("compute", 0.0, 0.5, "n0", 1, 4, what="stage", stage=0),
        R("compute", 0.5, 1.0, "n1", 1, 4, what="stage", stage=1),
        R("tokens", 1.0, 1.0, "n0", -1, 1),
        R("launch", 1.0, 1.0, "n0", 2, 3, what="verify", speculative=True),
        R("compute", 1.0, 1.5, "n0", 2, 3, what="stage", stage=0),
        R("compute", 1.5, 1.75, "n1", 2, 3, what="stage", stage=1, aborted=True),
        R("invalidate", 1.75, 1.75, "n0", 2),
        R("compute", 1.2, 1.4, "n0", -1, 1, what="draft"),  # inside stage 0's span: counted once
        R("tokens", 2.0, 2.0, "n0", -1, 3, checked=3, accepted=2),
        R("launch", 2.0, 2.0, "n0", 3, 2, what="decode"),
        R("compute", 2.0, 3.0, "n0", 3, 2, what="stage", stage=0),
        R("transfer", 3.0, 3.5, "n0->n1", 3, nbytes=100.0, what="activations"),
        R("tokens", 4.0, 4.0, "n0", -1, 2, checked=2, accepted=0),
    ]
    return Trace(engine="simulated", strategy="x", scenario="hand", nodes=["n0", "n1"], t_start=0.0, t_end=4.0,
                 records=records)


def test_metrics_mean_what_the_readme_says():
    m = compute_metrics(_hand_trace())
    assert m["generated_tokens"] == 6
    assert m["tokens_per_s"] == pytest.approx(5 / 3.0)  # tokens after the first over the time since it
    assert m["e2e_tokens_per_s"] == pytest.approx(6 / 4.0)
    assert m["ttft_s"] == pytest.approx(1.0)
    # ITL: the 3 tokens of the second commit share its 1 s gap, the 2 of the third its 2 s gap
    assert m["itl_mean_s"] == pytest.approx((3 * (1 / 3) + 2 * 1.0) / 5)
    assert m["acceptance_rate"] == pytest.approx(2 / 5) and (m["drafted_checked"], m["drafted_accepted"]) == (5, 2)
    assert m["runs_launched"] == 3 and m["runs_speculative"] == 1 and m["runs_invalidated"] == 1
    assert m["stage_work_aborted"] == 1
    # target compute: 0.5 + 0.5 + 0.5 + 0.25 + 1.0 = 2.75 s, of which run 2's 0.75 s was wasted
    assert m["wasted_compute_fraction"] == pytest.approx(0.75 / 2.75)
    assert m["node_utilization"]["n0"] == pytest.approx(2.0 / 4.0)  # 0-0.5, 1-1.5 (the draft inside), 2-3
    assert m["node_utilization"]["n1"] == pytest.approx(0.75 / 4.0)
    assert m["link_utilization"]["n0->n1"] == pytest.approx(0.5 / 4.0)
    # the reference codes' definitions: PipeInfer from the first token to the second, and all 6 tokens over the
    # 3 s since the first; PipeSpec 4 s over 6 tokens
    assert m["reference_ttft_s"] == pytest.approx(1.0)
    assert m["reference_decode_tokens_per_s"] == pytest.approx(6 / 3.0)
    assert m["ms_per_token"] == pytest.approx(1000 * 4.0 / 6)
