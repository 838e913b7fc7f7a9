"""The strategy interface: a state machine fed with events, answering with actions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..actions import Action, EmitTokens, Finish, LaunchRun
from ..runs import CANONICAL_SEQ, KVOp, Run


class Strategy(ABC):
    """Base of all strategies: holds the committed sequence and the bookkeeping common to all.

    Engines call ``start()`` once, then ``on_logits`` whenever a run's predictions return and ``on_draft``
    whenever a requested draft is ready, executing the returned actions in order. Predictions are the target's
    greedy next token for each output token of a run.
    """

    name: str = "base"
    one_run_in_flight: bool = False  # the driver holds messages from other levels while a run is in the pipeline
    expects_messages: bool = False  # a level of a chain: it may wait for messages with no run in flight
    cancelled_traffic: str = "header"  # what a stage sends on for a run it did not compute: a header at most, or
    # "full" activations and logits (PipeInfer's reference; the executor's workers ask full_cancelled_traffic)
    kv_capacity: int | None = None  # KV cells of every stage's cache (None: unbounded); strategies that hold
    # speculative runs in flight launch no more than fit (back-pressure)

    def __init__(self, prompt: Sequence[int], n_generate: int, stop_tokens: Sequence[int] = ()) -> None:
        if len(prompt) < 1:
            raise ValueError("prompt must hold at least one token")
        if n_generate < 1:
            raise ValueError(f"n_generate must be >= 1, got {n_generate}")
        self.prompt_len = len(prompt)
        self.sequence: list[int] = list(prompt)
        self.n_generate = n_generate
        self.stop_tokens = frozenset(stop_tokens)
        self.done = False
        self._next_run_id = 0
        self._next_request_id = 0
        self._pending_kv_ops: list[KVOp] = []

    # -- engine-facing API -------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> list[Action]:
        """Actions that begin generation (normally the prompt's prefill run)."""

    @abstractmethod
    def on_logits(self, run_id: int, predictions: Sequence[int]) -> list[Action]:
        """A run's greedy predictions (one per output token) arrived at the head."""

    def on_draft(self, request_id: int, tokens: Sequence[int]) -> list[Action]:
        """A requested draft is ready."""
        raise NotImplementedError(f"strategy {self.name!r} does not request drafts")

    def on_early_exit(self, run_id: int, token: int) -> list[Action]:
        """An early-exit prediction of the token after run ``run_id`` (SPEED); ignored by other strategies."""
        return []

    def on_message(self, message) -> list[Action]:
        """A message from another level of a chain (PipeSpec)."""
        raise NotImplementedError(f"strategy {self.name!r} takes no messages from other levels")

    def on_dropped(self, run_id: int) -> list[Action]:
        """A run this strategy cancelled was dropped before it left the head: no predictions will come."""
        return []

    def wants_draft(self, request_id: int) -> bool:
        """Whether a draft still being computed is still wanted (engines may abandon it early if not)."""
        return not self.done

    def relayed_kv_ops(self, run: Run) -> tuple[KVOp, ...]:
        """The relayed KV transactions that precede ``run``, as operations (``run.kv_transactions`` of them): none,
        unless the strategy issues them one by one as PipeInfer's reference does."""
        return ()

    @property
    def generated(self) -> list[int]:
        return self.sequence[self.prompt_len:]

    # -- helpers for subclasses --------------------------------------------------------------------
    def _new_run_id(self) -> int:
        self._next_run_id += 1
        return self._next_run_id

    def _new_request_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    def _queue_kv(self, op: KVOp) -> None:
        self._pending_kv_ops.append(op)

    def _launch(self, tokens: Sequence[int], first_position: int, *, seq_ids: tuple[int, ...] = (CANONICAL_SEQ,),
                speculative: bool = False, parent: int | None = None, output_from: int = 0,
                partition: int | None = None, kind: str = "decode") -> LaunchRun:
        """Build a run (taking the KV operations queued so far with it) and the action that launches it."""
        run = Run(
            run_id=self._new_run_id(), tokens=list(tokens),
            positions=list(range(first_position, first_position + len(tokens))), seq_ids=seq_ids,
            speculative=speculative, parent=parent, output_from=output_from,
            kv_ops=tuple(self._pending_kv_ops), partition=partition, kind=kind,
        )
        self._pending_kv_ops = []
        return LaunchRun(run)

    def _launch_prefill(self) -> LaunchRun:
        return self._launch(self.sequence, 0, output_from=self.prompt_len - 1, kind="prefill")

    def _commit(self, tokens: Sequence[int], checked: int = 0, accepted: int = 0) -> list[Action]:
        """Append tokens to the output (up to the limit or a stop token); Finish when generation is complete."""
        room = self.n_generate - (len(self.sequence) - self.prompt_len)  # not len(self.generated): a copy
        kept: list[int] = []
        for token in tokens[:room]:
            kept.append(token)
            if token in self.stop_tokens:
                break
        self.sequence.extend(kept)
        actions: list[Action] = [EmitTokens(tuple(kept), min(checked, len(kept)), min(accepted, len(kept)))]
        if len(self.sequence) - self.prompt_len >= self.n_generate or (kept and kept[-1] in self.stop_tokens):
            self.done = True
            actions.append(Finish())
        return actions
