"""The shipped SmolLM2 drafts (``smollm2-exitK``: the target's first K layers, the shipped exit adapter, the shared
head) against SmolLM2-135M itself, on held-out chat prompts: greedy agreement given the target's prefix, per-token
acceptance and accepted runs when drafting gamma tokens, and a draft step's cost against a target step's.

    python benchmarks/draft_smollm2.py --out benchmarks/results/draft_smollm2.md \\
        --pairs benchmarks/results/draft_smollm2_pairs.csv

Needs the fetched GGUF (``pipesim models fetch smollm2``). Costs are medians of single-token steps on one torch
thread, draft and target timed in the same run, so their ratio is what counts (this machine's speed moves).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipesim.executor.modelref import resolve_model
from pipesim.executor.torch_backend import ModelStore, set_threads
from pipesim.models.draft_eval import (
    HELDOUT_PROMPTS,
    agreement_pairs,
    conditional_rates,
    step_seconds,
    target_continuations,
    windows,
)
from pipesim.models.exit_drafts import shipped_exit_adapters
from pipesim.models.tokenizer import GGUFTokenizer

GAMMAS = (1, 2, 4, 8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=None, help="exit layers to measure (default: every shipped one)")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens generated per prompt")
    parser.add_argument("--context", type=int, default=64, help="cached tokens before a timed step")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per model and round")
    parser.add_argument("--out", type=Path, default=Path("runs/draft_smollm2.md"))
    parser.add_argument("--pairs", type=Path, default=Path("runs/draft_smollm2_pairs.csv"),
                        help="CSV of the (probability, accepted) pairs of --pairs-layer's draft (with prompt, "
                             "position and tokens), as `pipesim acceptance fit --input pairs` reads them")
    parser.add_argument("--pairs-layer", type=int, default=10, help="exit layer of the draft whose pairs are kept")
    args = parser.parse_args(argv)
    set_threads(1)
    torch.manual_seed(0)
    shipped = shipped_exit_adapters("smollm2")
    layers = sorted(shipped) if args.layers is None else [int(k) for k in args.layers.split(",")]
    store = ModelStore()
    target_ref = resolve_model("smollm2", "model")
    target = store.full_model(target_ref)
    tokenizer = GGUFTokenizer.from_gguf(store._reader(target_ref))
    prompts = [tokenizer.encode_chat(text) for text in HELDOUT_PROMPTS]
    started, load_start = time.time(), os.getloadavg()[0]
    truths = target_continuations(target, prompts, args.tokens, tokenizer.eos_id)
    target_step = step_seconds(target, args.context, args.repeats)
    rows, all_pairs = [], []
    variants = [(k, True) for k in layers] + [(k, False) for k in layers if k == 10]
    for k, adapted in variants:
        ref = resolve_model(f"smollm2-exit{k}", "draft")
        if not adapted:
            ref = replace(ref, adapter=None, text=f"{ref.text} (plain exit)")
        draft = store.full_model(ref)
        pairs = agreement_pairs(draft, prompts, truths)
        if adapted and k == args.pairs_layer:
            all_pairs += [(k, p) for p in pairs]
        rates = conditional_rates(pairs)
        win = {g: windows(pairs, g) for g in GAMMAS}
        unbounded = windows(pairs, 10**6)
        cost = _cost_ratio(draft, target, args.context, args.repeats)
        rows.append((ref.text, rates, win, unbounded, cost, _weight_ratio(target.config, k, adapted)))
        print(f"{ref.text}: alpha {rates['alpha']:.3f}, cost ratio {cost:.3f}", file=sys.stderr)
    elapsed = time.time() - started
    args.pairs.parent.mkdir(parents=True, exist_ok=True)
    with args.pairs.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["probability", "accepted", "draft", "prompt", "position", "draft_token", "target_token"])
        for k, p in all_pairs:
            writer.writerow([f"{p.probability:.5f}", int(p.accepted), f"smollm2-exit{k}", p.prompt_index, p.position,
                             p.draft_token, p.target_token])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_report(args, rows, truths, target_step, elapsed, len(all_pairs), load_start))
    print(f"wrote {args.out} and {args.pairs}", file=sys.stderr)
    return 0


def _weight_ratio(config, layers: int, adapted: bool) -> float:
    """Weights a token meets in a draft of ``layers`` layers over the target's (layers and output head, and an
    adapter's one d x d map): the cost ratio of a memory- or FLOP-bound step, from the shape alone."""
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.d_ffn
    head = d * config.vocab_size
    return (layers * per_layer + head + (d * d if adapted else 0)) / (config.n_layers * per_layer + head)


def _cost_ratio(draft, target, context: int, repeats: int, rounds: int = 3) -> float:
    """Median over ``rounds`` of (draft step / target step), the two timed back to back (the machine's speed
    moves between rounds, less within one)."""
    ratios = []
    for _ in range(rounds):
        target_s = step_seconds(target, context, repeats)
        ratios.append(step_seconds(draft, context, repeats) / target_s)
    return sorted(ratios)[len(ratios) // 2]


def _report(args, rows, truths, target_step: float, elapsed: float, n_pairs: int, load_start: float) -> str:
    n_positions = sum(len(t) for t in truths)
    lines = [
        "# SmolLM2-135M drafts: greedy agreement and step cost (measured)",
        "",
        f"Command: `python benchmarks/draft_smollm2.py --out {args.out} --pairs {args.pairs}`"
        f" (`--tokens {args.tokens} --context {args.context} --repeats {args.repeats}`)",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, torch "
        f"{torch.__version__}, one torch thread, load average {load_start:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end (2 CPUs shared); {elapsed:.0f} s. Agreement does not depend on the "
        "machine; the cost ratios do a little (the two steps are timed back to back, but on a loaded machine "
        "they moved by up to 0.1 between runs: compare them with the weights column).",
        "",
        f"Prompts: the {len(truths)} held-out chat requests of `pipesim.models.draft_eval.HELDOUT_PROMPTS` (kept "
        "out of the adapters' training and selection prompts), each answered greedily by the target up to "
        f"{args.tokens} tokens or its end of turn: {n_positions} positions. At each position the draft sees the "
        "target's prefix and proposes its greedy token (acceptance judged against the prefix).",
        "",
        "- **alpha**: fraction of positions where the draft's token is the target's; **after acc / after rej**: "
        "the same after an agreeing / a disagreeing position (i.i.d. acceptance makes them equal);",
        "- **acc@g**: per-token acceptance drafting g tokens per verification (accepted / drafted, windows run "
        "as speculative decoding does: accepted + the target's token committed, the next window after them); "
        "**tok/verif@4**: tokens committed per verification at g = 4; **run mean**: mean accepted run with no "
        "window limit, next to alpha/(1-alpha) (geometric runs under i.i.d. acceptance);",
        f"- **cost**: a draft step / a target-only step, one token after {args.context} cached tokens, timed back "
        f"to back (median of 3 rounds; a target step took {target_step * 1e3:.2f} ms here at the start); "
        "**weights**: the weights a token meets in the draft over the target's (layers, head, the adapter's map): "
        "the ratio a memory- or FLOP-bound step would have, from the shape alone.",
        "",
        "| draft | alpha | after acc | after rej | acc@1 | acc@2 | acc@4 | acc@8 | tok/verif@4 | run mean | "
        "alpha/(1-alpha) | cost | weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for text, rates, win, unbounded, cost, weights in rows:
        alpha = rates["alpha"]
        geometric = alpha / (1 - alpha) if alpha < 1 else float("inf")
        run_mean = sum(unbounded.runs) / len(unbounded.runs)
        accs = " | ".join(f"{win[g].acceptance_rate:.3f}" for g in GAMMAS)
        lines.append(f"| `{text}` | {alpha:.3f} | {rates['after_accept']:.3f} | {rates['after_reject']:.3f} | "
                     f"{accs} | {win[4].tokens_per_window:.2f} | {run_mean:.2f} | {geometric:.2f} | "
                     f"{cost:.3f} | {weights:.3f} |")
    lines += [
        "",
        "Accepted runs at g = 4 (windows with 0, 1, 2, 3, 4 accepted tokens):",
        "",
    ]
    for text, _rates, win, _unbounded, _cost, _weights in rows:
        lines.append(f"- `{text}`: {win[4].histogram()}")
    lines += [
        "",
        f"The (probability, accepted) pairs of `smollm2-exit{args.pairs_layer}` ({n_pairs} rows: the draft's "
        f"probability of its greedy token, and whether the target agreed) are in `{args.pairs}`, for fitting a "
        f"confidence-carrying oracle (`pipesim acceptance fit {args.pairs} --model confidence`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
