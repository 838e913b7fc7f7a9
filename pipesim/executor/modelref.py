"""Which real model a scenario names (``executor.model`` / ``executor.draft_model``), resolved without torch.

Forms: a tiny catalog shape with deterministic random weights (``tiny-llama``, seeded by ``executor.seed``, or
``tiny-llama@SEED``), a fetched model (``smollm2``: ``pipesim models fetch smollm2``), or a path to a
Llama-family ``.gguf`` file; any of these with ``-exitK`` (e.g. ``smollm2-exit10``) is a truncated early-exit
draft: the model's first ``K`` layers, its shipped exit adapter (SmolLM2; tiny models use the plain exit) and its
own head (``pipesim.models.exit_drafts``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..models.catalog import CATALOG
from ..models.exit_drafts import parse_exit_draft, shipped_exit_adapters
from ..models.fetch import FETCHABLE, find_model
from ..models.gguf_meta import read_gguf_metadata
from .errors import ExecutorSetupError

_FETCH_ALIASES = {"smollm2": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: tiny random weights (``spec_name``, ``seed``) or a GGUF file (``path``)."""

    text: str
    kind: str  # "tiny" | "gguf"
    n_layers: int
    vocab_size: int
    spec_name: str | None = None
    seed: int = 0
    path: Path | None = None
    has_tokenizer: bool = False
    has_chat_template: bool = False
    kv_dim: int = 0  # key (= value) width per layer and token: n_kv_heads x head_dim (0: unknown)
    exit_layers: int | None = None  # a truncated early-exit draft: the first exit_layers layers (= n_layers)
    adapter: Path | None = None  # its exit adapter (None: the plain exit through the model's final norm and head)

    @property
    def key(self) -> tuple:
        """Identity of the model (for caching loaded stages)."""
        return (self.kind, self.spec_name, self.seed, str(self.path), self.exit_layers, str(self.adapter))

    @property
    def weights_key(self) -> tuple:
        """Identity of the weights (a truncated draft shares its base model's)."""
        return (self.kind, self.spec_name, self.seed, str(self.path))


def resolve_model(text: str, field: str, seed: int = 0) -> ModelRef:
    """Resolve a model string (``-exitK``: a truncated early-exit draft); errors name the field and the value."""
    exit_draft = parse_exit_draft(text)
    if exit_draft is None:
        return _resolve_whole(text, field, seed)
    base = _resolve_whole(exit_draft.base, field, seed)
    layers = exit_draft.layers
    if not 1 <= layers < base.n_layers:
        raise ExecutorSetupError(f"{field}={text!r}: an early-exit draft keeps 1..{base.n_layers - 1} of the "
                                 f"{base.n_layers} layers of {exit_draft.base!r}, not {layers}")
    adapter = None
    if base.kind == "gguf":
        shipped = shipped_exit_adapters("smollm2") if "smollm2" in exit_draft.base.lower() else {}
        if layers not in shipped:
            have = ", ".join(str(k) for k in sorted(shipped)) or "none"
            raise ExecutorSetupError(f"{field}={text!r}: no exit adapter ships for the state after {layers} "
                                     f"layers of {exit_draft.base!r} (shipped: {have}; train one with "
                                     "`pipesim models train-exit`)")
        adapter = shipped[layers]
    return replace(base, text=text, n_layers=layers, exit_layers=layers, adapter=adapter)


def _resolve_whole(text: str, field: str, seed: int) -> ModelRef:
    name, _, seed_text = text.partition("@")
    spec = CATALOG.get(name.lower())
    if spec is not None and spec.name.startswith("tiny"):
        if seed_text:
            try:
                seed = int(seed_text)
            except ValueError:
                raise ExecutorSetupError(f"{field}={text!r}: the seed after '@' must be an integer") from None
        return ModelRef(text, "tiny", spec.n_layers, spec.vocab_size, spec_name=spec.name, seed=seed,
                        kv_dim=spec.kv_dim)
    if text.lower() in _FETCH_ALIASES:
        path = find_model(_FETCH_ALIASES[text.lower()])
        if path is None:
            fetchable = _FETCH_ALIASES[text.lower()]
            raise ExecutorSetupError(f"{field}={text!r}: model file not fetched ({FETCHABLE[fetchable].filename}); "
                                     f"run `pipesim models fetch {fetchable}`")
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            tiny = ", ".join(n for n in CATALOG if n.startswith("tiny"))
            raise ExecutorSetupError(f"{field}={text!r}: model file not found (expected a .gguf path, "
                                     f"{tiny}[@SEED] or smollm2)")
    try:
        meta = read_gguf_metadata(path)
    except (OSError, ValueError) as error:
        raise ExecutorSetupError(f"{field}={text!r}: {error}") from None
    arch = meta.get("general.architecture")
    if arch != "llama" or "llama.block_count" not in meta:
        raise ExecutorSetupError(f"{field}={text!r}: not a Llama-family GGUF (general.architecture={arch!r})")
    vocab = int(meta.get("llama.vocab_size", meta.get("tokenizer.ggml.tokens", 0)))
    heads = int(meta.get("llama.attention.head_count", 0) or 0)
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads) or heads)
    width = int(meta.get("llama.embedding_length", 0) or 0)
    return ModelRef(text, "gguf", int(meta["llama.block_count"]), vocab, path=path,
                    has_tokenizer=meta.get("tokenizer.ggml.model") == "gpt2",
                    has_chat_template="tokenizer.chat_template" in meta,
                    kv_dim=width // heads * kv_heads if heads else 0)
