"""Which real model a scenario names (``executor.model`` / ``executor.draft_model``), resolved without torch.

Forms: a tiny catalog shape with deterministic random weights (``tiny-llama``, seeded by ``executor.seed``, or
``tiny-llama@SEED``), a fetched model (``smollm2``: ``pipesim models fetch smollm2``), or a path to a
Llama-family ``.gguf`` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.catalog import CATALOG
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

    @property
    def key(self) -> tuple:
        """Identity of the weights (for caching loaded models)."""
        return (self.kind, self.spec_name, self.seed, str(self.path))


def resolve_model(text: str, field: str, seed: int = 0) -> ModelRef:
    """Resolve a model string; errors name the field and the value."""
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
