"""PipeSpec (McDanel et al., 2025): hierarchical speculation over a chain of k+1 models.

Each model of the chain (level 0 the smallest draft, level k the target) is its own state machine and talks to
its neighbours only by messages, so an engine can place each level on its own nodes:

- level 0 drafts autoregressively, at most ``lookahead`` tokens ahead of what level 1 has verified;
- level i >= 1 verifies the tokens level i-1 sent it (greedy exact match) in one run, keeps the matching prefix
  plus its own next token, and sends those on to level i+1; the target (level k) commits them to the output,
  and when it has nothing to verify it decodes its own next token rather than wait, so the chain is never
  slower than the target alone by more than the cost of the messages;
- a rejection at level i sends its corrected sequence upstream: each upstream level adopts it (rolls back),
  drops its in-flight work (its epoch changes) and passes it further up.

These are the ``capped`` (asynchronous) and ``verify-only`` (synchronous) variants: pipesim's earlier semantics,
kept by name. The default ``reference`` variants, as BradMcDanel/pipespec's ``decoding.py`` runs them (lookahead
as a threshold, 0 allowed; level 0 uncapped; single-token steps on empty buffers at every level; the 100-token
window; the blocking resync handshake; middle models that draft in the synchronous chain), are in
``pipespec_reference``. Known departure of ``capped``: a verifier keeps candidates drafted after a token it
rejected and may accept them (issue 19); the reference variants never verify such a candidate.

``LockstepLevel`` is the synchronous baseline: the chain runs in rounds. The target starts a round by sending its
sequence to every level; level 0 drafts ``lookahead`` tokens; each level verifies its predecessor's round in one
run and hands on what it keeps; the target verifies, commits, and starts the next round.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ..actions import Action, CancelRuns, EmitTokens, Finish, InvalidateRuns, LaunchRun
from ..prefix import common_prefix_len
from ..runs import CANONICAL_SEQ, KVOp, Run
from ..verification import verify_linear
from .base import Strategy


@dataclass(frozen=True)
class SendTokens:
    """Level ``to_level - 1`` tells ``to_level`` its tokens at positions ``start...`` (in its epoch ``epoch``)."""

    to_level: int
    epoch: int
    start: int
    tokens: tuple[int, ...]
    round: int = 0  # lockstep chains only


@dataclass(frozen=True)
class SendRollback:
    """A downstream level's corrected sequence, for ``to_level`` to adopt where it disagrees."""

    to_level: int
    sequence: tuple[int, ...]


@dataclass(frozen=True)
class SendProgress:
    """How many positions a downstream level (``from_level``) has verified."""

    to_level: int
    from_level: int
    length: int


@dataclass(frozen=True)
class StartRound:
    """Lockstep chains: the target's sequence, from which every level starts round ``round``."""

    to_level: int
    round: int
    sequence: tuple[int, ...]


PipeSpecMessage = SendTokens | SendRollback | SendProgress | StartRound
LevelAction = Action | PipeSpecMessage


@dataclass
class _InFlight:
    run: Run
    epoch: int
    candidates: tuple[int, ...]
    base: int  # len(out) at launch


class _ChainLevel(Strategy):
    """What every level of a chain has: its sequence, its KV bookkeeping, one run in flight at a time.

    A level speaks the Strategy contract: ``on_logits`` with its run's predictions, ``on_message`` with a message
    from another level, ``on_dropped`` for a run it cancelled before it left the head; messages to other levels
    are actions the engine routes by their ``to_level``. Its driver holds messages while its run is in the
    pipeline (``one_run_in_flight``), as the reference's levels answer their neighbours between steps
    (BradMcDanel/pipespec ``decoding.py``).
    """

    one_run_in_flight = True
    expects_messages = True
    min_lookahead = 1  # the reference variants take 0 ("verify whenever")

    def __init__(self, level: int, n_levels: int, prompt: Sequence[int], n_generate: int, run_ids,
                 lookahead: int, max_verify: int, stop_tokens: Sequence[int]) -> None:
        if lookahead < self.min_lookahead:
            raise ValueError(f"lookahead must be >= {self.min_lookahead} for {type(self).__name__}, got {lookahead}")
        if max_verify < 1:
            raise ValueError(f"max_verify must be >= 1, got {max_verify}")
        self.level = level
        self.n_levels = n_levels
        self.is_first = level == 0
        self.is_last = level == n_levels - 1
        self.prompt_len = len(prompt)
        self.out: list[int] = list(prompt)
        self.n_generate = n_generate
        self.lookahead = lookahead
        self.max_verify = max_verify
        self.stop_tokens = frozenset(stop_tokens)
        self.done = False
        self.epoch = 0
        self._run_ids = run_ids
        self._processed = 0  # positions whose KV this level's cache holds
        self._pending_kv: list[KVOp] = []
        self._in_flight: _InFlight | None = None

    @property
    def sequence(self) -> list[int]:
        """The level's sequence (prompt, verified tokens and its own last prediction)."""
        return self.out

    def on_logits(self, run_id: int, predictions: Sequence[int]) -> list[LevelAction]:
        return self.on_result(run_id, predictions)

    def on_dropped(self, run_id: int) -> list[LevelAction]:
        return self.on_result(run_id, ())

    def _cancel(self, run_id: int) -> list[LevelAction]:
        """The level's in-flight run is stale: its result is not wanted, and stages may skip it."""
        return [InvalidateRuns((run_id,)), CancelRuns((run_id,))]

    def _launch(self, candidates: tuple[int, ...]) -> list[LevelAction]:
        """One run: the level's unprocessed tokens plus ``candidates`` to verify."""
        tokens = self.out[self._processed:] + list(candidates)
        run = Run(run_id=next(self._run_ids), tokens=tokens,
                  positions=list(range(self._processed, self._processed + len(tokens))), seq_ids=(CANONICAL_SEQ,),
                  speculative=bool(candidates), output_from=len(self.out) - 1 - self._processed,
                  kv_ops=tuple(self._pending_kv), kind="verify" if candidates else "decode",
                  meta={"level": self.level})
        self._pending_kv = []
        self._in_flight = _InFlight(run, self.epoch, candidates, len(self.out))
        return [LaunchRun(run)]

    def _take_result(self, run_id: int) -> _InFlight | None:
        """The in-flight run if this result is for it and still current (not rolled back meanwhile)."""
        flight, self._in_flight = self._in_flight, None
        if flight is None or flight.run.run_id != run_id or self.done or flight.epoch != self.epoch:
            return None
        return flight

    def _verify(self, flight: _InFlight, predictions: Sequence[int]):
        """Verify the run's candidates; extend ``out``; drop rejected positions from the cache."""
        if self.is_first:
            self._processed = len(self.out)
            self.out.append(predictions[-1])
            return None
        result = verify_linear(flight.candidates, predictions)
        self._processed = flight.base + result.n_accepted
        if result.n_accepted < len(flight.candidates):
            self._pending_kv.append(KVOp("rm", CANONICAL_SEQ, p0=self._processed))
        self.out.extend(result.emitted)
        return result

    def _adopt(self, sequence: Sequence[int]) -> None:
        """Take ``sequence`` as this level's own; positions past the agreement leave the cache.

        An in-flight run may still write positions past ``_processed``; the removal travels with the next run,
        which starts only after that one has finished, so it removes those writes too.
        """
        agree = common_prefix_len(self.out, sequence)
        self.epoch += 1
        self.out = list(sequence)
        self._processed = min(self._processed, agree, len(sequence) - 1)  # the last token is always re-run
        self._pending_kv.append(KVOp("rm", CANONICAL_SEQ, p0=self._processed))

    def _commit(self, tokens: Sequence[int], checked: int, accepted: int) -> list[LevelAction]:
        generated = len(self.out) - len(tokens) - self.prompt_len
        room = self.n_generate - generated
        kept: list[int] = []
        for token in list(tokens)[:room]:
            kept.append(token)
            if token in self.stop_tokens:
                break
        actions: list[LevelAction] = [EmitTokens(tuple(kept), checked, min(accepted, len(kept)))]
        if generated + len(kept) >= self.n_generate or (kept and kept[-1] in self.stop_tokens):
            self.done = True
            actions.append(Finish())
        return actions


class PipeSpecLevel(_ChainLevel):
    """One model of an asynchronous PipeSpec chain. ``run_ids`` is a counter shared by all levels."""

    name = "pipespec"

    def __init__(self, level: int, n_levels: int, prompt: Sequence[int], n_generate: int, run_ids,
                 lookahead: int = 8, max_verify: int = 16, stop_tokens: Sequence[int] = ()) -> None:
        super().__init__(level, n_levels, prompt, n_generate, run_ids, lookahead, max_verify, stop_tokens)
        self._candidates: dict[int, int] = {}  # position -> token received from upstream
        self._upstream_epoch = 0
        self._downstream_len = len(prompt)  # what the next level has verified

    def start(self) -> list[LevelAction]:
        return self._maybe_launch()

    def on_result(self, run_id: int, predictions: Sequence[int]) -> list[LevelAction]:
        flight = self._take_result(run_id)
        if flight is None:
            return self._maybe_launch()
        base = flight.base
        result = self._verify(flight, predictions)
        new_tokens = self.out[base:]
        actions: list[LevelAction] = []
        if result is not None:
            corrected = result.n_accepted < len(flight.candidates)
            follower = self._candidates.get(len(self.out) - 1)
            corrected = corrected or (follower is not None and follower != self.out[-1])
            actions.append(SendRollback(self.level - 1, tuple(self.out)) if corrected
                           else SendProgress(self.level - 1, self.level, len(self.out)))
        if self.is_last:
            assert result is not None
            actions.extend(self._commit(new_tokens, result.n_checked, result.n_accepted))
        else:
            actions.append(SendTokens(self.level + 1, self.epoch, base, tuple(new_tokens)))
        actions.extend(self._maybe_launch())
        return actions

    def on_message(self, message: PipeSpecMessage) -> list[LevelAction]:
        if self.done:
            return []
        if isinstance(message, SendTokens):
            if message.epoch < self._upstream_epoch:
                return []  # sent before upstream rolled back
            if message.epoch > self._upstream_epoch:
                self._upstream_epoch = message.epoch
                self._candidates = {p: t for p, t in self._candidates.items() if p < message.start}
            overruled = False
            for offset, token in enumerate(message.tokens):
                position = message.start + offset
                # kept even below len(out): a rollback may still make this level adopt a shorter sequence
                self._candidates[position] = token
                overruled = overruled or (self.prompt_len <= position < len(self.out) and token != self.out[position])
            if overruled:  # upstream went on from a token this level has already overruled: roll it back
                return [SendRollback(self.level - 1, tuple(self.out)), *self._maybe_launch()]
        elif isinstance(message, SendProgress):
            self._downstream_len = message.length
        elif isinstance(message, SendRollback):
            agree = common_prefix_len(self.out, message.sequence)
            if agree == len(message.sequence):
                return self._maybe_launch()  # already consistent with it (and at least as long)
            actions: list[LevelAction] = []
            if self._in_flight is not None:
                actions.extend(self._cancel(self._in_flight.run.run_id))
            self._adopt(message.sequence)
            # candidates stay: upstream may already have drafted on the adopted sequence (messages on different
            # links race); any drafted on the old sequence are rejected by verification
            self._downstream_len = len(message.sequence)
            if not self.is_first:
                actions.append(SendRollback(self.level - 1, tuple(message.sequence)))
            return [*actions, *self._maybe_launch()]
        return self._maybe_launch()

    def _maybe_launch(self) -> list[LevelAction]:
        if self.done or self._in_flight is not None:
            return []
        if self.is_first:
            if len(self.out) - self._downstream_len >= self.lookahead:
                return []
            return self._launch(())
        position, found = len(self.out), []
        while position in self._candidates and len(found) < self.max_verify:
            found.append(self._candidates[position])
            position += 1
        if found or self.is_last:  # the target never idles: with nothing to verify it decodes on its own
            return self._launch(tuple(found))
        return []


class LockstepLevel(_ChainLevel):
    """One model of the synchronous chain baseline: rounds started by the target, no overlap between levels."""

    name = "pipespec-sync"

    def __init__(self, level: int, n_levels: int, prompt: Sequence[int], n_generate: int, run_ids,
                 lookahead: int = 8, max_verify: int = 16, stop_tokens: Sequence[int] = ()) -> None:
        super().__init__(level, n_levels, prompt, n_generate, run_ids, lookahead, max_verify, stop_tokens)
        self._round = 0
        self._round_base = len(prompt)  # the target's length when the round started
        self._early: dict[int, SendTokens] = {}  # tokens of a round that has not started here yet

    def start(self) -> list[LevelAction]:
        return self._launch(()) if self.is_first else []

    def on_message(self, message: PipeSpecMessage) -> list[LevelAction]:
        if self.done:
            return []
        if isinstance(message, StartRound):
            self._round, self._round_base = message.round, len(message.sequence)
            actions: list[LevelAction] = []
            if self.out != list(message.sequence):
                if self._in_flight is not None:
                    actions.extend(self._cancel(self._in_flight.run.run_id))
                self._adopt(message.sequence)
            if self.is_first:
                return [*actions, *(self._launch(()) if self._in_flight is None else [])]
            early = self._early.pop(self._round, None)
            return [*actions, *(self.on_message(early) if early is not None else [])]
        if isinstance(message, SendTokens):
            if message.round > self._round:
                self._early[message.round] = message
                return []
            if message.round < self._round or self._in_flight is not None:
                return []
            candidates = tuple(message.tokens[max(0, len(self.out) - message.start):][: self.max_verify])
            return self._launch(candidates)  # with no candidates, the level adds just its own next token
        return []

    def on_result(self, run_id: int, predictions: Sequence[int]) -> list[LevelAction]:
        flight = self._take_result(run_id)
        if flight is None:
            if self.is_first and self._in_flight is None and not self.done:
                return self._launch(())  # a stale draft step: draft the round from the adopted sequence
            return []
        result = self._verify(flight, predictions)
        if self.is_first:
            if len(self.out) - self._round_base < self.lookahead:
                return self._launch(())
            return self._pass_on(self.out[self._round_base:])
        new_tokens = self.out[flight.base:]
        if not self.is_last:
            return self._pass_on(new_tokens, start=flight.base)
        actions = self._commit(new_tokens, result.n_checked, result.n_accepted)
        if not self.done:
            next_round = self._round + 1
            self._round, self._round_base = next_round, len(self.out)
            actions.extend(StartRound(level, next_round, tuple(self.out)) for level in range(self.level))
        return actions

    def _pass_on(self, tokens: Sequence[int], start: int | None = None) -> list[LevelAction]:
        start = self._round_base if start is None else start
        return [SendTokens(self.level + 1, self.epoch, start, tuple(tokens), round=self._round)]


def _level_class(synchronous: bool, variant: str | None) -> type[_ChainLevel]:
    """The level class of a chain: ``reference`` as BradMcDanel/pipespec runs it (``pipespec_reference``),
    ``capped`` (asynchronous) / ``verify-only`` (synchronous), or None, the earlier pipesim semantics of this
    module."""
    from .pipespec_reference import ReferenceLevel, ReferenceLockstepLevel

    if variant == "reference":
        return ReferenceLockstepLevel if synchronous else ReferenceLevel
    expected = "verify-only" if synchronous else "capped"
    if variant not in (None, expected):
        raise ValueError(f"variant {variant!r} is not a variant of {'pipespec-sync' if synchronous else 'pipespec'} "
                         f"(reference, {expected})")
    return LockstepLevel if synchronous else PipeSpecLevel


def _knobs(cls: type[_ChainLevel], handshake: bool | None) -> dict:
    if handshake is None:
        return {}
    if not getattr(cls, "takes_handshake", False):
        raise ValueError(f"handshake applies to the reference asynchronous chain only, not {cls.__name__}")
    return {"handshake": handshake}


def make_pipespec_chain(prompt: Sequence[int], n_generate: int, n_levels: int, lookahead: int = 8,
                        max_verify: int = 16, synchronous: bool = False,
                        stop_tokens: Sequence[int] = (), variant: str | None = None,
                        handshake: bool | None = None) -> list[_ChainLevel]:
    """The levels of a chain (level 0 the smallest draft, the last the target), sharing one run-id counter.

    Engines drive every level with its own ``HeadDriver`` and route each level's messages to the level they
    name (``to_level``). ``synchronous=True`` builds the lockstep baseline; ``variant`` picks the semantics
    (``_level_class``); ``handshake``: the reference asynchronous chain's blocking resync (default on).
    """
    if n_levels < 2:
        raise ValueError(f"a PipeSpec chain needs at least 2 models, got {n_levels}")
    run_ids = itertools.count(1)
    cls = _level_class(synchronous, variant)
    knobs = _knobs(cls, handshake)
    return [cls(i, n_levels, prompt, n_generate, run_ids, lookahead, max_verify, stop_tokens, **knobs)
            for i in range(n_levels)]


def make_level(level: int, n_levels: int, prompt: Sequence[int], n_generate: int, lookahead: int = 8,
               max_verify: int = 16, synchronous: bool = False, stop_tokens: Sequence[int] = (),
               variant: str | None = None, handshake: bool | None = None) -> _ChainLevel:
    """One level of a chain on its own (an engine process per level): its run ids form the arithmetic progression
    ``level + 1, level + 1 + n_levels, ...``, unique across the chain without a shared counter."""
    cls = _level_class(synchronous, variant)
    return cls(level, n_levels, prompt, n_generate, itertools.count(level + 1, n_levels), lookahead, max_verify,
               stop_tokens, **_knobs(cls, handshake))
