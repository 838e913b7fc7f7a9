"""``pipesim acceptance fit``: acceptance models (iid, positional, markov) and the draft-confidence model fitted
from what a real draft did, written as the scenario's ``acceptance:`` fields.

Inputs:

- a trace JSON (``pipesim run --save-trace`` writes a list of generations; a single trace's JSON works too): each
  commit of the target (a ``tokens`` record) checked ``checked`` drafted tokens and accepted the first
  ``accepted``; its drafted tokens lie at the generated positions where the commit starts, so the positions of
  all outcomes are known exactly;
- a text file of accept/reject sequences, one verification window per line (``1`` accepted, ``0`` rejected;
  spaces and commas ignored, ``#`` starts a comment, a blank line starts another generation). A window stops at
  its first rejection. Consecutive windows are taken as consecutive in the generation, as synchronous speculative
  decoding makes them: after a window ending in a rejection the next one starts at the next position (the
  target's correction took the rejected one); after a fully accepted window one position (the target's bonus
  token) lies between them, unobserved;
- a CSV of ``probability,accepted`` pairs (a header line is allowed), one per checked drafted token: the draft's
  probability of its token and whether the target accepted it (1/0), for the confidence model.

Fits (maximum likelihood; the README's "Acceptance models" has the formulas): ``iid`` alpha = accepted / checked;
``replay`` the outcome observed at each generated position (unchecked ones drawn i.i.d. at alpha);
``positional`` alphas[d] = accepted at window depth d / checked at depth d; ``markov`` p_after_accept and
p_after_reject maximise the likelihood of every pair of consecutive observed outcomes, k positions apart, under
the chain's k-step transition probabilities; ``confidence`` Beta(a, b) of the accepted tokens' probabilities and of
the rejected ones', by the method of moments.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cli_args import check_output_file, int_at_least
from .trace import records_from_json

__all__ = ["Observations", "fit_iid", "fit_markov", "fit_positional", "fit_replay", "fit_confidence", "read_windows",
           "read_trace_windows", "read_pairs", "register"]

FIT_MODELS = ("iid", "positional", "markov", "replay")


class FitInputError(ValueError):
    """An input file that cannot be fitted; the message is one line naming the file and what was wrong."""


@dataclass
class Observations:
    """Verification windows (each a list of 1/0 outcomes, stopping at the first 0) and, per generation, every
    checked outcome with its generated position (``streams``: lists of (position, outcome) in position order)."""

    windows: list[list[int]] = field(default_factory=list)
    streams: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def n_checked(self) -> int:
        return sum(len(w) for w in self.windows)

    @property
    def n_accepted(self) -> int:
        return sum(sum(w) for w in self.windows)

    def add_generation(self, windows: Iterable[tuple[int, list[int]]]) -> None:
        """Windows of one generation, each with the generated position of its first drafted token."""
        stream: list[tuple[int, int]] = []
        for start, window in windows:
            if not window:
                continue
            self.windows.append(window)
            stream.extend((start + i, outcome) for i, outcome in enumerate(window))
        if stream:
            self.streams.append(stream)


# -- readers ---------------------------------------------------------------------------------------------

def read_windows(path: str | Path) -> Observations:
    """A text file of windows (see the module docstring)."""
    path = Path(path)
    observations = Observations()
    generation: list[tuple[int, list[int]]] = []
    position = 0
    for number, raw in enumerate(_read_text(path).splitlines(), 1):
        if not raw.strip():  # a blank line: another generation starts
            observations.add_generation(generation)
            generation, position = [], 0
            continue
        text = "".join(raw.split("#", 1)[0].replace(",", " ").split())
        if not text:  # a comment
            continue
        if set(text) - {"0", "1"}:
            raise FitInputError(f"{path}:{number}: {raw.strip()!r} is not a sequence of 1 (accepted) and 0 (rejected)")
        window = [int(c) for c in text]
        if 0 in window[:-1]:
            raise FitInputError(f"{path}:{number}: {text!r} goes on after a rejection (a window stops at its first 0: "
                                "tokens drafted after a wrong one are never checked)")
        generation.append((position, window))
        position += len(window) + (1 if window[-1] == 1 else 0)
    observations.add_generation(generation)
    if not observations.windows:
        raise FitInputError(f"{path}: no accept/reject windows in it")
    return observations


def trace_windows(data: dict[str, Any]) -> list[tuple[int, list[int]]]:
    """The windows of one trace's JSON: per commit of the target with drafted tokens checked, its generated start
    position and outcomes (the accepted ones first, then the rejected one if it checked more and committed the
    correction)."""
    records = [r for r in records_from_json(data) if str(r.kind) == "tokens"]
    if not records:
        return []
    target = max(r.level for r in records)
    windows: list[tuple[int, list[int]]] = []
    position = 0
    for r in sorted((r for r in records if r.level == target), key=lambda r: r.t0):
        if r.checked > 0:  # a rejection commits the target's correction after the accepted tokens; a commit cut
            # short by the end of the generation (or a stop token) does not, and its rejection is no outcome
            rejected = r.checked > r.accepted and r.n_tokens > r.accepted
            windows.append((position, [1] * r.accepted + ([0] if rejected else [])))
        position += r.n_tokens
    return windows


def read_trace_windows(path: str | Path) -> Observations:
    """A trace JSON: ``pipesim run --save-trace``'s list of generations, or one trace (``Trace.to_json``)."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise FitInputError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    traces = [entry.get("trace", entry) if isinstance(entry, dict) else entry for entry in data] \
        if isinstance(data, list) else [data]
    observations = Observations()
    for index, trace in enumerate(traces):
        if not isinstance(trace, dict) or "records" not in trace:
            raise FitInputError(f"{path}: entry {index} is not a trace (no 'records')")
        try:
            observations.add_generation(trace_windows(trace))
        except (TypeError, ValueError, LookupError, AttributeError) as error:
            raise FitInputError(f"{path}: entry {index}: unreadable records ({error})") from None
    if not observations.windows:
        raise FitInputError(f"{path}: no verified drafted tokens in it (a trace of a strategy that drafts?)")
    return observations


def read_pairs(path: str | Path) -> list[tuple[float, int]]:
    """A CSV of (probability, accepted) pairs (see the module docstring)."""
    path = Path(path)
    pairs: list[tuple[float, int]] = []
    for number, row in enumerate(csv.reader(_read_text(path).splitlines()), 1):
        cells = [c.strip() for c in row if c.strip()]
        if not cells or cells[0].startswith("#"):
            continue
        try:
            probability, accepted = float(cells[0]), cells[1]
        except (ValueError, IndexError):
            if number == 1 and not pairs:
                continue  # a header line
            raise FitInputError(f"{path}:{number}: {','.join(row)!r} is not 'probability,accepted'") from None
        if not 0.0 <= probability <= 1.0 or accepted not in ("0", "1"):
            raise FitInputError(f"{path}:{number}: {','.join(row)!r}: the probability must be in [0, 1] and "
                                "accepted 1 or 0")
        pairs.append((probability, int(accepted)))
    if not pairs:
        raise FitInputError(f"{path}: no (probability, accepted) pairs in it")
    return pairs


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise FitInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FitInputError(f"{path}: cannot be read ({error})") from None


# -- fits ------------------------------------------------------------------------------------------------

def fit_iid(observations: Observations) -> dict[str, Any]:
    """alpha = accepted / checked."""
    checked = observations.n_checked
    if not checked:
        raise FitInputError("no checked drafted tokens to fit")
    return {"model": "iid", "alpha": _round(observations.n_accepted / checked)}


def fit_positional(observations: Observations, max_depth: int = 16) -> dict[str, Any]:
    """alphas[d] = accepted at depth d / checked at depth d (window index as depth), for depths with data."""
    alphas = []
    for depth in range(max_depth):
        reached = [w[depth] for w in observations.windows if len(w) > depth]
        if not reached:
            break
        alphas.append(_round(sum(reached) / len(reached)))
    if not alphas:
        raise FitInputError("no checked drafted tokens to fit")
    return {"model": "positional", "alphas": alphas, **_alpha(observations)}


def transition_counts(observations: Observations) -> Counter:
    """(gap, from, to) -> how often an outcome ``to`` was observed ``gap`` positions after an outcome ``from``
    (consecutive observations of a generation)."""
    counts: Counter = Counter()
    for stream in observations.streams:
        for (p0, a), (p1, b) in zip(stream, stream[1:], strict=False):
            if p1 > p0:
                counts[(p1 - p0, a, b)] += 1
    return counts


def markov_log_likelihood(counts: Counter, p_after_accept: np.ndarray, p_after_reject: np.ndarray) -> np.ndarray:
    """Log-likelihood of the transition counts under the two-state chain (arrays broadcast). The k-step
    probability of reaching "right" from state s is ``pi + lam^k (s - pi)``, with ``pi`` the stationary rate and
    ``lam = p_after_accept - p_after_reject``."""
    lam = p_after_accept - p_after_reject
    with np.errstate(divide="ignore", invalid="ignore"):
        pi = np.where(1.0 - lam > 0, p_after_reject / np.maximum(1.0 - lam, 1e-300), 1.0)
    total = np.zeros(np.broadcast(p_after_accept, p_after_reject).shape)
    for (gap, start, end), n in counts.items():
        right = pi + lam ** gap * (start - pi)
        p = right if end == 1 else 1.0 - right
        total = total + n * np.log(np.clip(p, 1e-300, 1.0))
    return total


def fit_markov(observations: Observations) -> dict[str, Any]:
    """p_after_accept, p_after_reject by maximum likelihood (closed form when every gap is one position)."""
    counts = transition_counts(observations)
    from_right = sum(n for (_g, a, _b), n in counts.items() if a == 1)
    from_wrong = sum(n for (_g, a, _b), n in counts.items() if a == 0)
    if not from_right or not from_wrong:
        missing = "an accepted" if not from_right else "a rejected"
        raise FitInputError(f"markov: no outcome observed after {missing} one (too few windows to fit the chain)")
    if all(gap == 1 for gap, _a, _b in counts):
        p_aa = counts[(1, 1, 1)] / from_right
        p_ar = counts[(1, 0, 1)] / from_wrong
    else:
        p_aa, p_ar = _grid_maximum(counts)
    return {"model": "markov", "p_after_accept": _round(p_aa), "p_after_reject": _round(p_ar), **_alpha(observations)}


def compare_iid_markov(observations: Observations) -> tuple[float, float] | None:
    """The mean log-likelihood per observed transition under the fitted iid and markov models (higher fits
    better; None when the chain cannot be fitted)."""
    counts = transition_counts(observations)
    n = sum(counts.values())
    try:
        markov = fit_markov(observations)
    except FitInputError:
        return None
    alpha = observations.n_accepted / observations.n_checked
    iid = sum(k * math.log(max(alpha if end else 1 - alpha, 1e-300)) for (_g, _a, end), k in counts.items())
    chain = float(markov_log_likelihood(counts, np.array(markov["p_after_accept"]), np.array(markov["p_after_reject"])))
    return iid / n, chain / n


def _grid_maximum(counts: Counter) -> tuple[float, float]:
    """The likelihood's maximum on a grid over (0, 1)^2, refined twice around the best point."""
    centre, half, steps = (0.5, 0.5), 0.5, 401
    for _ in range(3):
        aa = np.clip(np.linspace(centre[0] - half, centre[0] + half, steps), 1e-6, 1 - 1e-6)
        ar = np.clip(np.linspace(centre[1] - half, centre[1] + half, steps), 1e-6, 1 - 1e-6)
        grid = markov_log_likelihood(counts, aa[:, None], ar[None, :])
        i, j = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
        centre, half = (float(aa[i]), float(ar[j])), half * 8 / steps
    return centre


def fit_replay(observations: Observations, seed: int = 0, margin: int = 64) -> dict[str, Any]:
    """The observed outcome per generated position (generations one after another), for ``acceptance.model:
    replay``; positions never checked (bonus tokens, tokens decoded without a draft, ``margin`` positions past the
    last) are drawn i.i.d. at the fitted alpha with ``seed``."""
    alpha = fit_iid(observations)["alpha"]
    rng = np.random.default_rng(seed)
    sequence: list[int] = []
    for index, stream in enumerate(observations.streams):
        length = stream[-1][0] + 1 + (margin if index == len(observations.streams) - 1 else 0)
        filled = (rng.random(length) < alpha).astype(int).tolist()
        for position, outcome in stream:
            filled[position] = outcome
        sequence.extend(filled)
    return {"model": "replay", "sequence": sequence, "alpha": alpha}


def fit_confidence(pairs: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Beta(a, b) of the accepted and of the rejected tokens' probabilities (method of moments), and alpha."""
    fitted: dict[str, Any] = {"confidence": True}
    for name, label in (("confidence_right", 1), ("confidence_wrong", 0)):
        values = np.array([p for p, accepted in pairs if accepted == label], dtype=float)
        kind = "accepted" if label else "rejected"
        if len(values) < 2:
            raise FitInputError(f"confidence: fewer than 2 {kind} tokens among the pairs")
        mean, var = float(values.mean()), float(values.var(ddof=1))
        if not 0 < mean < 1 or var <= 0 or var >= mean * (1 - mean):
            raise FitInputError(f"confidence: the {kind} tokens' probabilities (mean {mean:.3g}, variance "
                                f"{var:.3g}) fit no Beta distribution")
        common = mean * (1 - mean) / var - 1
        fitted[name] = [_round(mean * common), _round((1 - mean) * common)]
    accepted = sum(a for _p, a in pairs)
    return {"alpha": _round(accepted / len(pairs)), **fitted}


def _alpha(observations: Observations) -> dict[str, float]:
    return {"alpha": fit_iid(observations)["alpha"]}


def _round(value: float) -> float:
    return float(f"{value:.4g}")


# -- the command -------------------------------------------------------------------------------------------

def fit_file(path: str, model: str | None, input_format: str, max_depth: int,
             confidence: str | None, seed: int = 0) -> tuple[dict[str, Any], str]:
    """The fitted ``acceptance:`` fields of one input (and a one-line summary of what they came from)."""
    kind = input_format if input_format != "auto" else _detect(path)
    if kind == "pairs":
        if model not in (None, "confidence"):
            raise FitInputError(f"{path}: a CSV of (probability, accepted) pairs fits the confidence model, "
                                f"not --model {model}")
        pairs = read_pairs(path)
        return {"model": "iid", **fit_confidence(pairs)}, f"{len(pairs)} (probability, accepted) pairs"
    if model == "confidence":
        raise FitInputError(f"{path}: --model confidence needs a CSV of (probability, accepted) pairs")
    observations = read_trace_windows(path) if kind == "trace" else read_windows(path)
    model = model or "markov"
    if model == "iid":
        fields = fit_iid(observations)
    elif model == "positional":
        fields = fit_positional(observations, max_depth)
    elif model == "replay":
        fields = fit_replay(observations, seed)
    else:
        fields = fit_markov(observations)
    summary = (f"{len(observations.windows)} windows, {observations.n_checked} checked drafted tokens, "
               f"{observations.n_accepted} accepted, {len(observations.streams)} generation(s)")
    compared = compare_iid_markov(observations)
    if compared is not None:
        summary += (f"\n# mean log-likelihood per observed transition (higher fits better): iid {compared[0]:.4f}, "
                    f"markov {compared[1]:.4f}")
    if confidence:
        pairs = read_pairs(confidence)
        fields.update({k: v for k, v in fit_confidence(pairs).items() if k != "alpha"})
        summary += f"; confidence from {len(pairs)} pairs"
    return fields, summary


def _detect(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return "trace" if suffix == ".json" else "pairs" if suffix == ".csv" else "windows"


def _cmd_fit(args: argparse.Namespace) -> int:
    try:
        fields, summary = fit_file(args.input, args.model, args.input_format, args.max_depth, args.confidence,
                                   args.seed)
    except FitInputError as error:
        print(f"pipesim acceptance fit: error: {error}", file=sys.stderr)
        return 2
    text = "".join([f"# fitted by `pipesim acceptance fit` from {args.input}: {summary}\n", "acceptance:\n",
                    *(f"  {key}: {json.dumps(value)}\n" for key, value in fields.items())])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"acceptance fields written to {out} ({summary.splitlines()[0]})")
    else:
        print(text, end="")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``acceptance`` command (``acceptance fit``) to a CLI's subparsers."""
    acceptance = subparsers.add_parser("acceptance", help="fit acceptance models to what a real draft did")
    actions = acceptance.add_subparsers(dest="acceptance_command", metavar="{fit}")
    acceptance.set_defaults(func=lambda args: (acceptance.print_help(sys.stderr), 2)[1])
    fit = actions.add_parser(
        "fit", help="fit iid / positional / markov / replay (and the confidence model) to recorded drafts",
        description="Fit an acceptance model to recorded verification outcomes and print the scenario's "
                    "acceptance: fields as YAML. INPUT: a trace JSON (pipesim run --save-trace), a text file of "
                    "accept/reject windows (one per line, 1/0; a blank line starts another generation) or a CSV of "
                    "probability,accepted pairs (the confidence model).")
    fit.add_argument("input", metavar="INPUT", help="trace .json, windows text file, or pairs .csv")
    fit.add_argument("--model", choices=(*FIT_MODELS, "confidence"), default=None,
                     help="model to fit (default: markov for windows and traces, confidence for pairs)")
    fit.add_argument("--input-format", choices=("auto", "trace", "windows", "pairs"), default="auto",
                     help="what INPUT holds (auto: .json a trace, .csv pairs, anything else windows)")
    fit.add_argument("--max-depth", type=int_at_least(1), default=16, help="positional: most depths fitted")
    fit.add_argument("--confidence", metavar="PAIRS.csv", help="also fit the confidence model from these pairs")
    fit.add_argument("--seed", type=int_at_least(0), default=0,
                     help="replay: seed of the i.i.d. draws at unchecked positions")
    fit.add_argument("--out", metavar="FILE", type=check_output_file, help="write the YAML here (default: stdout)")
    fit.set_defaults(func=_cmd_fit)

