"""Token-aware chunking with the embedding model's own tokenizer: windows of tokens, never silent truncation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class PieceChunker(Protocol):
    """A chunker that chunks many texts at once and hands over each chunk's token ids where they are exact."""

    def __call__(self, text: str) -> list[str]: ...

    def pieces_many(self, texts: Sequence[str]) -> list[list[Piece]]: ...


class Tokenizer(Protocol):
    """The part of a Hugging Face fast tokenizer we use: token offsets into the text."""

    def __call__(self, text: str, *, add_special_tokens: bool, return_offsets_mapping: bool) -> object: ...


def token_offsets(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of each token of `text` (no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets: Sequence[tuple[int, int]] = enc["offset_mapping"]  # type: ignore[index]
    return [(int(a), int(b)) for a, b in offsets]


@dataclass(frozen=True)
class Piece:
    """One chunk's text and, where they equal the text's own tokenization, its content ids (no special tokens):
    the embedding engine takes those and never tokenizes the chunk a second time."""

    text: str
    ids: list[int] | None


class _Backend:
    """The fast (Rust) tokenizer behind a Hugging Face tokenizer, copied with truncation and padding off.

    Chunking must see every token of a long text; the model's own wrapper would warn about (or cut at) its
    maximum length, which is exactly what chunking exists to avoid.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        # WordPiece tokenizes each word on its own, so a window cut at word boundaries has exactly the ids that
        # tokenizing its text would give; other models only hand over the ids of a single-window text.
        self.word_exact = type(self._tok.model).__name__ == "WordPiece"

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self._tok.encode(text, add_special_tokens=False).offsets]

    def encode_batch(self, texts: list[str]) -> list[Any]:
        """One batched call (parallel, outside the GIL)."""
        return list(self._tok.encode_batch(texts, add_special_tokens=False))


def windows(n_tokens: int, max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [start, end) of at most `max_tokens` that overlap by `overlap` and cover every token."""
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    if not 0 <= overlap < max_tokens:
        raise ValueError("overlap must be >= 0 and smaller than max_tokens")
    if n_tokens <= max_tokens:
        return [(0, n_tokens)]
    out = []
    start = 0
    while True:
        end = min(start + max_tokens, n_tokens)
        out.append((start, end))
        if end == n_tokens:
            return out
        start += max_tokens - overlap


def chunk_text(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int, overlap: int) -> list[str]:
    """Split `text` into windows of at most `max_tokens` tokens that overlap by `overlap` tokens.

    Every token of the text lands in at least one chunk, so nothing is cut off at the model's max length.
    Windows are cut on token boundaries and sliced from the original text (whitespace and case preserved).
    """
    spans = windows(len(offsets), max_tokens, overlap)
    text = text.strip()
    if not text:
        return []
    if len(spans) == 1:
        return [text]
    chunks = [text[offsets[start][0] : offsets[end - 1][1]].strip() for start, end in spans]
    return [c for c in chunks if c]


class Chunker:
    """Chunks text with a given tokenizer and limits."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = min(overlap, max_tokens - 1)
        self._backend = _Backend(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else None

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

    def pieces_many(self, texts: Sequence[str]) -> list[list[Piece]]:
        """Chunk many texts with one batched tokenizer call; each piece carries its ids where they are exact
        (the whole text in one window, or, with WordPiece, a window cut at word boundaries)."""
        stripped = [t.strip() for t in texts]
        if self._backend is None:
            return [[Piece(c, None) for c in self(t)] for t in stripped]
        encodings = self._backend.encode_batch(stripped)
        out: list[list[Piece]] = []
        for text, enc in zip(stripped, encodings, strict=True):
            ids, offsets, words = enc.ids, enc.offsets, enc.word_ids
            spans = windows(len(ids), self.max_tokens, self.overlap) if text else []
            if len(spans) == 1:
                out.append([Piece(text, list(ids))])
                continue
            pieces = []
            for start, end in spans:
                piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
                exact = self._backend.word_exact and (start == 0 or words[start] != words[start - 1])
                exact = exact and (end == len(ids) or words[end] != words[end - 1])
                if piece:
                    pieces.append(Piece(piece, list(ids[start:end]) if exact else None))
            out.append(pieces)
        return out
