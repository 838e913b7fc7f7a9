"""Early-exit self-draft (SPEED): predict the next token from the hidden state after layer k.

An ``ExitAdapter`` maps the residual-stream state after the first ``k`` decoder layers (blocks ``0..k-1``)
to a state that the model's own final RMSNorm and output head (shared, frozen) turn into logits. It is an
identity-initialised residual map ``h + B(A x) + s b`` with ``s = rms(h)`` and ``x = h / s`` (low rank ``r``),
or ``h + s (W x + b)`` (full rank); ``B``, ``W`` and ``b`` start at zero, so an untrained adapter returns ``h``
itself and its logits are exactly the plain early exit's. Working on ``x`` keeps the map scale-equivariant,
so one learning rate suits every exit layer whatever the residual stream's magnitude there. A learned logit
scale (an inverse temperature, starting at 1) lets training calibrate the exit's confidence, which the
final RMSNorm would otherwise pin; it never changes the argmax.

Exit layer ``k`` counts layers: the hidden state after layer ``k`` is what a pipeline stage holding layers
``[0, k)`` sends on (the output of the layer with 0-based index ``k - 1``); ``k = n_layers`` is the full
model's final state.

Files (``save``/``load``) are ``torch.save`` dicts of float16 tensors plus metadata naming the model (name,
shape and a fingerprint of its output head) and the exit layer; loading checks them against the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipesim.models.kv_cache import KVCache, token_seq_mask
from pipesim.models.llama import LlamaStage

__all__ = [
    "ADAPTER_FORMAT",
    "AdapterMismatchError",
    "ExitAdapter",
    "ExitTarget",
    "capture_exit_states",
    "early_exit_logits",
    "exit_agreement",
    "exit_predictions",
    "forward_with_exits",
    "model_fingerprint",
    "output_head_weight",
    "shipped_acceptance",
    "shipped_adapter_path",
    "shipped_adapters_dir",
]

ADAPTER_FORMAT = "pipesim-exit-adapter"
ADAPTER_VERSION = 1
RMS_EPS = 1e-6
_FINGERPRINT_ROWS = 1024  # head rows hashed (evenly strided); enough to tell models apart, fast on a 49k vocab


class AdapterMismatchError(ValueError):
    """An adapter file does not belong to the model or exit layer it is being used with."""


# ----------------------------------------------------------------- model identity


def output_head_weight(stage: LlamaStage) -> torch.Tensor:
    """The output head matrix [vocab, d_model] of a stage holding the head (tied heads share the embedding)."""
    if not stage.has_output_head:
        raise ValueError(
            f"early exit needs a stage with the output head; stage [{stage.layer_start}, {stage.layer_end}) "
            "has has_output_head=False (build a head-only stage with LlamaStage.from_weights(config, weights, "
            "k, k, has_embedding=False, has_output_head=True))"
        )
    if stage.output is not None:
        return stage.output.weight
    assert stage.token_embd is not None  # tied head on a stage that also holds the embedding
    return stage.token_embd.weight


def model_fingerprint(stage: LlamaStage) -> str:
    """Short hash of a model's shape, final norm and (strided rows of) output head; same for every stage with the head."""
    cfg = stage.config
    head = output_head_weight(stage).detach()
    assert stage.output_norm is not None
    digest = hashlib.sha256()
    shape = [cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ffn, cfg.vocab_size]
    digest.update(json.dumps(shape).encode())
    digest.update(stage.output_norm.weight.detach().float().contiguous().numpy().tobytes())
    stride = max(1, head.shape[0] // _FINGERPRINT_ROWS)
    digest.update(head[::stride].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ExitTarget:
    """The model and exit layer an adapter is trained for."""

    model_name: str
    model_fingerprint: str
    n_layers: int
    d_model: int
    vocab_size: int
    exit_layer: int

    def __post_init__(self) -> None:
        if not 1 <= self.exit_layer <= self.n_layers:
            raise ValueError(f"ExitTarget.exit_layer must lie in [1, {self.n_layers}], got {self.exit_layer}")

    @classmethod
    def of(cls, stage: LlamaStage, exit_layer: int) -> ExitTarget:
        """Target for ``stage``'s model (any stage holding the output head) at ``exit_layer``."""
        cfg = stage.config
        return cls(cfg.name, model_fingerprint(stage), cfg.n_layers, cfg.d_model, cfg.vocab_size, exit_layer)

    def check(self, stage: LlamaStage | None = None, exit_layer: int | None = None, source: str = "adapter") -> None:
        """Raise ``AdapterMismatchError`` naming the field when ``stage``/``exit_layer`` differ from this target."""
        if exit_layer is not None and exit_layer != self.exit_layer:
            raise AdapterMismatchError(
                f"{source} was trained for exit_layer={self.exit_layer}, not exit_layer={exit_layer}"
            )
        if stage is None:
            return
        cfg = stage.config
        for field, have in (("d_model", cfg.d_model), ("n_layers", cfg.n_layers), ("vocab_size", cfg.vocab_size)):
            want = getattr(self, field)
            if want != have:
                raise AdapterMismatchError(
                    f"{source} was trained for model {self.model_name!r} with {field}={want}, "
                    f"but model {cfg.name!r} has {field}={have}"
                )
        fingerprint = model_fingerprint(stage)
        if fingerprint != self.model_fingerprint:
            raise AdapterMismatchError(
                f"{source} was trained for model {self.model_name!r} (model_fingerprint={self.model_fingerprint}), "
                f"but model {cfg.name!r} has model_fingerprint={fingerprint} (different weights)"
            )


# ----------------------------------------------------------------- the adapter


class ExitAdapter(nn.Module):
    """Identity-initialised residual map on the hidden state after the exit layer (see the module docstring).

    ``rank=None`` is a full ``d_model x d_model`` map; an integer is a low-rank ``B A`` with ``A`` [rank, d]
    (random) and ``B`` [d, rank] (zero). ``target`` records the model and layer, needed to ``save``.
    """

    def __init__(
        self,
        d_model: int,
        rank: int | None = None,
        *,
        target: ExitTarget | None = None,
        seed: int = 0,
        notes: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"ExitAdapter d_model must be a positive integer, got {d_model!r}")
        if rank is not None and (not isinstance(rank, int) or not 1 <= rank <= d_model):
            raise ValueError(f"ExitAdapter rank must be None (full) or an integer in [1, {d_model}], got {rank!r}")
        if target is not None and target.d_model != d_model:
            raise ValueError(f"ExitAdapter d_model={d_model} does not match target.d_model={target.d_model}")
        self.d_model = d_model
        self.rank = rank
        self.target = target
        self.notes: dict[str, Any] = dict(notes or {})
        self.bias = nn.Parameter(torch.zeros(d_model))
        # Log of a logit scale (a learned inverse temperature): lets cross-entropy training calibrate the
        # exit's confidence without bending the hidden state (the final RMSNorm fixes its norm); argmax-neutral.
        self.log_scale = nn.Parameter(torch.zeros(()))
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(d_model, d_model))
        else:
            gen = torch.Generator().manual_seed(seed)
            self.down = nn.Parameter(torch.randn(rank, d_model, generator=gen) * d_model**-0.5)
            self.up = nn.Parameter(torch.zeros(d_model, rank))

    @classmethod
    def for_model(
        cls, stage: LlamaStage, exit_layer: int, rank: int | None = None, seed: int = 0
    ) -> ExitAdapter:
        """A fresh (identity) adapter for ``stage``'s model at ``exit_layer``."""
        return cls(stage.config.d_model, rank, target=ExitTarget.of(stage, exit_layer), seed=seed)

    @property
    def exit_layer(self) -> int | None:
        return None if self.target is None else self.target.exit_layer

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Adapted hidden states [..., d_model] (float32) from the states after the exit layer."""
        if hidden.shape[-1] != self.d_model:
            raise ValueError(f"ExitAdapter expects hidden states [..., {self.d_model}], got {tuple(hidden.shape)}")
        h = hidden.to(torch.float32)
        scale = torch.sqrt(h.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)
        x = h / scale
        if self.rank is None:
            delta = F.linear(x, self.weight, self.bias)
        else:
            delta = F.linear(F.linear(x, self.down), self.up, self.bias)
        return h + scale * delta

    # ------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write the adapter (float16 tensors + metadata) to ``path``; needs ``target``."""
        if self.target is None:
            raise ValueError("ExitAdapter.save needs target (the model and exit layer); build it with for_model")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "rank": self.rank,
            "target": asdict(self.target),
            "notes": json.loads(json.dumps(self.notes)),  # plain JSON types only
            "state": {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()},
        }
        torch.save(payload, path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, model: LlamaStage | None = None, exit_layer: int | None = None
    ) -> ExitAdapter:
        """Read an adapter file; with ``model`` and/or ``exit_layer`` given, check it belongs to them."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exit adapter file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises assorted errors on foreign/corrupt files
            raise ValueError(f"cannot read exit adapter file {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not a pipesim exit adapter file (format != {ADAPTER_FORMAT!r})")
        if payload.get("version") != ADAPTER_VERSION:
            raise ValueError(
                f"{path}: exit adapter version={payload.get('version')!r} is not supported (expected {ADAPTER_VERSION})"
            )
        target = ExitTarget(**payload["target"])
        target.check(model, exit_layer, source=f"exit adapter {path.name}")
        adapter = cls(target.d_model, payload["rank"], target=target, notes=payload.get("notes"))
        adapter.load_state_dict({k: v.to(torch.float32) for k, v in payload["state"].items()})
        return adapter


# ----------------------------------------------------------------- exits of a real model


def early_exit_logits(
    stage: LlamaStage, hidden: torch.Tensor, adapter: ExitAdapter | None = None
) -> torch.Tensor:
    """Logits [..., vocab] from hidden states after the exit layer, via ``adapter`` (if any), the model's
    final RMSNorm and output head (``stage`` must hold the head: the full model, last stage or a head-only
    stage). Differentiable with respect to ``hidden`` and the adapter; the model stays frozen."""
    head = output_head_weight(stage)
    assert stage.output_norm is not None
    if hidden.shape[-1] != stage.config.d_model:
        raise ValueError(f"hidden states must be [..., {stage.config.d_model}], got {tuple(hidden.shape)}")
    if adapter is None:
        return stage.output_norm(hidden.to(torch.float32)) @ head.T
    return (stage.output_norm(adapter(hidden)) @ head.T) * adapter.log_scale.exp()


def _check_exit_layers(stage: LlamaStage, layers: Iterable[int]) -> list[int]:
    layers = sorted(set(int(k) for k in layers))
    for k in layers:
        if not stage.layer_start < k <= stage.layer_end:
            raise ValueError(
                f"exit layer {k} is not computed by stage [{stage.layer_start}, {stage.layer_end}) "
                f"(exit layers must lie in [{stage.layer_start + 1}, {stage.layer_end}])"
            )
    return layers


def forward_with_exits(
    stage: LlamaStage,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    token_seqs: torch.Tensor,
    kv: KVCache,
    layers: Iterable[int],
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One ``stage.forward`` that also returns the hidden states [n, d_model] after each exit layer in
    ``layers`` (counts of layers: exit ``k`` is the output of global layer index ``k - 1``)."""
    wanted = _check_exit_layers(stage, layers)
    by_index = {k - 1: k for k in wanted}
    captured: dict[int, torch.Tensor] = {}

    def after_layer(index: int, hidden: torch.Tensor) -> None:
        if index in by_index:
            captured[by_index[index]] = hidden

    out = stage(inputs, positions, token_seqs, kv, after_layer=after_layer)
    assert out is not None  # no should_cancel, so the run always completes
    # Captured states are inference tensors; cloning outside inference mode makes them usable for training.
    return out, {k: captured[k].clone() for k in wanted}


def capture_exit_states(
    model: LlamaStage, token_ids: Sequence[int] | torch.Tensor, layers: int | Iterable[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Full-model logits [n, vocab] and hidden states {k: [n, d_model]} after each exit layer ``k`` for every
    position of one token sequence (positions 0..n-1, one forward on a fresh cache)."""
    if not model.is_full_model:
        raise ValueError("capture_exit_states needs a stage holding the whole model (embedding, all layers, head)")
    ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
    ids = ids.to(torch.int64).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("capture_exit_states needs a non-empty token sequence")
    n = ids.numel()
    layers = [layers] if isinstance(layers, int) else list(layers)
    return forward_with_exits(
        model, ids, torch.arange(n), token_seq_mask([0] * n, 1), model.make_kv_cache(n), layers
    )


@torch.no_grad()
def exit_predictions(
    stage: LlamaStage, hidden: torch.Tensor, adapter: ExitAdapter | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """Top-1 exit tokens [n] for hidden states [n, d_model] (in batches, to bound the logits' memory)."""
    return torch.cat(
        [
            early_exit_logits(stage, hidden[start : start + batch_size], adapter).argmax(dim=-1)
            for start in range(0, hidden.shape[0], batch_size)
        ]
    ) if hidden.shape[0] else torch.zeros(0, dtype=torch.int64)


def exit_agreement(
    stage: LlamaStage,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    adapter: ExitAdapter | None = None,
    batch_size: int = 1024,
) -> float:
    """Fraction of positions whose top-1 exit token equals ``targets`` (the full model's greedy tokens)."""
    if hidden.shape[0] != targets.shape[0] or hidden.shape[0] == 0:
        raise ValueError(
            f"exit_agreement needs as many (>0) hidden states as targets, got {hidden.shape[0]} and {targets.shape[0]}"
        )
    return float((exit_predictions(stage, hidden, adapter, batch_size) == targets).float().mean())


# ----------------------------------------------------------------- adapters shipped with pipesim


def shipped_adapters_dir() -> Path:
    """Directory of the adapters that ship with pipesim (``pipesim/data/exit_adapters``)."""
    return Path(str(resources.files("pipesim") / "data" / "exit_adapters"))


def _acceptance_table(model: str) -> dict[str, Any]:
    path = shipped_adapters_dir() / "acceptance.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped acceptance table: {path}")
    table = json.loads(path.read_text())
    if model not in table:
        raise KeyError(f"no shipped exit adapters for model={model!r} (have: {', '.join(sorted(table))})")
    return table[model]


def shipped_acceptance(model: str = "smollm2") -> dict[int, float]:
    """Measured held-out agreement of the shipped adapters, exit layer -> α (for the simulator)."""
    return {int(k): float(v) for k, v in _acceptance_table(model)["alpha"].items()}


def shipped_adapter_path(exit_layer: int, model: str = "smollm2") -> Path:
    """Path of the shipped adapter for ``exit_layer``; the error lists the layers that ship."""
    layers = _acceptance_table(model)["layers"]
    if str(exit_layer) not in layers:
        raise KeyError(
            f"no shipped {model} exit adapter for exit_layer={exit_layer} (shipped: {', '.join(sorted(layers, key=int))})"
        )
    return shipped_adapters_dir() / layers[str(exit_layer)]["file"]
