"""The trace vocabulary: typed records both engines write (the driver and the stage machine emit most of them).

A record is a flat named tuple (cheap to append in the simulator's hot loop; plain tuples in this field order
are records too). Fields that free-text notes used to encode are structured:

- ``kind``       what happened (``RecordKind``; a ``str`` enum, so ``kind == "compute"`` holds)
- ``t0``/``t1``  start and end (equal for instants), in the engine's clock
- ``where``      node name, or link direction ``"n0->n1"`` for transfers
- ``run_id``, ``n_tokens``, ``nbytes``, ``checked``/``accepted`` (drafted tokens at a commit)
- ``what``       the work or message: compute ``stage``/``draft``/``verify``/``exit``; transfer ``activations``/
                 ``header``/``predictions``/``cancel``/``early-exit``/``level-message``; launch the run's kind
                 (``prefill``/``decode``/``verify``/``spec``)
- ``stage``      the pipeline stage of a stage compute or skip (-1 elsewhere); an early exit's layer for ``exit``
- ``level``      the model of a PipeSpec chain (0 the smallest draft; 0 for single-model strategies)
- ``speculative`` a launched run that carries drafted tokens
- ``aborted``    a stage compute cut short by a cancellation
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

TRACE_FORMAT = "pipesim-trace/2"


class RecordKind(str, Enum):
    """What a record is about (see the module docstring)."""

    LAUNCH = "launch"
    COMPUTE = "compute"
    DISPATCH = "dispatch"
    SKIP = "skip"
    TRANSFER = "transfer"
    CANCEL_SENT = "cancel_sent"
    CANCEL_SEEN = "cancel_seen"
    INVALIDATE = "invalidate"
    TOKENS = "tokens"

    def __str__(self) -> str:
        return self.value


LAUNCH, COMPUTE, DISPATCH, SKIP, TRANSFER = (RecordKind.LAUNCH, RecordKind.COMPUTE, RecordKind.DISPATCH,
                                             RecordKind.SKIP, RecordKind.TRANSFER)
CANCEL_SENT, CANCEL_SEEN, INVALIDATE, TOKENS = (RecordKind.CANCEL_SENT, RecordKind.CANCEL_SEEN,
                                                RecordKind.INVALIDATE, RecordKind.TOKENS)


class Record(NamedTuple):
    kind: str
    t0: float
    t1: float
    where: str
    run_id: int = -1
    n_tokens: int = 0
    nbytes: float = 0.0
    checked: int = 0
    accepted: int = 0
    what: str = ""
    stage: int = -1
    level: int = 0
    speculative: bool = False
    aborted: bool = False


# Constructors of records as plain tuples in Record's field order (engines turn them into Records once, at the end
# of a run); the hottest paths write such tuples directly.

def stage_compute(t0: float, t1: float, where: str, run_id: int, n_tokens: int, stage: int, level: int = 0,
                  aborted: bool = False) -> tuple:
    """A pipeline stage's forward of a run (the target's, or a chain level's model)."""
    return (COMPUTE, t0, t1, where, run_id, n_tokens, 0.0, 0, 0, "stage", stage, level, False, aborted)


def span(kind: RecordKind, t0: float, t1: float, where: str, run_id: int, n_tokens: int, what: str,
         stage: int = -1, level: int = 0) -> tuple:
    """A span of work that is not a stage's forward (a draft step, a verification, a dispatch, an early exit)."""
    return (kind, t0, t1, where, run_id, n_tokens, 0.0, 0, 0, what, stage, level, False, False)


def legacy_record(row) -> Record:
    """A record of format 1 (``(kind, t0, t1, where, run_id, n_tokens, nbytes, checked, accepted, note)``)."""
    kind, t0, t1, where, run_id, n_tokens, nbytes, checked, accepted, note = row
    what, stage, level, speculative, aborted = note, -1, 0, False, False
    if kind == "compute" and note.startswith("stage"):
        body, _, flag = note.partition(":")
        what, stage, aborted = "stage", int(body[5:] or 0), flag == "aborted"
    elif kind == "compute" and note.startswith("exit"):
        what, stage = "exit", int(note[4:] or -1)
    elif kind == "launch":
        speculative = note == "spec"
        if note.startswith("L") and note[1:].isdigit():
            what, level = "decode", int(note[1:])
    return Record(kind, t0, t1, where, run_id, n_tokens, nbytes, checked, accepted, what, stage, level,
                  speculative, aborted)
