"""A pipeline's head rank: its first stage, the draft, and the shared ``HeadDriver``, on wall time and MPI.

Every decision (the head's priority order, what to launch, skip or cancel, abandoning a draft no longer wanted)
is the driver's; this module is the driver's port on real processes: the clock, MPI messages down the pipeline,
messages to the other levels of a PipeSpec chain, and the draft's steps. Rank 0 is the head of the single
pipeline of every one-model strategy; in a chain, each level's first rank heads that level's pipeline.
Predictions are reduced to greedy ids (argmax of what returns) before the strategy sees them; an oracle level of
a chain replaces them with the oracle's (``predict``). SPEED's early predictions (from the rank holding a run's
exit layer, or from the head's own stage) arrive in the driver's results in arrival order; one asking the
oracle (token -1) gets the simulator's oracle token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..scheduling import Run, Strategy
from ..scheduling.driver import DRAFT, STAGE0, VERIFY, HeadDriver
from ..trace import Record
from .backend import StageBackend
from .clock import Clock
from .drafts import Drafter, DraftTask
from .emulation import charge_kv_transactions, sleep_until
from .errors import ExecutorTimeout, InjectedFault
from .kv_relay import relay, run_transactions
from .messaging import Messenger
from .protocol import (
    TAG_CANCEL,
    TAG_CHAIN,
    TAG_DISCARD,
    TAG_DRAFT,
    TAG_EARLY,
    TAG_PRED,
    TAG_RUN,
    PredictionMessage,
    ProtocolError,
    RunMessage,
    decode_chain,
    decode_early_exit,
    decode_predictions,
    encode_cancel,
    encode_chain,
    encode_run,
)
from .remote_draft import RemoteDrafter


@dataclass
class HeadOutcome:
    """What a head measured: the committed tokens and its clock at start and finish."""

    output_tokens: list[int]
    t_start: float
    t_end: float
    max_partitions_used: int = 0


class Head:
    """The loop of a pipeline's head for one generation.

    ``pipeline``: the ranks of its pipeline, itself first; ``level_heads``: the head rank of every level of a
    chain (``[0]`` for a one-model strategy; the last is the target's).
    """

    def __init__(self, strategy: Strategy, pipeline: Sequence[int], level_heads: Sequence[int], level: int,
                 backend: StageBackend, drafter: Drafter | RemoteDrafter | None, messenger: Messenger, clock: Clock,
                 records: list[Record], node_name: str, deadline: float, verify_sleep: float = 0.0,
                 fault: bool = False, early_oracle: Callable[[int, int | None], int] | None = None,
                 predict: Callable[[Run], list[int]] | None = None, kv_transaction_time: float = 0.0,
                 kv_messages: bool = True) -> None:
        self.pipeline = list(pipeline)
        self.kv_transaction_time = kv_transaction_time
        self.kv_messages = kv_messages  # relayed KV transactions as real messages (else a modelled charge)
        self.records = records
        self.level_heads = list(level_heads)
        self.level = level
        self.is_target = level == len(self.level_heads) - 1
        self.backend = backend
        self.drafter = drafter
        self.remote_draft = isinstance(drafter, RemoteDrafter)  # its rank records the draft's compute
        self.messenger = messenger
        self.clock = clock
        self.name = node_name
        self.deadline = deadline
        self.verify_sleep = verify_sleep
        self.fault = fault
        self.early_oracle = early_oracle  # SPEED: the oracle's early prediction for a position after a token
        self.predict = predict  # an oracle level of a chain: its predictions for a run
        self.runs: dict[int, Run] = {}  # runs that left the head, for the oracle's predictions
        self.stopped = False  # FINISH from the target's head (chains)
        self.driver = HeadDriver(strategy, self, node_name, len(self.pipeline), records, level)

    def run(self, progress: Callable[[int], None] | None = None) -> HeadOutcome:
        """Generate until the strategy finishes; then stop the pipeline (the target's head tells the others).
        ``progress(n)`` is told each time the committed output has grown to ``n`` tokens."""
        driver = self.driver
        t_start = self.clock.now()
        driver.start()
        shown = 0
        while not driver.finished and not self.stopped:
            if progress is not None and len(driver.output) != shown:
                shown = len(driver.output)
                progress(shown)
            if time.monotonic() > self.deadline:
                where = f"level {self.level}: " if len(self.level_heads) > 1 else ""
                raise ExecutorTimeout(f"{where}generation did not finish in time ({len(driver.output)} tokens so far; "
                                      f"{self.messenger.silence()})")
            self._pump()
            if self.stopped:
                break
            work = driver.next_work()
            if work is None:
                what = driver.waiting_for()
                if what is None:
                    raise RuntimeError("scheduling stalled: no run in flight, nothing to launch or draft, not finished")
                self.messenger.wait(self.deadline, f"level {self.level}: {what}" if len(self.level_heads) > 1
                                    else what)
                continue
            kind, item = work
            start = self.clock.now()
            if kind is VERIFY:
                if self.verify_sleep > 0:
                    sleep_until(start + self.verify_sleep, self.clock.now)
                driver.verify(item, start)
            elif kind is STAGE0:
                self._launch(item)
            else:
                assert kind is DRAFT
                batch = item.step()
                driver.draft_step_done(item, start, batch, remote=self.remote_draft)
        t_end = self.clock.now()
        if self.drafter is not None:
            self.drafter.close()
        if self.is_target:
            for rank in self.level_heads[:-1]:
                self.messenger.send(rank, TAG_CHAIN, encode_chain(None))
        if len(self.pipeline) > 1:
            self.messenger.send(self.pipeline[1], TAG_RUN, encode_run(RunMessage.stop_message()))
        return HeadOutcome(driver.output, t_start, t_end, driver.max_partitions_used)

    # -- the driver's port -----------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock.now()

    def drop(self, run: Run, send_header: bool) -> None:
        msg = RunMessage.of_run(run)
        self._kv_transactions(run, msg)
        self.backend.apply_kv_ops(msg.kv_ops)
        if self.fault:
            raise InjectedFault(f"injected fault at run {run.run_id} (executor.fault_rank={self.pipeline[0]})")
        if send_header:
            self.messenger.send(self.pipeline[1], TAG_RUN, encode_run(msg.skipped()))

    def send_cancel(self, run_ids: tuple[int, ...]) -> None:
        self.messenger.send(self.pipeline[-1], TAG_CANCEL, encode_cancel(run_ids))

    def send_to_level(self, message) -> None:
        self.messenger.send(self.level_heads[message.to_level], TAG_CHAIN, encode_chain(message))

    def begin_draft(self, request) -> DraftTask:
        if self.drafter is None:
            raise RuntimeError(f"strategy {self.driver.strategy.name!r} requested a draft but none is configured")
        return self.drafter.begin(request)

    def end_draft(self, task: DraftTask) -> None:
        """The runner keeps what it processed cached."""

    def finish(self) -> None:
        """The driver's ``finished`` ends the loop."""

    # -- messages --------------------------------------------------------------------------------------
    def _pump(self) -> None:
        self.messenger.poll()
        driver = self.driver
        while (envelope := self.messenger.take()) is not None:
            if envelope.tag == TAG_DISCARD:  # the full logits of a run nobody computed: read, then dropped
                continue
            if envelope.tag == TAG_PRED:
                self._on_predictions(decode_predictions(envelope.body, envelope.payload))
            elif envelope.tag == TAG_EARLY:
                message = decode_early_exit(envelope.body)
                token = message.token
                if token < 0:
                    if self.early_oracle is None:
                        raise RuntimeError("an early exit asks the head's oracle, but none is configured")
                    run = self.runs.get(message.run_id)
                    token = self.early_oracle(message.position, run.tokens[-1] if run is not None else None)
                driver.early_exit_arrived(message.run_id, token)
            elif envelope.tag == TAG_DRAFT and self.remote_draft:
                self.drafter.arrived(envelope.body)
            elif envelope.tag == TAG_CHAIN:
                message = decode_chain(envelope.body)
                if message is None:  # FINISH from the target's head
                    self.stopped = True
                else:
                    driver.message_arrived(message)
            else:
                raise ProtocolError(f"level {self.level} head: unexpected tag {envelope.tag} "
                                    f"from rank {envelope.source}")

    def _on_predictions(self, message: PredictionMessage) -> None:
        run = self.runs.pop(message.run_id, None)
        greedy = message.greedy()
        if self.predict is not None and run is not None:
            greedy = self.predict(run)
        self.driver.predictions_arrived(message.run_id, greedy, message.n_outputs)

    # -- work ------------------------------------------------------------------------------------------
    def _kv_transactions(self, run: Run, msg: RunMessage) -> None:
        """PipeInfer's reference KV transactions ahead of ``run``: each sent down the pipeline as its own message
        and applied here (``kv_relay``), or, with ``kv_messages`` off, a modelled charge of their count."""
        if not msg.kv_transactions:
            return
        if not self.kv_messages:
            charge_kv_transactions(msg, self.kv_transaction_time, self.clock.now, self.records, self.name)
            return
        ops = run_transactions(run, self.driver.strategy)
        relay(run.run_id, ops, self.backend.apply_kv_ops, self.messenger,
              self.pipeline[1] if len(self.pipeline) > 1 else None, self.deadline, self.records, self.name,
              self.clock.now)

    def _launch(self, run: Run) -> None:
        msg = RunMessage.of_run(run)
        self._kv_transactions(run, msg)
        self.backend.apply_kv_ops(msg.kv_ops)
        if self.fault:
            raise InjectedFault(f"injected fault at run {run.run_id} (executor.fault_rank={self.pipeline[0]})")
        start = self.clock.now()
        out = self.backend.forward(msg, None, self._keep_alive, self._exit_to_results(msg))
        self.driver.stage0_done(run, start)
        self.runs[run.run_id] = run
        if len(self.pipeline) == 1:
            self._on_predictions(out)
        else:
            self.messenger.send(self.pipeline[1], TAG_RUN, encode_run(msg), out)

    def _exit_to_results(self, msg: RunMessage):
        """SPEED with the exit layer on the head's own stage: the early prediction goes to its own results."""
        if msg.exit_layer is None:
            return None

        def on_exit(token: int, seconds: float) -> None:
            now = self.clock.now()
            self.driver.records.append(Record("compute", now - seconds, now, self.name, msg.run_id, 1, what="exit",
                                              stage=msg.exit_layer))
            if token < 0:
                token = self.early_oracle(msg.positions[-1] + 1, msg.tokens[-1])
            self.driver.early_exit_arrived(msg.run_id, token)

        return on_exit

    def _keep_alive(self) -> bool:
        """Between the head's own layers: let MPI progress; the head never cancels its own current run."""
        self.messenger.progress()
        return False
