"""Least-squares fits of the cost model's small, physically meaningful forms.

Per layer, a run of ``n`` tokens after ``c`` cached positions takes ``a + b·n + d·n·c`` seconds: ``a`` is what
does not depend on the batch (reading the layer's weights, launching its kernels), ``b`` the per-token work
(matrix products), ``d`` the attention over the cache. A stage of ``L`` layers plus, on the last stage, an output
head of ``h0 + h1·m`` for ``m`` returned predictions, plus a per-run overhead ``o``:

    t = o + L·(a + b·n + d·n·c) + [last] (h0 + h1·m)

A single token is a case of its own: its products are matrix-vector products, which BLAS libraries run with other
kernels than matrix-matrix ones (on the 2-core development machine a 1-token SmolLM2 stage takes 30 ms and a
2-token one 44 ms, which no straight line through larger runs reproduces). So a 1-token run has its own per-layer
fixed cost ``a1`` (``L·(a1 + d·c)``) and a 1-prediction head its own ``h1'``; both are fitted only when the samples
hold such runs, and otherwise fall back to the general form.

A link message of ``s`` bytes takes ``latency + s / bandwidth``. Fits minimise squared *relative* error (each row
divided by its measured time), so short and long runs count alike; coefficients are constrained to be
non-negative (non-negative least squares by active set), because a negative cost has no physical meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..world.profile import stage_form


def nonnegative_least_squares(design: np.ndarray, target: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """min ||A x - y||² subject to x >= 0 (Lawson-Hanson active set)."""
    a = np.asarray(design, dtype=float)
    y = np.asarray(target, dtype=float)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    gradient = a.T @ (y - a @ x)
    for _ in range(max_iter):
        candidates = ~passive & (gradient > 1e-12 * max(1.0, np.abs(gradient).max()))
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, gradient, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            blocking = passive & (z <= 0)
            steps = x[blocking] / (x[blocking] - z[blocking])
            alpha = steps.min() if steps.size else 0.0
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
        gradient = a.T @ (y - a @ x)
    return x


@dataclass(frozen=True)
class FitQuality:
    """How well a fit reproduces its own measurements (relative errors)."""

    n_points: int
    median_rel_error: float
    max_rel_error: float


def _quality(design: np.ndarray, coefficients: np.ndarray, measured: np.ndarray) -> FitQuality:
    predicted = design @ coefficients
    rel = np.abs(predicted - measured) / measured
    return FitQuality(int(len(measured)), float(np.median(rel)), float(rel.max()))


@dataclass(frozen=True)
class StageSample:
    """One timed run on one stage."""

    n_layers: int
    n_tokens: int
    context: int
    n_outputs: int  # predictions computed by the output head (0 when the stage has none)
    seconds: float


@dataclass(frozen=True)
class StageFit:
    overhead: float
    layer_fixed: float
    layer_per_token: float
    layer_per_token_context: float
    head_fixed: float
    head_per_output: float
    quality: FitQuality
    layer_single: float | None = None  # per-layer fixed cost of a 1-token run (None: the general form)
    head_single: float | None = None  # head time for 1 prediction (None: the general form)

    def predict(self, n_layers: int, n_tokens: int, context: int, n_outputs: int) -> float:
        return stage_form(self, n_layers, n_tokens, context, n_outputs)


_COLUMNS = ("overhead", "layer_fixed", "layer_per_token", "layer_per_token_context", "head_fixed", "head_per_output",
            "layer_single", "head_single")


def _stage_design(samples: Sequence[StageSample], single_tokens: bool, single_head: bool) -> np.ndarray:
    rows = []
    for s in samples:
        one = single_tokens and s.n_tokens == 1
        one_out = single_head and s.n_outputs == 1
        head = 1.0 if s.n_outputs and not one_out else 0.0
        rows.append([1.0, 0.0 if one else s.n_layers, 0.0 if one else s.n_layers * s.n_tokens,
                     s.n_layers * s.n_tokens * s.context, head, head * s.n_outputs,
                     s.n_layers if one else 0.0, 1.0 if one_out else 0.0])
    return np.array(rows)


def fit_stage(samples: Sequence[StageSample]) -> StageFit:
    """Fit the stage form to timed runs (they should vary tokens, context and, ideally, layers)."""
    if len(samples) < 4:
        raise ValueError(f"need at least 4 stage samples to fit, got {len(samples)}")
    # the single-token terms need runs on both sides of the split to be told apart from the general form
    single_tokens = {s.n_tokens == 1 for s in samples} == {True, False}
    single_head = {s.n_outputs == 1 for s in samples if s.n_outputs} == {True, False}
    design = _stage_design(samples, single_tokens, single_head)
    measured = np.array([s.seconds for s in samples])
    if (measured <= 0).any():
        raise ValueError("stage samples must have positive times")
    weights = 1.0 / measured
    coefficients = nonnegative_least_squares(design * weights[:, None], measured * weights)
    if not any(s.n_layers != samples[0].n_layers for s in samples):
        # with one layer count, "overhead" and "L·a" cannot be told apart: attribute the fixed part to layers
        n_layers = samples[0].n_layers
        coefficients[1] += coefficients[0] / n_layers
        if single_tokens:
            coefficients[6] += coefficients[0] / n_layers
        coefficients[0] = 0.0
    values = dict(zip(_COLUMNS, map(float, coefficients), strict=True))
    if not single_tokens:
        values["layer_single"] = None
    if not single_head:
        values["head_single"] = None
    return StageFit(**values, quality=_quality(design, coefficients, measured))


@dataclass(frozen=True)
class LinkSample:
    nbytes: float
    seconds: float  # one-way time


@dataclass(frozen=True)
class LinkFit:
    latency: float
    bandwidth: float  # bytes per second
    quality: FitQuality

    def predict(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


def fit_link(samples: Sequence[LinkSample]) -> LinkFit:
    """Fit latency + bytes / bandwidth to one-way message times over several sizes."""
    if len(samples) < 2 or len({s.nbytes for s in samples}) < 2:
        raise ValueError("need link samples of at least 2 different sizes")
    design = np.array([[1.0, s.nbytes] for s in samples])
    measured = np.array([s.seconds for s in samples])
    weights = 1.0 / measured
    latency, per_byte = nonnegative_least_squares(design * weights[:, None], measured * weights)
    bandwidth = 1.0 / per_byte if per_byte > 0 else float("inf")
    return LinkFit(float(latency), float(bandwidth), _quality(design, np.array([latency, per_byte]), measured))


@dataclass(frozen=True)
class DraftSample:
    n_tokens: int
    context: int
    seconds: float  # one draft-model forward (all its layers and its output head)


@dataclass(frozen=True)
class DraftFit:
    fixed: float
    per_token: float
    per_token_context: float
    quality: FitQuality

    def predict(self, n_tokens: int, context: int) -> float:
        return self.fixed + self.per_token * n_tokens + self.per_token_context * n_tokens * context


def fit_draft(samples: Sequence[DraftSample]) -> DraftFit:
    """Fit a + b·n + d·n·c to whole draft-model forwards."""
    if len(samples) < 3:
        raise ValueError(f"need at least 3 draft samples, got {len(samples)}")
    design = np.array([[1.0, s.n_tokens, s.n_tokens * s.context] for s in samples])
    measured = np.array([s.seconds for s in samples])
    weights = 1.0 / measured
    coefficients = nonnegative_least_squares(design * weights[:, None], measured * weights)
    return DraftFit(*map(float, coefficients), quality=_quality(design, coefficients, measured))
