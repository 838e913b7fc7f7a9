"""Llama-family decoder in torch, cut into pipeline stages (the executor's compute).

Pre-norm RMSNorm, rotary position embedding, grouped-query attention and a SwiGLU MLP. A ``LlamaStage``
holds a contiguous range of layers; the head stage also holds the token embedding, the last stage the final
norm and output head; one stage may hold everything (a full model, e.g. a draft).

Parameters are named as llama.cpp names its GGUF tensors (``token_embd.weight``, ``blk.N.attn_q.weight``,
``output_norm.weight``, ``output.weight``), with N the global layer index, so one weights dict (random tiny
weights or a GGUF file) builds any stage.

Rotary styles: ``"interleaved"`` rotates adjacent pairs (x[2i], x[2i+1]) as llama.cpp does on GGUF weights
(its converter permutes the HF q/k rows back to Meta's layout); ``"half"`` rotates (x[i], x[i+d/2]) as
HF transformers does on HF checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipesim.models.catalog import ModelSpec
from pipesim.models.kv_cache import KVCache

from ..placement import split_layers

__all__ = [
    "ROPE_STYLES",
    "LlamaConfig",
    "LlamaStage",
    "apply_rope",
    "greedy_generate",
    "split_layers",
    "stage_tensor_names",
]

ROPE_STYLES = ("interleaved", "half")
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ffn: int
    vocab_size: int
    tied_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope_style: str = "interleaved"
    name: str = "llama"

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LlamaConfig.d_model={self.d_model} is not a multiple of n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim={self.head_dim} must be even for rotary embedding")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"LlamaConfig.rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(
                f"LlamaConfig.rope_theta and rms_norm_eps must be > 0, got {self.rope_theta}, {self.rms_norm_eps}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        rope_style: str = "interleaved",
    ) -> LlamaConfig:
        """Config of a catalog shape; rope and norm constants are not part of the shape."""
        if not spec.gated_mlp:
            raise ValueError(f"model {spec.name!r} has no gated MLP; LlamaStage needs a SwiGLU (Llama) shape")
        return cls(
            n_layers=spec.n_layers,
            d_model=spec.d_model,
            n_heads=spec.n_heads,
            n_kv_heads=spec.n_kv_heads,
            d_ffn=spec.d_ffn,
            vocab_size=spec.vocab_size,
            tied_embeddings=spec.tied_embeddings,
            rope_theta=rope_theta,
            rms_norm_eps=rms_norm_eps,
            rope_style=rope_style,
            name=spec.name,
        )


def stage_tensor_names(
    config: LlamaConfig, layer_start: int, layer_end: int, has_embedding: bool, has_output_head: bool
) -> list[str]:
    """Global (GGUF-style) tensor names a stage needs; a tied head-only stage reads ``token_embd.weight``."""
    names: list[str] = []
    if has_embedding:
        names.append("token_embd.weight")
    for layer in range(layer_start, layer_end):
        names.extend(f"blk.{layer}.{t}.weight" for t in LAYER_TENSORS)
    if has_output_head:
        names.append("output_norm.weight")
        if not config.tied_embeddings:
            names.append("output.weight")
        elif not has_embedding:
            names.append("token_embd.weight")
    return names


class Linear(nn.Module):
    """Bias-free projection y = x W^T with W [out, in]; starts at zero (weights are always loaded)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    """Token embedding table [vocab, d_model]; starts at zero."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x [n, heads, head_dim] by angles whose cos/sin are [n, head_dim/2]."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    if style == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class LlamaBlock(nn.Module):
    """One decoder layer; attribute names follow llama.cpp's per-block tensor names."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, kv_dim = config.d_model, config.n_kv_heads * config.head_dim
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn_q = Linear(d, d)
        self.attn_k = Linear(d, kv_dim)
        self.attn_v = Linear(d, kv_dim)
        self.attn_output = Linear(d, d)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn_gate = Linear(d, config.d_ffn)
        self.ffn_up = Linear(d, config.d_ffn)
        self.ffn_down = Linear(config.d_ffn, d)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv: KVCache,
        layer: int,
        cells: torch.Tensor,
        n_cells: int,
    ) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        h = self.attn_norm(x)
        q = apply_rope(self.attn_q(h).view(n, cfg.n_heads, cfg.head_dim), cos, sin, cfg.rope_style)
        k = apply_rope(self.attn_k(h).view(n, cfg.n_kv_heads, cfg.head_dim), cos, sin, cfg.rope_style)
        v = self.attn_v(h).view(n, cfg.n_kv_heads, cfg.head_dim)
        kv.write(layer, cells, k, v)
        keys = kv.k[layer, :n_cells].transpose(0, 1)  # [kv_heads, cells, head_dim]
        values = kv.v[layer, :n_cells].transpose(0, 1)
        # Grouped-query attention without copying K/V: query head h uses kv head h // group, so the
        # queries of one group are stacked as extra rows [kv_heads, group * n, head_dim].
        group = cfg.n_heads // cfg.n_kv_heads
        queries = q.view(n, cfg.n_kv_heads, group, cfg.head_dim).permute(1, 2, 0, 3)
        queries = queries.reshape(cfg.n_kv_heads, group * n, cfg.head_dim)
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        attn = attn.view(cfg.n_kv_heads, group, n, cfg.head_dim).permute(2, 0, 1, 3).reshape(n, cfg.d_model)
        x = x + self.attn_output(attn)
        h = self.ffn_norm(x)
        return x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))


class LlamaStage(nn.Module):
    """Layers ``[layer_start, layer_end)`` of a Llama model, optionally with embedding and/or output head."""

    def __init__(
        self,
        config: LlamaConfig,
        layer_start: int,
        layer_end: int,
        has_embedding: bool,
        has_output_head: bool,
    ) -> None:
        super().__init__()
        if not 0 <= layer_start <= layer_end <= config.n_layers:
            raise ValueError(
                f"stage layers [{layer_start}, {layer_end}) must lie within [0, {config.n_layers}]"
            )
        if layer_start == layer_end and not (has_embedding or has_output_head):
            raise ValueError(f"stage [{layer_start}, {layer_end}) holds no layers, embedding or output head")
        self.config = config
        self.layer_start = layer_start
        self.layer_end = layer_end
        self.has_embedding = has_embedding
        self.has_output_head = has_output_head
        self.token_embd = Embedding(config.vocab_size, config.d_model) if has_embedding else None
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(layer_start, layer_end))
        self.output_norm = RMSNorm(config.d_model, config.rms_norm_eps) if has_output_head else None
        # A tied head on a stage that also holds the embedding reuses that matrix; otherwise it has its own.
        self._shares_embedding = has_output_head and has_embedding and config.tied_embeddings
        self.output = (
            Linear(config.d_model, config.vocab_size)
            if has_output_head and not self._shares_embedding
            else None
        )
        # An exit adapter (``early_exit.ExitAdapter``) on the output head makes a stage that ends before the last
        # layer a truncated early-exit draft: logits = output_norm(adapter(h)) @ head^T, scaled by the adapter's
        # logit scale (``set_exit_adapter``; None: the plain head).
        self.exit_adapter: nn.Module | None = None
        inv_freq = config.rope_theta ** (
            -torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.requires_grad_(False)

    # ----------------------------------------------------------------- construction

    @property
    def n_stage_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def is_full_model(self) -> bool:
        return self.has_embedding and self.has_output_head and self.n_stage_layers == self.config.n_layers

    def tensor_names(self) -> list[str]:
        """Global tensor names this stage loads."""
        return stage_tensor_names(
            self.config, self.layer_start, self.layer_end, self.has_embedding, self.has_output_head
        )

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy the stage's tensors from a dict keyed by global GGUF-style names (extra keys are ignored)."""
        missing = [name for name in self.tensor_names() if name not in weights]
        if missing:
            raise KeyError(f"weights lack {len(missing)} tensor(s) this stage needs, e.g. {missing[:3]}")
        for name in self.tensor_names():
            target = self._parameter_for(name)
            source = weights[name]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(source.shape)}, stage expects {tuple(target.shape)}"
                )
            target.copy_(source.to(target.dtype))

    def _parameter_for(self, name: str) -> torch.Tensor:
        if name == "token_embd.weight":
            if self.token_embd is not None:
                return self.token_embd.weight
            assert self.output is not None  # tied head on a stage without the embedding
            return self.output.weight
        if name == "output.weight":
            assert self.output is not None
            return self.output.weight
        if name == "output_norm.weight":
            assert self.output_norm is not None
            return self.output_norm.weight
        _, layer, tensor, _ = name.split(".")
        return getattr(self.layers[int(layer) - self.layer_start], tensor).weight

    @classmethod
    def from_weights(
        cls,
        config: LlamaConfig,
        weights: Mapping[str, torch.Tensor],
        layer_start: int = 0,
        layer_end: int | None = None,
        has_embedding: bool | None = None,
        has_output_head: bool | None = None,
    ) -> LlamaStage:
        """Build a stage and load it; by default the embedding goes with layer 0, the head with the last."""
        layer_end = config.n_layers if layer_end is None else layer_end
        has_embedding = layer_start == 0 if has_embedding is None else has_embedding
        has_output_head = layer_end == config.n_layers if has_output_head is None else has_output_head
        stage = cls(config, layer_start, layer_end, has_embedding, has_output_head)
        stage.load_weights(weights)
        return stage

    def set_exit_adapter(self, adapter: nn.Module | None) -> LlamaStage:
        """Put ``adapter`` (an ``ExitAdapter`` with ``log_scale``) between the last layer and the output head."""
        if adapter is not None and not self.has_output_head:
            raise ValueError(f"an exit adapter needs a stage with the output head; stage [{self.layer_start}, "
                             f"{self.layer_end}) has none")
        self.exit_adapter = adapter
        return self

    def make_kv_cache(self, capacity: int, max_seqs: int = 1) -> KVCache:
        """An empty cache sized for this stage's layers."""
        device = self.inv_freq.device
        cfg = self.config
        return KVCache(self.n_stage_layers, capacity, cfg.n_kv_heads, cfg.head_dim, max_seqs, device=device)

    # ----------------------------------------------------------------- compute

    def _rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        return angles.cos().to(torch.float32), angles.sin().to(torch.float32)

    @torch.inference_mode()
    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        token_seqs: torch.Tensor,
        kv: KVCache,
        should_cancel: Callable[[], bool] | None = None,
        after_layer: Callable[[int, torch.Tensor], None] | None = None,
        output_from: int = 0,
    ) -> torch.Tensor | None:
        """Run a batch of tokens (possibly from several runs) through the stage.

        ``inputs``: token ids [n] on a stage with the embedding, else hidden states [n, d_model]; inputs on another
        device (host buffers) are copied to the stage's, and the result stays on the stage's device.
        ``positions``: [n] positions; ``token_seqs``: bool [n, kv.max_seqs] sequences of each token.
        Returns hidden states [n, d_model], or logits [n, vocab] on a stage with the output head, or None
        when ``should_cancel()`` turns true (checked before the run and between layers); an aborted run
        frees the cells it took, leaving the cache as it was. ``after_layer(layer, hidden)``, if given, is
        called after each layer with its global index and the hidden states [n, d_model] it produced.
        On a stage with the output head, only tokens from ``output_from`` on get logits ([n - output_from, vocab]):
        a prefill needs the last token's alone.
        """
        if should_cancel is not None and should_cancel():
            return None
        cfg = self.config
        if (
            kv.n_layers != self.n_stage_layers
            or kv.n_kv_heads != cfg.n_kv_heads
            or kv.head_dim != cfg.head_dim
        ):
            raise ValueError(
                f"KV cache shape (layers={kv.n_layers}, kv_heads={kv.n_kv_heads}, head_dim={kv.head_dim}) "
                f"does not fit stage (layers={self.n_stage_layers}, kv_heads={cfg.n_kv_heads}, "
                f"head_dim={cfg.head_dim})"
            )
        device = self.inv_freq.device  # inputs may come from host buffers: they follow the stage's device
        x = self._embed(inputs.to(device))
        n = x.shape[0]
        positions = positions.reshape(-1).to(device, torch.int64)
        if positions.numel() != n:
            raise ValueError(f"positions has {positions.numel()} entries for {n} tokens")
        token_seqs = token_seqs.to(device, torch.bool)
        cells = kv.store(positions, token_seqs)
        n_cells = kv.span()
        mask = kv.attention_mask(positions, token_seqs, n_cells)
        mask = mask.repeat(cfg.n_heads // cfg.n_kv_heads, 1)  # rows for every query head of a kv group
        cos, sin = self._rope_angles(positions)
        for j, block in enumerate(self.layers):
            if j > 0 and should_cancel is not None and should_cancel():
                kv.release(cells)
                return None
            x = block(x, cos, sin, mask, kv, j, cells, n_cells)
            if after_layer is not None:
                after_layer(self.layer_start + j, x)
        if self.n_stage_layers and should_cancel is not None and should_cancel():
            kv.release(cells)
            return None
        if not self.has_output_head:
            return x
        assert self.output_norm is not None
        head = self.token_embd.weight if self._shares_embedding else self.output.weight  # type: ignore[union-attr]
        if self.exit_adapter is None:
            return self.output_norm(x[output_from:]) @ head.T
        adapter = self.exit_adapter
        return (self.output_norm(adapter(x[output_from:])) @ head.T) * adapter.log_scale.exp()

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.token_embd is not None:
            if inputs.dtype not in (torch.int64, torch.int32) or inputs.dim() != 1:
                raise ValueError(
                    f"a stage with the embedding takes token ids [n] (int64), got {inputs.dtype} "
                    f"{tuple(inputs.shape)}"
                )
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.config.vocab_size):
                raise ValueError(
                    f"token ids must lie in [0, {self.config.vocab_size}), got "
                    f"[{int(inputs.min())}, {int(inputs.max())}]"
                )
            return self.token_embd(inputs)
        if inputs.dim() != 2 or inputs.shape[1] != self.config.d_model:
            raise ValueError(
                f"a stage without the embedding takes hidden states [n, {self.config.d_model}], "
                f"got {tuple(inputs.shape)}"
            )
        return inputs.to(torch.float32)


def greedy_generate(
    model: LlamaStage,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    kv: KVCache | None = None,
    seq: int = 0,
) -> list[int]:
    """Target-only greedy decoding on a full-model stage (prefill in one batch, then one token a step).

    Returns the new token ids (stops after ``eos_id`` if given, which is included). With ``kv`` given,
    the prompt is appended to sequence ``seq`` starting at position ``seq_pos_max(seq) + 1``.
    """
    if not model.is_full_model:
        raise ValueError(
            "greedy_generate needs a stage holding the whole model (embedding, all layers, head)"
        )
    if not prompt_ids:
        raise ValueError("greedy_generate needs a non-empty prompt")
    if kv is None:
        kv = model.make_kv_cache(len(prompt_ids) + max_new_tokens, max_seqs=max(1, seq + 1))
    start = kv.seq_pos_max(seq) + 1
    seq_row = torch.zeros(kv.max_seqs, dtype=torch.bool)
    seq_row[seq] = True
    tokens = torch.tensor(list(prompt_ids), dtype=torch.int64)
    positions = torch.arange(start, start + len(prompt_ids), dtype=torch.int64)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens, positions, seq_row.expand(len(tokens), -1), kv)
        next_id = int(logits[-1].argmax())
        out.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
        positions = positions[-1:] + 1
        tokens = torch.tensor([next_id], dtype=torch.int64)
    return out
