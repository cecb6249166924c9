"""Test doubles for the seams: a deterministic bag-of-words encoder, a whitespace tokenizer/chunker, an echoing
generator and an in-memory truncate log."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from ragtide.contracts.events import SourcePosition
from ragtide.embedder.chunking import chunk_text
from ragtide.embedder.encoder import Vectors
from ragtide.generator.client import Delta, GenerationParams, GeneratorUnavailable, Message, Usage

_WORD = re.compile(r"\S+")


class HashEncoder:
    """Encoder double: hashed bag of words, L2-normalised, so texts sharing words are close. Counts calls."""

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim
        self.calls: list[list[str]] = []

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_tokens(self) -> int:
        return 254

    @property
    def tokenizer(self) -> Any:
        return WhitespaceTokenizer()

    @property
    def model_name(self) -> str:
        return "hash-bow"

    @property
    def provider(self) -> str:
        return "local"

    @property
    def precision(self) -> str:
        return "float"

    @property
    def encoded(self) -> int:
        """How many texts were embedded in total."""
        return sum(len(c) for c in self.calls)

    def encode(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
                out[i, h % self._dim] += 1.0
            norm = np.linalg.norm(out[i])
            out[i] = out[i] / norm if norm else out[i]
        return out


class WhitespaceTokenizer:
    """A tokenizer double: one token per whitespace-separated word, with character offsets."""

    def __call__(
        self, text: str, *, add_special_tokens: bool = False, return_offsets_mapping: bool = False
    ) -> dict[str, Any]:
        words = list(_WORD.finditer(text))
        return {
            "offset_mapping": [(m.start(), m.end()) for m in words],
            "input_ids": [int.from_bytes(hashlib.blake2b(m.group().encode(), digest_size=2).digest()) for m in words],
        }


def word_chunker(max_tokens: int = 8, overlap: int = 2) -> Any:
    """A chunker over whitespace tokens (small windows so tests exercise multi-chunk rows)."""

    def chunk(text: str) -> list[str]:
        text = text.strip()
        return chunk_text(text, [(m.start(), m.end()) for m in _WORD.finditer(text)], max_tokens, overlap)

    return chunk


class EchoGenerator:
    """Test double: cites the first source it was given (if any), one word per delta; records the prompts."""

    model = "echo"

    def __init__(self, fail: str | None = None, break_after: int | None = None) -> None:
        self.fail = fail
        self.break_after = break_after  # words streamed before the generator breaks mid-answer
        self.calls: list[list[Message]] = []

    async def stream(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[Delta]:
        """'According to [1]', or 'No sources.'."""
        if self.fail:
            raise GeneratorUnavailable(self.fail)
        self.calls.append(list(messages))
        prompt = messages[-1].content
        words = ["According", "to", "[1]."] if '<source id="1"' in prompt else ["No", "sources."]
        words = words[: params.max_tokens]
        for i, word in enumerate(words):
            if i == self.break_after:
                raise GeneratorUnavailable("connection reset by the generator")
            yield Delta(text=word + " ")
        yield Delta(finish_reason="stop", usage=Usage(prompt_tokens=len(prompt) // 4, completion_tokens=len(words)))

    async def aclose(self) -> None:
        """Nothing to release."""


class MemoryTruncateLog:
    """TruncateLog double: one dict, shared by the writers given it (workers of one group, or a restart)."""

    def __init__(self) -> None:
        self.at: dict[str, SourcePosition] = {}
        self.reads = 0

    def record(self, table: str, position: SourcePosition) -> None:
        if table not in self.at or self.at[table] < position:
            self.at[table] = position

    def positions(self) -> dict[str, SourcePosition]:
        self.reads += 1
        return dict(self.at)
