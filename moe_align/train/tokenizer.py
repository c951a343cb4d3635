"""Tokenizers for the trainers: a built-in character-level one and any transformers tokenizer.

Every trainer talks to the :class:`Tokenizer` protocol only: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size`` and the special ids ``bos_id``, ``eos_id`` and ``pad_id``.
"""

from __future__ import annotations

import string
from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class CharTokenizer:
    """One token per character of a fixed alphabet (printable ASCII and newline by default),
    plus ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2 and ``<unk>`` = 3 for any other character.

    The alphabet is fixed rather than learned from the data, so a checkpoint's token ids mean the
    same thing whatever data it was trained on.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, alphabet: str | None = None) -> None:
        alphabet = alphabet if alphabet is not None else string.printable[:95] + "\n"
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(self.SPECIALS))
        self._ids = {c: i + len(self.SPECIALS) for i, c in enumerate(alphabet)}
        self.vocab_size = len(self.SPECIALS) + len(alphabet)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.SPECIALS)
        return "".join(self.alphabet[i - n] for i in ids if n <= i < self.vocab_size)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A transformers tokenizer behind the :class:`Tokenizer` protocol (``transformers`` needed).

    ``encode`` adds no special tokens; a missing pad token falls back to the eos token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token")
        self.eos_id = eos
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> HFTokenizer:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"tokenizer {name_or_path!r} needs transformers: pip install 'moe_align[hf]'") from e
        return cls(AutoTokenizer.from_pretrained(name_or_path, **kwargs))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(name: str | None = "char") -> Tokenizer:
    """``"char"`` (or None) -> :class:`CharTokenizer`; anything else is a transformers name or path."""
    if name in (None, "char"):
        return CharTokenizer()
    return HFTokenizer.from_pretrained(name)
