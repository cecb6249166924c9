"""Token-aware chunking with the embedding model's own tokenizer: windows of tokens, never silent truncation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """The part of a Hugging Face fast tokenizer we use: token offsets into the text."""

    def __call__(self, text: str, *, add_special_tokens: bool, return_offsets_mapping: bool) -> object: ...


def token_offsets(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of each token of `text` (no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets: Sequence[tuple[int, int]] = enc["offset_mapping"]  # type: ignore[index]
    return [(int(a), int(b)) for a, b in offsets]


class _BackendOffsets:
    """The fast (Rust) tokenizer behind a Hugging Face tokenizer, copied with truncation and padding off.

    Chunking must see every token of a long text; the model's own wrapper would warn about (or cut at) its
    maximum length, which is exactly what chunking exists to avoid.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self._tok.encode(text, add_special_tokens=False).offsets]


def chunk_text(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int, overlap: int) -> list[str]:
    """Split `text` into windows of at most `max_tokens` tokens that overlap by `overlap` tokens.

    Every token of the text lands in at least one chunk, so nothing is cut off at the model's max length.
    Windows are cut on token boundaries and sliced from the original text (whitespace and case preserved).
    """
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    if not 0 <= overlap < max_tokens:
        raise ValueError("overlap must be >= 0 and smaller than max_tokens")
    text = text.strip()
    if not text:
        return []
    if len(offsets) <= max_tokens:
        return [text]
    step = max_tokens - overlap
    chunks: list[str] = []
    start = 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        chunks.append(text[offsets[start][0] : offsets[end - 1][1]].strip())
        if end == len(offsets):
            break
        start += step
    return [c for c in chunks if c]


class Chunker:
    """Chunks text with a given tokenizer and limits."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = min(overlap, max_tokens - 1)
        self._backend = _BackendOffsets(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else None

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Token spans of `text`, through the fast backend when there is one."""
        if self._backend is not None:
            return self._backend.offsets(text)
        return token_offsets(self.tokenizer, text)

    def __call__(self, text: str) -> list[str]:
        text = text.strip()
        if not text:
            return []
        return chunk_text(text, self.offsets(text), self.max_tokens, self.overlap)
