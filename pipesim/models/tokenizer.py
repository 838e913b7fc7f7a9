"""Tokenizer built from a GGUF file's metadata (GPT-2 byte-level BPE, as SmolLM2 uses).

The vocabulary, merges, special-token ids and chat template all live in the GGUF metadata
(``tokenizer.ggml.*``, ``tokenizer.chat_template``); this builds an equivalent ``tokenizers.Tokenizer``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipesim.models.gguf_loader import GGUFFormatError, field_value, open_gguf

__all__ = ["GGUFTokenizer", "load_tokenizer"]

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4
# GPT-2's byte-level pre-tokenizer splits words, numbers and punctuation; StarCoder-family vocabularies
# such as SmolLM's (llama.cpp pre-types "smollm", "starcoder", ...) also split every digit on its own.
_DIGIT_SPLIT_PRE_TYPES = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRE_TYPES = {"default", "gpt2", "mpt", "olmo"}
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


class GGUFTokenizer:
    """Byte-level BPE tokenizer with the GGUF file's special tokens and chat format."""

    def __init__(
        self,
        tokenizer: Any,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, source: str | Path | Any) -> GGUFTokenizer:
        """Build from a GGUF path or an open ``gguf.GGUFReader``."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        reader = open_gguf(source) if isinstance(source, str | Path) else source
        kind = field_value(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise GGUFFormatError(
                f"tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' byte-level BPE)"
            )
        tokens: list[str] = field_value(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
        token_types: list[int] = field_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
        pre_type = field_value(reader, "tokenizer.ggml.pre", "gpt2")
        if pre_type not in _GPT2_PRE_TYPES | _DIGIT_SPLIT_PRE_TYPES:
            raise GGUFFormatError(
                f"tokenizer.ggml.pre={pre_type!r} is not supported (supported: "
                f"{', '.join(sorted(_GPT2_PRE_TYPES | _DIGIT_SPLIT_PRE_TYPES))})"
            )

        vocab = {token: i for i, token in enumerate(tokens)}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre_type in _DIGIT_SPLIT_PRE_TYPES:
            splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
        tokenizer.decoder = decoders.ByteLevel()
        special = [
            AddedToken(tokens[i], special=t == _CONTROL, normalized=False)
            for i, t in enumerate(token_types)
            if t in (_CONTROL, _USER_DEFINED)
        ]
        tokenizer.add_special_tokens([t for t in special if t.special])
        tokenizer.add_tokens([t for t in special if not t.special])

        def optional_id(key: str) -> int | None:
            value = field_value(reader, key, None)
            return None if value is None else int(value)

        return cls(
            tokenizer,
            bos_id=optional_id("tokenizer.ggml.bos_token_id"),
            eos_id=optional_id("tokenizer.ggml.eos_token_id"),
            add_bos=bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
            chat_template=field_value(reader, "tokenizer.chat_template", None),
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (e.g. ``<|im_start|>``) are matched."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Vocabulary entry of one id (byte-level form)."""
        return self.tokenizer.id_to_token(token_id)

    def chat_prompt(self, user_text: str, system: str | None = None) -> str:
        """Prompt text for one user turn in the model's chat format, ending where the assistant answers.

        ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), as SmolLM2's template; when ``system`` is None the
        template's default system message, if it has one, is included, as the template does.
        """
        template = self.chat_template or ""
        if "<|im_start|>" not in template:
            raise GGUFFormatError(
                "chat_prompt supports ChatML templates (<|im_start|>); this GGUF's tokenizer.chat_template "
                f"is {template[:60]!r}"
            )
        if system is None:
            match = _CHATML_SYSTEM.search(template)
            system = match.group(1) if match else None
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        return f"{head}<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"

    def encode_chat(self, user_text: str, system: str | None = None) -> list[int]:
        """Token ids of ``chat_prompt(user_text, system)``."""
        return self.encode(self.chat_prompt(user_text, system))


def load_tokenizer(path: str | Path) -> GGUFTokenizer:
    """Tokenizer of the GGUF file at ``path``."""
    return GGUFTokenizer.from_gguf(path)
