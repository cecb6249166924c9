"""Token-aware chunking with the embedding model's own tokenizer: windows of tokens, never silent truncation."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ragtide.embedder.tokenize import OffsetsTokenizer, TextTokenizer, TokenizerChoice


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


class Piece(NamedTuple):
    """One chunk's text and, where they equal the text's own tokenization, its content ids (no special tokens):
    the embedding engine takes those and never tokenizes the chunk a second time. (A tuple: the write path makes
    one per chunk.)"""

    text: str
    ids: list[int] | None


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
    """Chunks text with a given tokenizer and limits.

    With a fast (Rust-backed) tokenizer, the texts that fit one window, most of a stream's rows, are recognised by
    their ids alone (flash-tokenizer, `TextTokenizer.content_ids`); only the others are tokenized with character
    offsets to be cut into windows. Verify's `__call__` and the writer's `pieces_many` are one implementation.
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int, choice: TokenizerChoice = "auto") -> None:
        """`choice`: `encoder.tokenizer` ("rust" keeps flash-tokenizer out of chunking too)."""
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = min(overlap, max_tokens - 1)
        self.choice = choice
        hf: Any = tokenizer
        self._backend = OffsetsTokenizer(hf.backend_tokenizer) if hasattr(hf, "backend_tokenizer") else None
        self._ids: TextTokenizer | None = None  # loaded at the first chunking (its flash probes take ~0.5 s)
        self._ids_lock = threading.Lock()

    def _fitting(self, texts: list[str]) -> list[list[int] | None]:
        """`TextTokenizer.content_ids` of the texts (all None with the Rust tokenizer alone)."""
        if self._ids is None:
            with self._ids_lock:
                if self._ids is None:
                    hf: Any = self.tokenizer
                    # "flash" is the engine's demand (refused at its load when unmet); chunking falls back quietly
                    choice: TokenizerChoice = "rust" if self.choice == "rust" else "auto"
                    self._ids = TextTokenizer(hf.backend_tokenizer.to_str(), self.max_tokens + 2, choice)
        return self._ids.content_ids(texts, self.max_tokens)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Token spans of `text`, through the fast backend when there is one."""
        if self._backend is not None:
            return self._backend.offsets(text)
        return token_offsets(self.tokenizer, text)

    def __call__(self, text: str) -> list[str]:
        if self._backend is not None:
            return [p.text for p in self.pieces_many([text])[0]]
        text = text.strip()
        if not text:
            return []
        return chunk_text(text, self.offsets(text), self.max_tokens, self.overlap)

    def pieces_many(self, texts: Sequence[str]) -> list[list[Piece]]:
        """Chunk many texts with batched tokenizer calls; each piece carries its ids where they are exact
        (the whole text in one window, or, with WordPiece, a window cut at word boundaries)."""
        stripped = [t.strip() for t in texts]
        if self._backend is None:
            return [[Piece(c, None) for c in self(t)] for t in stripped]
        # ASCII text of more than 4 characters a token is all but sure to need several windows: it is tokenized
        # once, in full, for its spans (which still give one piece with its ids if it fits after all), not first
        # for the one-window check too (flash-tokenizer tokenizes a whole text even when it cuts the ids).
        check = [i for i, t in enumerate(stripped) if len(t) <= 4 * self.max_tokens or not t.isascii()]
        fitting: list[list[int] | None] = [None] * len(stripped)
        for i, ids in zip(check, self._fitting([stripped[i] for i in check]), strict=True):
            fitting[i] = ids
        rest = [i for i, (t, ids) in enumerate(zip(stripped, fitting, strict=True)) if t and ids is None]
        encodings: dict[int, Any] = {}
        if rest and self._ids is not None:  # long ASCII text: flash-tokenizer's ids, spans found by its words
            spans = self._ids.spans([stripped[i] for i in rest])
            encodings = {i: enc for i, enc in zip(rest, spans, strict=True) if enc is not None}
            rest = [i for i in rest if i not in encodings]
        encodings.update(zip(rest, self._backend.encode_batch([stripped[i] for i in rest]), strict=True))
        out: list[list[Piece]] = []
        for i, text in enumerate(stripped):
            ids = fitting[i]
            if not text:
                out.append([])
            elif ids is not None:
                out.append([Piece(text, ids)])
            else:
                out.append(self._windows(text, encodings[i]))
        return out

    def _windows(self, text: str, enc: Any) -> list[Piece]:
        """One text's pieces from its encoding (ids, offsets, words)."""
        ids, offsets, words = enc.ids, enc.offsets, enc.word_ids
        spans = windows(len(ids), self.max_tokens, self.overlap)
        if len(spans) == 1:
            return [Piece(text, list(ids))]
        assert self._backend is not None
        pieces = []
        for start, end in spans:
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            exact = self._backend.word_exact and (start == 0 or words[start] != words[start - 1])
            exact = exact and (end == len(ids) or words[end] != words[end - 1])
            if piece:
                pieces.append(Piece(piece, list(ids[start:end]) if exact else None))
        return pieces
