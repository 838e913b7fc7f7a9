"""The head-draft exchange when the draft runs on a node of its own: who sends what, and its bytes.

PipeInfer's reference (``examples/speculative/speculative.cpp``) runs the draft on ranks of their own (the
paper's script: 7 target ranks and 1 draft rank). ``main()`` splits a two-rank communicator of the pipeline
roots, rank 0 and the first draft rank (``llama_split_comm`` / ``llama_swap_comm``), and both roots run the same
control loop, kept in lockstep by one-value broadcasts on it (``llama_sync_token`` and ``llama_sync_token_data``,
one ``MPI_Bcast`` of a 4-byte value each, ``ggml_mpi_synch_int``/``_float`` in ``ggml-mpi.c``):

- from the head, per speculative run, its waiting flag (``is_waiting``, in ``run_speculation_loop``), and each
  target token it samples (``llama_sync_token(ctx_tgt, &id, 0)`` in ``main``'s sampling loop);
- from the draft root, per draft step, the step's batch index and its top-8 candidates, id, logit and p each a
  broadcast of its own (``start_async_spec_run``): 25 values of 4 bytes.

Between its steps the draft root waits for nothing from the head (it drafts a whole run, then waits for the next
flag). pipesim's executor sends the same in two messages: a draft request from the head when a draft starts (the
waiting flag and the tokens the draft has not yet processed, the sampled ids among them) and a reply from the
draft node after each step (25 values, as the reference's broadcasts; ours fills the first few); the draft node
computes its steps back to back and the head waits for each reply. Sizes are the executor's int64 frames
(``world.costs.Payloads`` does the same for the pipeline's messages); on a link of latency + bytes/bandwidth the
reference's 25 back-to-back broadcasts of a step arrive when one message of their bytes would.
"""

from __future__ import annotations

from .costs import _INT, _PREFIX

REQUEST_HEAD = 6  # kind, task id, cached tokens kept, tokens to draft, stop on low confidence, min confidence
REPLY_VALUES = 25  # as many values as the reference's per-step broadcasts: batch index + 8 x (id, logit, p)


def request_bytes(n_new_tokens: int) -> float:
    """The head's draft request: its header and the tokens the draft must process first."""
    return _INT * (_PREFIX + REQUEST_HEAD + n_new_tokens)


def reply_bytes() -> float:
    """The draft node's reply after one step."""
    return _INT * (_PREFIX + REPLY_VALUES)
