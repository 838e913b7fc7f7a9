"""PipeInfer's reference KV transactions as real messages in the executor (``executor/kv_relay.py``).

The counts are hand-counted from the loops of ``speculative.cpp`` (``main``, ``start_async_spec_run``,
``begin_async_run``) for a small pool: with ``n_partitions = P`` the code's ``max_seq`` is ``P + 1``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipesim.executor.kv_relay import TransactionInbox
from pipesim.executor.protocol import ProtocolError, encode_kv_transaction
from pipesim.scheduling import KVOp
from pipesim.scheduling.strategies.pipeinfer import reference_kv_transaction_ops, reference_kv_transactions

ROOT = Path(__file__).resolve().parents[1]
P = 2  # partitions of the emulated run: max_seq = 3, sequence ids 0..3
# by hand, P = 2: a speculative launch removes, copies and removes its one sequence (3); a verification removes
# the run's tail (1), replaces sequence 0's range (2) and mirrors it into sequences 1..3 (2 x 3); a
# non-speculative run removes sequences 0..3 at its position (4) and then copies sequence 0 to 1..3 (3)
SPEC, VERIFY, BEFORE, AFTER = 3, 1 + 2 + 2 * 3, 4, 3


def test_the_operations_are_the_counted_transactions():
    counts = reference_kv_transactions(P)
    assert counts == {"spec_launch": SPEC, "verify": VERIFY, "nonspec_before": BEFORE, "nonspec_after": AFTER}
    where = {"spec_launch": (2, 1, 9, 10), "verify": (1, 5, 8), "nonspec_before": (7,), "nonspec_after": (7,)}
    for occasion, count in counts.items():
        assert len(reference_kv_transaction_ops(occasion, where[occasion], P)) == count
    # the default pool of the paper's code: thousands per verification
    assert len(reference_kv_transaction_ops("verify", (1, 5, 8), 1000)) == 1 + 2 + 2 * 1001
    assert reference_kv_transaction_ops("nonspec_before", (7,), P) == [KVOp("rm", s, p0=7, p1=8) for s in range(4)]
    assert reference_kv_transaction_ops("nonspec_after", (7,), P) == [KVOp("cp", 0, s, 7, 8) for s in (1, 2, 3)]
    assert reference_kv_transaction_ops("spec_launch", (2, 1, 9, 10), P) == [
        KVOp("rm", 2, p0=9, p1=None), KVOp("cp", 1, 2, 9, 10), KVOp("rm", 2, p0=10, p1=11)]
    verify = reference_kv_transaction_ops("verify", (1, 5, 8), P)
    assert verify[:3] == [KVOp("rm", 1, p0=8, p1=None), KVOp("rm", 0, p0=5, p1=8), KVOp("cp", 1, 0, 5, 8)]
    assert verify[3:] == [op for s in (1, 2, 3) for op in (KVOp("rm", s, p0=5, p1=8), KVOp("cp", 0, s, 5, 8))]


def test_a_stage_takes_a_runs_transactions_in_order_or_says_what_is_missing():
    inbox = TransactionInbox()
    for index in range(3):
        inbox.arrived(encode_kv_transaction(4, index, KVOp("rm", index, p0=1, p1=2)))
    assert inbox.take(4, 2) == [KVOp("rm", 0, p0=1, p1=2), KVOp("rm", 1, p0=1, p1=2)]
    with pytest.raises(ProtocolError, match="transaction 2 of run 4 where transaction 0 of run 5"):
        inbox.take(5, 1)
    with pytest.raises(ProtocolError, match="run 6 announces 1 KV transactions, 0 arrived"):
        inbox.take(6, 1)
    with pytest.raises(ProtocolError, match="is not"):
        TransactionInbox().arrived(np.asarray([1, 2, 3], dtype=np.int64))


EMULATED = """
name: emulated-kv-relay
models: {target: llama-2-7b, target_quantization: q4_k_m, draft: tinyllama-1.1b, draft_quantization: q4_k_m}
cluster: {count: 3, flops: 20T, memory_bandwidth: 1TB/s}
network: {bandwidth: 10Gbit/s, latency: 50us}
acceptance: {alpha: 0.7}
workload: {prompt_tokens: 16, generate_tokens: 16}
strategy: {name: pipeinfer}
executor: {compute: emulated, timeout_s: 60}
"""


def hand_counts(p: int) -> tuple[int, int, int, int]:
    """(speculative launch, verification, before and after a single-token run) for ``p`` partitions, from the
    code's loops: max_seq = p + 1, sequences 0..max_seq."""
    max_seq = p + 1
    return 3, 1 + 2 + 2 * max_seq, max_seq + 1, max_seq


@pytest.mark.mpi
def test_every_link_carries_the_hand_counted_transactions_of_each_run(tmp_path):
    scenario = tmp_path / "emulated.yaml"
    scenario.write_text(EMULATED)
    saved = tmp_path / "trace.json"
    pools = (P, 200)  # 200: bursts of hundreds, which the stages start passing on before their run arrives
    argv = [sys.executable, "-m", "pipesim.cli", "run", str(scenario), "--ranks", "3", "--json", "--save-trace",
            str(saved)]
    for pool in pools:
        argv += ["--variant", f"strategy.n_partitions={pool}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads(saved.read_text())
    assert hand_counts(P) == (SPEC, VERIFY, BEFORE, AFTER)
    for pool, entry in zip(pools, entries, strict=True):
        check_messages(entry, *hand_counts(pool))


def check_messages(entry: dict, spec: int, verify: int, before: int, after: int) -> None:
    assert entry["trace"]["meta"]["matches_reference"] is True
    records = entry["trace"]["records"]
    kinds = {r[4]: r[9] for r in records if r[0] == "launch"}
    announced = {r[4]: r[5] for r in records if r[0] == "compute" and r[9] == "kv" and r[3] == "n0"}
    # what each run can carry, by hand: a speculative run its launch, after the copies of the single-token run
    # before it (if no run was launched in between); a single-token run its removals, after a verification and
    # those copies
    allowed = {"spec": {spec, after + spec},
               "decode": {before, verify + before, after + before, after + verify + before}}
    assert announced and all(n in allowed[kinds[run]] for run, n in announced.items()), (announced, kinds)
    assert {kinds[run] for run in announced} == {"spec", "decode"}
    messages: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r[0] == "transfer" and r[9] == "kv-transaction":
            messages[r[3]][r[4]] += r[5]  # consecutive ones of a run fold into one record, counting them
    applied: Counter = Counter()  # a stage relays what arrived before the run, the run the rest
    for r in records:
        if r[0] == "compute" and r[9] == "kv":
            applied[(r[3], r[4])] += r[5]
    # every run the last stage reached (computed or skipped) before the end: each of its transactions crossed each
    # link as a message of its own and was applied by every stage (the trace ends with the head's last token)
    reached = {r[4] for r in records if r[3] == "n2" and (r[0] == "skip" or (r[0] == "compute" and r[9] == "stage"))}
    finished = [run for run in announced if run in reached]
    assert len(finished) >= len(announced) - 2
    for run in finished:
        assert messages["n0->n1"][run] == messages["n1->n2"][run] == announced[run]
        assert applied[("n1", run)] == applied[("n2", run)] == announced[run]
    assert not messages["n0->n2"] and not messages["n2->n0"]  # they travel down the pipeline only
