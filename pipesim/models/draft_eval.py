"""How well a draft model agrees with its target under greedy decoding, and what a draft step costs.

Agreement is judged against the prefix (as acceptance is everywhere in pipesim): at each position of the
target's greedy continuation of a prompt, the draft sees the target's own committed prefix and proposes its
greedy token; the pair (the draft's probability of that token, whether it equals the target's) is one
``DraftPair``. One batched draft forward over prompt + continuation gives every position at once.

Speculative windows follow from the same sequence without running them: drafting ``gamma`` tokens from a
committed prefix, the draft's first proposal is its prediction at that position, and every later proposal is
conditioned on the earlier ones, which equal the target's tokens for as long as they are accepted, so the
accepted run of a window is the number of consecutive agreeing positions from its start (at most ``gamma``).
The target then commits the accepted tokens plus its own next one, and the next window starts after them
(``windows``). ``test_draft_eval`` checks this against real autoregressive drafting.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipesim.models.kv_cache import token_seq_mask
from pipesim.models.llama import LlamaStage, greedy_generate

__all__ = [
    "HELDOUT_PROMPTS",
    "DraftPair",
    "WindowStats",
    "agreement_pairs",
    "conditional_rates",
    "step_seconds",
    "target_continuations",
    "windows",
]


# Chat requests written for measuring drafts, apart from every prompt the shipped exit adapters saw
# (``exit_training.chat_prompts`` trained them, ``exit_training.eval_prompts`` selected them): no shared template
# or topic (a test checks none of them occurs there).
HELDOUT_PROMPTS = (
    "Describe how a lighthouse keeper spent a winter night a hundred years ago.",
    "What is the difference between a lake and a pond?",
    "Write a short note to a neighbour about a parcel I took in for them.",
    "Explain how a refrigerator keeps food cold.",
    "List the planets of the solar system in order from the Sun, with one fact about each.",
    "How do I write a good summary of a scientific article?",
    "Tell me about the history of the paperclip.",
    "What are the rules of the card game snap?",
)


@dataclass(frozen=True)
class DraftPair:
    """One position of a target continuation: the draft's greedy token, its probability, and the target's."""

    prompt_index: int
    position: int  # index in the continuation (0: the first generated token)
    draft_token: int
    target_token: int
    probability: float

    @property
    def accepted(self) -> bool:
        return self.draft_token == self.target_token


def target_continuations(target: LlamaStage, prompts: Sequence[Sequence[int]], n_tokens: int,
                         eos_id: int | None = None) -> list[list[int]]:
    """The target's greedy continuation of each prompt (``n_tokens``, or up to and including ``eos_id``)."""
    return [greedy_generate(target, list(prompt), n_tokens, eos_id=eos_id) for prompt in prompts]


@torch.no_grad()
def agreement_pairs(draft: LlamaStage, prompts: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[int]]) -> list[DraftPair]:
    """The draft's proposal at each position of each prompt's target continuation, given the target's prefix."""
    if not draft.has_embedding or not draft.has_output_head or draft.layer_start != 0:
        raise ValueError("agreement_pairs needs a draft stage with the embedding, its layers from 0 and a head")
    pairs: list[DraftPair] = []
    for index, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        ids = torch.tensor(list(prompt) + list(continuation[:-1]), dtype=torch.int64)
        n = ids.numel()
        logits = draft(ids, torch.arange(n), token_seq_mask([0] * n, 1), draft.make_kv_cache(n),
                       output_from=len(prompt) - 1)
        best_p, best = torch.softmax(logits.to(torch.float32), dim=-1).max(dim=-1)
        for i, want in enumerate(continuation):
            pairs.append(DraftPair(index, i, int(best[i]), int(want), float(best_p[i])))
    return pairs


@dataclass(frozen=True)
class WindowStats:
    """Speculative windows of ``gamma`` drafted tokens over the continuations."""

    gamma: int
    runs: list[int]  # accepted tokens of each window
    checked: int  # drafted tokens verified (gamma per window, fewer where a continuation ends)

    @property
    def acceptance_rate(self) -> float:
        """Drafted tokens accepted / drafted tokens checked."""
        return sum(self.runs) / self.checked if self.checked else float("nan")

    @property
    def tokens_per_window(self) -> float:
        """Tokens committed per verification (accepted + the target's own)."""
        return statistics.fmean(self.runs) + 1 if self.runs else float("nan")

    def histogram(self) -> list[int]:
        """Windows with 0, 1, ..., gamma accepted tokens."""
        return [sum(1 for a in self.runs if a == k) for k in range(self.gamma + 1)]


def windows(pairs: Sequence[DraftPair], gamma: int) -> WindowStats:
    """Windows of ``gamma`` drafted tokens over each prompt's agreement sequence (see the module docstring)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    runs: list[int] = []
    checked = 0
    for agree in _sequences(pairs):
        i = 0
        while i < len(agree) - 1:  # the last position is the target's own: nothing left to draft for
            width = min(gamma, len(agree) - 1 - i)
            run = 0
            while run < width and agree[i + run]:
                run += 1
            runs.append(run)
            checked += width
            i += run + 1
    return WindowStats(gamma, runs, checked)


def conditional_rates(pairs: Sequence[DraftPair]) -> dict[str, float]:
    """Agreement overall, after an agreeing position and after a disagreeing one (burstiness: i.i.d. makes them
    equal), with the counts behind them."""
    after = {True: [0, 0], False: [0, 0]}
    total = [0, 0]
    for agree in _sequences(pairs):
        for j, ok in enumerate(agree):
            total[0] += ok
            total[1] += 1
            if j:
                after[agree[j - 1]][0] += ok
                after[agree[j - 1]][1] += 1

    def rate(hits: list[int]) -> float:
        return hits[0] / hits[1] if hits[1] else float("nan")

    return {"alpha": rate(total), "after_accept": rate(after[True]), "after_reject": rate(after[False]),
            "n": total[1], "n_after_accept": after[True][1], "n_after_reject": after[False][1]}


def _sequences(pairs: Sequence[DraftPair]) -> list[list[bool]]:
    by_prompt: dict[int, list[DraftPair]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair.prompt_index, []).append(pair)
    return [[p.accepted for p in sorted(group, key=lambda p: p.position)] for group in by_prompt.values()]


@torch.no_grad()
def step_seconds(model: LlamaStage, context: int, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one single-token decode step of ``model`` after ``context`` cached tokens (one
    sequence; the output head computed for the token, as a draft step or a target-only step does)."""
    kv = model.make_kv_cache(context + 1)
    seq = token_seq_mask([0] * context, 1)
    model(torch.zeros(context, dtype=torch.int64), torch.arange(context), seq, kv, output_from=context - 1)
    one = token_seq_mask([0], 1)
    position = torch.tensor([context])
    times = []
    for k in range(warmup + repeats):
        start = time.perf_counter()
        model(torch.tensor([k % model.config.vocab_size]), position, one, kv)
        elapsed = time.perf_counter() - start
        kv.seq_rm(0, context)  # the next step sees the same context
        if k >= warmup:
            times.append(elapsed)
    return statistics.median(times)
