"""PipeSpec as its authors' code runs it (BradMcDanel/pipespec ``decoding.py``): the default "reference" variants.

Asynchronous chain (``AsyncChainSpeculativeDecoder._chain_process``), one ``ReferenceLevel`` per model:

- every model first steps once on the prompt; level 0 then drafts one token per step without a cap (pipesim stops it at the last position the target can
  commit, ``prompt + n_generate``: tokens past it are never needed);
- a verifier (every level >= 1) takes a step when ``curr_length <= prev_length - draft_lookahead + 1``: the
  model before it holds at least ``lookahead - 1`` tokens more than it (0 and 1: whenever it can). Its input is
  ``build_verify_inputs``: when its own sequence is a prefix of the previous model's, its last token plus up to
  ``max_verify_tokens - 1`` of the previous model's tokens (``max_verify_tokens=100``); otherwise (nothing new,
  or the previous model went on from a token this level has overruled) its last token alone, a single-token
  step (``verify_step`` with one input token). A candidate drafted after a rejected token is therefore never
  verified: it follows a token that differs from this level's own (the prefix check), whatever the oracle;
- after every step a verifier requests a resync from the model before it (``sync_requests += 1``); that model
  answers between its own steps (``build_draft_inputs``: where the verifier's sequence diverges from its own
  within their common length it adopts the verifier's sequence and crops its cache; a verifier's sequence
  that merely extends its own changes nothing), a middle model then requests the same of the model before it;
- with the handshake (``handshake=True``, the code's behaviour) a verifier takes no step while its request is
  unanswered, and a middle model answers its follower only once its own request is answered (the wait loops on
  ``sync_requests > sync_responses``). Without it, requests and answers travel but nobody waits.

Messages: ``SendTokens`` tells the next level how the sender's sequence changed since the last one on that link
(keep ``start`` positions, then ``tokens``; links deliver in order) and, in ``round``, how many of the
receiver's resync requests the sender has answered (``sync_responses``); ``SendRollback`` is a resync request
carrying the requester's sequence.

Defaults: ``AsyncChainSpeculativeDecoder(draft_lookahead=0)``, ``ChainSpeculativeDecoder(draft_lookahead=5)``,
``build_verify_inputs(max_verify_tokens=100)``. ``benchmark.py`` passes its ``--lookahead`` (default 5) to both;
the repository's kept runs (``benchmark_results/humaneval``) ran the asynchronous chain at 0 and the synchronous
one at 8 (3-model) or 1-20 (2-model).

Synchronous chain (``ChainSpeculativeDecoder.generate``), one ``ReferenceLockstepLevel`` per model, in rounds:
level 0 drafts while it is less than ``lookahead - 1`` tokens ahead of level 1; each middle level verifies its
predecessor's tokens in one step (``build_verify_inputs``) and then drafts itself while it is less than
``lookahead - 1`` tokens ahead of the level after it; the target verifies, and every other level resyncs to the
target's sequence (``update_states`` -> ``build_draft_inputs``). pipesim passes the round start down the chain
(each level hands the one before it its own length, ``SendProgress``, then the target's sequence,
``StartRound``), where the reference runs the models one after another in one process. Round 0 starts from the
prompt (the reference first steps every model once on the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..prefix import common_prefix_len
from .pipespec import (
    LevelAction,
    PipeSpecMessage,
    SendProgress,
    SendRollback,
    SendTokens,
    StartRound,
    _ChainLevel,
)


class _Told:
    """What a neighbour has been told of this level's sequence, so each message carries only the change."""

    def __init__(self, prompt: Sequence[int]) -> None:
        self.sequence: list[int] = list(prompt)

    def change(self, sequence: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        start = common_prefix_len(self.sequence, sequence)
        self.sequence = list(sequence)
        return start, tuple(sequence[start:])


class _ReferenceBase(_ChainLevel):
    """What both reference chains share: the view of the previous level's sequence and the verify input."""

    min_lookahead = 0

    def __init__(self, level: int, n_levels: int, prompt: Sequence[int], n_generate: int, run_ids,
                 lookahead: int, max_verify: int, stop_tokens: Sequence[int]) -> None:
        super().__init__(level, n_levels, prompt, n_generate, run_ids, lookahead, max_verify, stop_tokens)
        self._view: list[int] = list(prompt)  # the previous level's sequence, as last told
        self._told = _Told(prompt)  # what the next level knows of this level's sequence
        self._end = self.prompt_len + n_generate  # no level extends its sequence past the target's last token

    def _apply(self, message: SendTokens) -> None:
        self._view[message.start:] = message.tokens

    def _verify_input(self) -> tuple[int, ...]:
        """``build_verify_inputs``: the previous level's tokens after this level's own, when this level's sequence
        is a prefix of it; else none (a single-token step). At most ``max_verify`` tokens go in, the last verified
        one included."""
        n = len(self.out)
        if len(self._view) <= n or self._view[:n] != self.out:
            return ()
        return tuple(self._view[n:n + self.max_verify - 1])

    def _resync(self, sequence: Sequence[int]) -> list[LevelAction]:
        """``build_draft_inputs``: adopt ``sequence`` where it diverges from this level's within their common
        length (cancelling a step not yet taken); a sequence that extends this level's, or that it extends,
        changes nothing."""
        agree = common_prefix_len(self.out, sequence)
        if agree >= min(len(self.out), len(sequence)):
            return []
        actions: list[LevelAction] = []
        if self._in_flight is not None:
            actions.extend(self._cancel(self._in_flight.run.run_id))
        self._adopt(sequence)
        return actions

    def _tell_next(self, round_: int) -> SendTokens:
        start, tokens = self._told.change(self.out)
        return SendTokens(self.level + 1, self.epoch, start, tokens, round=round_)


class ReferenceLevel(_ReferenceBase):
    """One model of the asynchronous chain as ``AsyncChainSpeculativeDecoder._chain_process`` runs it."""

    name = "pipespec"
    takes_handshake = True

    def __init__(self, level: int, n_levels: int, prompt: Sequence[int], n_generate: int, run_ids,
                 lookahead: int = 0, max_verify: int = 100, stop_tokens: Sequence[int] = (),
                 handshake: bool = True) -> None:
        super().__init__(level, n_levels, prompt, n_generate, run_ids, lookahead, max_verify, stop_tokens)
        self.handshake = handshake
        self._requested = 0  # resync requests sent to the previous level (sync_requests)
        self._answered_by_previous = 0  # of those, answered (sync_responses, as the last message told)
        self._answered_next = 0  # the next level's requests this level has answered
        self._held: list[SendRollback] = []  # the next level's requests, held while this level awaits its own

    @property
    def _awaiting(self) -> bool:
        return self.handshake and self._answered_by_previous < self._requested

    def start(self) -> list[LevelAction]:
        """Every model first steps once on the prompt (``state = step(model, input_ids)``), whatever it holds."""
        return self._launch(())

    def on_result(self, run_id: int, predictions: Sequence[int]) -> list[LevelAction]:
        flight = self._take_result(run_id)
        if flight is None:
            return self._maybe_launch()
        base = flight.base
        result = self._verify(flight, predictions)
        actions: list[LevelAction] = []
        if not self.is_first and base > self.prompt_len:  # every verification (not the first step on the prompt)
            self._requested += 1  # requests a resync from the previous model
            actions.append(SendRollback(self.level - 1, tuple(self.out)))
        if self.is_last:
            assert result is not None
            actions.extend(self._commit(self.out[base:], result.n_checked, result.n_accepted))
        else:
            actions.append(self._tell_next(self._answered_next))
        actions.extend(self._maybe_launch())
        return actions

    def on_message(self, message: PipeSpecMessage) -> list[LevelAction]:
        if self.done:
            return []
        actions: list[LevelAction] = []
        if isinstance(message, SendTokens):
            self._apply(message)
            self._answered_by_previous = max(self._answered_by_previous, message.round)
            if not self._awaiting:
                while self._held and not self._awaiting:
                    actions.extend(self._answer(self._held.pop(0)))
        elif isinstance(message, SendRollback):
            if self._awaiting:
                self._held.append(message)
            else:
                actions.extend(self._answer(message))
        return [*actions, *self._maybe_launch()]

    def _answer(self, request: SendRollback) -> list[LevelAction]:
        """Resync to the next level's sequence, answer it, and (a middle level) request the same upstream."""
        actions = self._resync(request.sequence)
        self._answered_next += 1
        actions.append(self._tell_next(self._answered_next))
        if not self.is_first:
            self._requested += 1
            actions.append(SendRollback(self.level - 1, tuple(self.out)))
        return actions

    def _maybe_launch(self) -> list[LevelAction]:
        if self.done or self._in_flight is not None or self._awaiting:
            return []
        room = self._end - len(self.out)
        if room <= 0:
            return []
        if self.is_first:
            return self._launch(())
        # curr_length <= prev_length - draft_lookahead + 1 (near the end, at most what can still be drafted)
        if len(self._view) - len(self.out) < min(self.lookahead - 1, room):
            return []
        return self._launch(self._verify_input())


class ReferenceLockstepLevel(_ReferenceBase):
    """One model of the synchronous chain baseline as ``ChainSpeculativeDecoder.generate`` runs it."""

    name = "pipespec-sync"

    def __init__(self, level: int, n_levels: int, prompt: Sequence[int], n_generate: int, run_ids,
                 lookahead: int = 5, max_verify: int = 100, stop_tokens: Sequence[int] = ()) -> None:
        super().__init__(level, n_levels, prompt, n_generate, run_ids, lookahead, max_verify, stop_tokens)
        self._round = 0
        self._next_len = len(prompt)  # the next level's length at the start of the round
        self._drafting = False  # verified this round; now drafting for the next level

    def start(self) -> list[LevelAction]:
        return self._draft_or_pass() if self.is_first else []

    def on_message(self, message: PipeSpecMessage) -> list[LevelAction]:
        if self.done:
            return []
        if isinstance(message, SendProgress):
            self._next_len = message.length
            return []
        if isinstance(message, StartRound):  # update_states: resync to the target's sequence
            self._round = message.round
            actions = self._resync(message.sequence)
            if self.level + 1 == self.n_levels - 1:
                self._next_len = len(message.sequence)
            if not self.is_first:
                actions.append(SendProgress(self.level - 1, self.level, len(self.out)))
                actions.append(StartRound(self.level - 1, message.round, message.sequence))
                return actions
            self._drafting = True
            return [*actions, *(self._draft_or_pass() if self._in_flight is None else [])]
        if isinstance(message, SendTokens):
            self._apply(message)
            if message.round != self._round or self._in_flight is not None:
                return []
            self._drafting = False
            return self._launch(self._verify_input())
        return []

    def on_result(self, run_id: int, predictions: Sequence[int]) -> list[LevelAction]:
        flight = self._take_result(run_id)
        if flight is None:
            if self.is_first and self._drafting and self._in_flight is None and not self.done:
                return self._draft_or_pass()  # a stale draft step: draft the round from the resynced sequence
            return []
        base = flight.base
        result = self._verify(flight, predictions)
        if self.is_last:
            actions = self._commit(self.out[base:], result.n_checked, result.n_accepted)
            if not self.done:
                self._round += 1
                actions.append(StartRound(self.level - 1, self._round, tuple(self.out)))
            return actions
        self._drafting = True
        return self._draft_or_pass()

    def _draft_or_pass(self) -> list[LevelAction]:
        """Draft one more token while less than ``lookahead - 1`` ahead of the next level, else hand on."""
        ahead = len(self.out) - self._next_len
        if ahead < self.lookahead - 1 and len(self.out) < self._end:
            return self._launch(())
        self._drafting = False
        return [self._tell_next(self._round)]
