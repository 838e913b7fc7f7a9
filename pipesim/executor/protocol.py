"""The executor's message protocol: tags and the layout of every message (numpy only, no MPI).

Every message is an int64 *frame* on one tag, optionally followed by a float32 *payload* on ``tag + 1`` from the
same sender. A frame starts with ``[send_time_ns, payload_code, payload_count]`` (send time in the head's clock,
0/1 = no payload / float32 payload of that many elements), then the body of its kind:

- ``TAG_RUN``  (head -> 1 -> ... -> last): ``[run_id, flags, n_tokens, output_from, n_seqs, n_ops,
  tokens[n], positions[n], seq_ids[n_seqs], ops[5 * n_ops]]``; flags ``COMPUTED`` (activations
  ``[n_tokens, d_model]`` follow as payload) and ``STOP`` (end of a generation); an op is
  ``(kind, seq, dst, p0, p1)`` with kinds cp/rm/keep = 0/1/2 and ``p1 = -1`` for "to the end"; with flag
  ``EXIT`` (SPEED) one more value follows: the run's exit layer. In a PipeSpec chain runs travel the same way
  through the ranks of their level (level head -> ... -> the level's last rank).
- ``TAG_PRED`` (last -> head): ``[run_id, mode, n_outputs, width, ids...]``; mode logits (payload
  ``[n_outputs, vocab]``), topk (ids ``[n_outputs, k]`` in the body, their values as payload) or ids
  (``[n_outputs]`` greedy ids in the body, no payload). In a chain: the level's last rank -> its level head.
- ``TAG_CANCEL`` (head -> last -> ... -> 1): ``[run_ids...]``.
- ``TAG_KVTX`` (head -> 1 -> ... -> last; PipeInfer's reference KV bookkeeping): ``[run_id, index, kind, seq, dst,
  p0, p1]``, one ``llama_kv_cache_seq_rm``/``seq_cp`` of the head, relayed hop by hop ahead of the run ``run_id``
  (whose header announces their number, flag ``KVTX``); ``index`` counts them from 0 within the run. Their
  ``transfer`` records fold consecutive ones of a run on a link into one (``n_tokens``: how many messages).
- ``TAG_EARLY`` (the rank holding the exit layer -> head; SPEED): ``[run_id, position, token]``, the early
  prediction of the token at ``position`` (after the run's last token); ``token = -1``: the rank reached the
  exit layer and the head's oracle decides the token.
- ``TAG_CHAIN`` (level head -> level head; PipeSpec): ``[kind, to_level, a, b, c, n, tokens[n]]`` with kinds
  SendTokens ``(0, to, epoch, start, round)``, SendRollback ``(1, to, 0, 0, 0)`` (tokens: the sequence),
  SendProgress ``(2, to, from_level, length, 0)``, StartRound ``(3, to, round, 0, 0)`` (tokens: the sequence),
  and FINISH ``(4, -1, 0, 0, 0)`` from the target's level head to every other level head at the end.

Data messages travel on a duplicate of the world communicator; control messages outside a generation (clock
sync, SETUP/READY, the records gathered at the end) use their own tags and plain layouts on the world one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..scheduling import KVOp, Run
from ..scheduling.strategies.pipespec import SendProgress, SendRollback, SendTokens, StartRound

TAG_RUN = 11
TAG_PRED = 13
TAG_CANCEL = 15
TAG_EARLY = 17
TAG_CHAIN = 19
TAG_CLOCK = 21
TAG_SETUP = 22
TAG_READY = 23
TAG_RECORDS = 24
TAG_GO = 25  # chain: rank 0 tells the other level heads that every rank is ready
DRAFT_REQUEST, DRAFT_REPLY = 0, 1  # the first value of a TAG_DRAFT body
TAG_DRAFT = 27  # the head and a draft on a rank of its own (executor/remote_draft.py)
TAG_DISCARD = 29  # full logits of a run the last stage did not compute (PipeInfer's reference): the head drops them
TAG_KVTX = 31  # one relayed KV transaction (PipeInfer's reference): executor/kv_relay.py
DATA_TAGS = (TAG_RUN, TAG_PRED, TAG_CANCEL, TAG_EARLY, TAG_CHAIN, TAG_DRAFT, TAG_DISCARD, TAG_KVTX)
PAYLOAD_OFFSET = 1  # a payload travels on tag + 1

FRAME_PREFIX = 3
NO_PAYLOAD, FLOAT32_PAYLOAD = 0, 1

COMPUTED = 1
STOP = 2
EXIT = 4
KVTX = 8  # the run carries a count of relayed KV transactions (PipeInfer's reference bookkeeping)

RETURN_MODES = ("logits", "topk", "ids")
_OP_KINDS = ("cp", "rm", "keep")


class ProtocolError(RuntimeError):
    """A message that does not follow the protocol."""


# -- frames -----------------------------------------------------------------------------------------

def frame(body: np.ndarray, send_time: float, payload: np.ndarray | None) -> np.ndarray:
    """The int64 frame of a message: prefix (send time, payload description) then the body."""
    prefix = [int(round(send_time * 1e9)), NO_PAYLOAD if payload is None else FLOAT32_PAYLOAD,
              0 if payload is None else int(payload.size)]
    return np.concatenate([np.asarray(prefix, dtype=np.int64), np.asarray(body, dtype=np.int64)])


def unframe(data: np.ndarray) -> tuple[float, int, np.ndarray]:
    """(send time in seconds, payload element count or -1 for none, body) of a frame."""
    if data.size < FRAME_PREFIX:
        raise ProtocolError(f"frame of {data.size} int64 values is shorter than its {FRAME_PREFIX}-value prefix")
    send_ns, code, count = (int(v) for v in data[:FRAME_PREFIX])
    if code not in (NO_PAYLOAD, FLOAT32_PAYLOAD):
        raise ProtocolError(f"unknown payload code {code}")
    return send_ns * 1e-9, (count if code == FLOAT32_PAYLOAD else -1), data[FRAME_PREFIX:]


# -- runs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunMessage:
    """What a stage needs of a run: its tokens, positions, sequences, outputs and the KV ops before it."""

    run_id: int
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    seq_ids: tuple[int, ...]
    output_from: int
    kv_ops: tuple[KVOp, ...]
    computed: bool = True
    stop: bool = False
    exit_layer: int | None = None  # SPEED: the layer whose hidden state predicts the next token
    kv_transactions: int = 0  # relayed KV transactions every stage spends time on before the run

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_outputs(self) -> int:
        return len(self.tokens) - self.output_from

    @classmethod
    def of_run(cls, run: Run) -> RunMessage:
        return cls(run.run_id, tuple(run.tokens), tuple(run.positions), tuple(run.seq_ids), run.output_from,
                   tuple(run.kv_ops), exit_layer=run.meta.get("exit_layer"), kv_transactions=run.kv_transactions)

    @classmethod
    def stop_message(cls) -> RunMessage:
        return cls(-1, (), (), (), 0, (), computed=False, stop=True)

    def skipped(self) -> RunMessage:
        """The same run, forwarded as a header only (not computed upstream)."""
        return RunMessage(self.run_id, self.tokens, self.positions, self.seq_ids, self.output_from, self.kv_ops,
                          computed=False, stop=self.stop, exit_layer=self.exit_layer,
                          kv_transactions=self.kv_transactions)


def encode_run(msg: RunMessage) -> np.ndarray:
    flags = (COMPUTED if msg.computed else 0) | (STOP if msg.stop else 0) | (EXIT if msg.exit_layer is not None else 0)
    flags |= KVTX if msg.kv_transactions else 0
    ops: list[int] = []
    for op in msg.kv_ops:
        ops.extend((_OP_KINDS.index(op.kind), op.seq, op.dst, op.p0, -1 if op.p1 is None else op.p1))
    head = [msg.run_id, flags, msg.n_tokens, msg.output_from, len(msg.seq_ids), len(msg.kv_ops)]
    tail = [msg.exit_layer] if msg.exit_layer is not None else []
    tail += [msg.kv_transactions] if msg.kv_transactions else []
    return np.asarray([*head, *msg.tokens, *msg.positions, *msg.seq_ids, *ops, *tail], dtype=np.int64)


def decode_run(body: np.ndarray) -> RunMessage:
    values = body.tolist()
    if len(values) < 6:
        raise ProtocolError(f"run body of {len(values)} values is shorter than its 6-value header")
    run_id, flags, n, output_from, n_seqs, n_ops = values[:6]
    expected = 6 + 2 * n + n_seqs + 5 * n_ops + (1 if flags & EXIT else 0) + (1 if flags & KVTX else 0)
    if len(values) != expected:
        raise ProtocolError(f"run {run_id}: body has {len(values)} values, its header announces {expected}")
    at = 6
    tokens = tuple(values[at:at + n])
    positions = tuple(values[at + n:at + 2 * n])
    at += 2 * n
    seq_ids = tuple(values[at:at + n_seqs])
    at += n_seqs
    ops = []
    for i in range(n_ops):
        kind, seq, dst, p0, p1 = values[at + 5 * i:at + 5 * i + 5]
        ops.append(KVOp(_OP_KINDS[kind], seq, dst, p0, None if p1 < 0 else p1))
    at += 5 * n_ops
    exit_layer = values[at] if flags & EXIT else None
    kv_transactions = values[-1] if flags & KVTX else 0
    return RunMessage(run_id, tokens, positions, seq_ids, output_from, tuple(ops),
                      computed=bool(flags & COMPUTED), stop=bool(flags & STOP), exit_layer=exit_layer,
                      kv_transactions=kv_transactions)


# -- relayed KV transactions (PipeInfer's reference) ------------------------------------------------

def encode_kv_transaction(run_id: int, index: int, op: KVOp) -> np.ndarray:
    return np.asarray([run_id, index, _OP_KINDS.index(op.kind), op.seq, op.dst, op.p0,
                       -1 if op.p1 is None else op.p1], dtype=np.int64)


def decode_kv_transaction(body: np.ndarray) -> tuple[int, int, KVOp]:
    """(run id, index within the run, operation) of a TAG_KVTX body."""
    values = body.tolist()
    if len(values) != 7 or not 0 <= values[2] < len(_OP_KINDS):
        raise ProtocolError(f"KV transaction body {values} is not [run_id, index, kind, seq, dst, p0, p1]")
    run_id, index, kind, seq, dst, p0, p1 = values
    return run_id, index, KVOp(_OP_KINDS[kind], seq, dst, p0, None if p1 < 0 else p1)


# -- predictions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictionMessage:
    """Predictions of a run's output tokens, in the scenario's return mode."""

    run_id: int
    mode: str
    n_outputs: int
    width: int
    ids: np.ndarray | None  # topk: [n, k] candidate ids; ids: [n] greedy ids
    values: np.ndarray | None  # logits: [n, vocab]; topk: [n, k]

    def greedy(self) -> list[int]:
        """The head's argmax over what came back."""
        if self.mode == "logits":
            return [int(i) for i in np.argmax(self.values, axis=1)]
        if self.mode == "topk":
            best = np.argmax(self.values, axis=1)
            return [int(self.ids[row, col]) for row, col in enumerate(best)]
        return [int(i) for i in self.ids]

    def encode(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(int64 body, float32 payload or None)."""
        head = [self.run_id, RETURN_MODES.index(self.mode), self.n_outputs, self.width]
        ids = [] if self.ids is None else np.asarray(self.ids, dtype=np.int64).reshape(-1).tolist()
        body = np.asarray(head + ids, dtype=np.int64)
        payload = None if self.values is None else np.ascontiguousarray(self.values, dtype=np.float32).reshape(-1)
        return body, payload


def decode_predictions(body: np.ndarray, payload: np.ndarray | None) -> PredictionMessage:
    if body.size < 4:
        raise ProtocolError(f"prediction body of {body.size} values is shorter than its 4-value header")
    run_id, mode_code, n, width = (int(v) for v in body[:4])
    mode = RETURN_MODES[mode_code]
    rest = body[4:]
    if mode == "logits":
        if payload is None or payload.size != n * width:
            raise ProtocolError(f"run {run_id}: logits payload does not hold {n} x {width} values")
        return PredictionMessage(run_id, mode, n, width, None, payload.reshape(n, width))
    if mode == "topk":
        if payload is None or payload.size != n * width or rest.size != n * width:
            raise ProtocolError(f"run {run_id}: top-k message does not hold {n} x {width} ids and values")
        return PredictionMessage(run_id, mode, n, width, rest.reshape(n, width), payload.reshape(n, width))
    if rest.size != n:
        raise ProtocolError(f"run {run_id}: ids message holds {rest.size} ids for {n} outputs")
    return PredictionMessage(run_id, mode, n, 1, rest.copy(), None)


def predictions_from_ids(run_id: int, ids: Sequence[int], mode: str, vocab_size: int, top_k: int) -> PredictionMessage:
    """A message in ``mode`` whose argmax is ``ids`` (emulated compute: synthetic logits of the same size)."""
    n = len(ids)
    greedy = np.asarray(ids, dtype=np.int64)
    if mode == "logits":
        values = np.zeros((n, vocab_size), dtype=np.float32)
        values[np.arange(n), greedy] = 1.0
        return PredictionMessage(run_id, mode, n, vocab_size, None, values)
    if mode == "topk":
        k = min(top_k, vocab_size)
        candidates = (greedy[:, None] + np.arange(k)[None, :]) % vocab_size
        values = np.zeros((n, k), dtype=np.float32)
        values[:, 0] = 1.0
        return PredictionMessage(run_id, mode, n, k, candidates, values)
    return PredictionMessage(run_id, mode, n, 1, greedy, None)


# -- cancellations ----------------------------------------------------------------------------------

def encode_cancel(run_ids: Sequence[int]) -> np.ndarray:
    return np.asarray(list(run_ids), dtype=np.int64)


def decode_cancel(body: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in body)


# -- early exits (SPEED) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EarlyExitMessage:
    """The early prediction of the token at ``position`` (-1: the head's oracle decides) from run ``run_id``."""

    run_id: int
    position: int
    token: int


def encode_early_exit(message: EarlyExitMessage) -> np.ndarray:
    return np.asarray([message.run_id, message.position, message.token], dtype=np.int64)


def decode_early_exit(body: np.ndarray) -> EarlyExitMessage:
    if body.size != 3:
        raise ProtocolError(f"early-exit body of {body.size} values, expected 3")
    run_id, position, token = (int(v) for v in body)
    return EarlyExitMessage(run_id, position, token)


# -- PipeSpec chain messages -----------------------------------------------------------------------------

CHAIN_FINISH = 4


def encode_chain(message) -> np.ndarray:
    """A PipeSpec message (SendTokens, SendRollback, SendProgress, StartRound) or None for FINISH."""
    if message is None:
        head, tokens = [CHAIN_FINISH, -1, 0, 0, 0], ()
    elif isinstance(message, SendTokens):
        head, tokens = [0, message.to_level, message.epoch, message.start, message.round], message.tokens
    elif isinstance(message, SendRollback):
        head, tokens = [1, message.to_level, 0, 0, 0], message.sequence
    elif isinstance(message, SendProgress):
        head, tokens = [2, message.to_level, message.from_level, message.length, 0], ()
    elif isinstance(message, StartRound):
        head, tokens = [3, message.to_level, message.round, 0, 0], message.sequence
    else:
        raise ProtocolError(f"not a chain message: {message!r}")
    return np.asarray([*head, len(tokens), *tokens], dtype=np.int64)


def decode_chain(body: np.ndarray):
    """The PipeSpec message of a TAG_CHAIN body, or None for FINISH."""
    values = body.tolist()
    if len(values) < 6 or len(values) != 6 + values[5]:
        raise ProtocolError(f"chain message of {len(values)} values does not match its header {values[:6]}")
    kind, to, a, b, c = values[:5]
    tokens = tuple(values[6:])
    if kind == 0:
        return SendTokens(to, a, b, tokens, round=c)
    if kind == 1:
        return SendRollback(to, tokens)
    if kind == 2:
        return SendProgress(to, a, b)
    if kind == 3:
        return StartRound(to, a, tokens)
    if kind == CHAIN_FINISH:
        return None
    raise ProtocolError(f"unknown chain message kind {kind}")


def describe(tag: int, body: np.ndarray, has_payload: bool) -> tuple[str, int]:
    """(transfer note, run id) of a message, as the simulator names its transfers."""
    if tag == TAG_RUN:
        run_id = int(body[0])
        stop = bool(int(body[1]) & STOP)
        computed = bool(int(body[1]) & COMPUTED)
        if stop:
            return "stop", run_id
        if has_payload:
            return ("activations" if computed else "skipped-activations"), run_id
        return "header", run_id
    if tag == TAG_PRED:
        return "predictions", int(body[0])
    if tag == TAG_DISCARD:
        return "skipped-predictions", int(body[0])
    if tag == TAG_CANCEL:
        return "cancel", -1
    if tag == TAG_EARLY:
        return "early-exit", int(body[0])
    if tag == TAG_CHAIN:
        names = ("SendTokens", "SendRollback", "SendProgress", "StartRound", "finish")
        kind = int(body[0])
        return (names[kind] if 0 <= kind < len(names) else "control"), -1
    if tag == TAG_KVTX:
        return "kv-transaction", int(body[0])
    if tag == TAG_DRAFT:
        return ("draft-reply" if int(body[0]) == DRAFT_REPLY else "draft-request"), -1
    return "control", -1
