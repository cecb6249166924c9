"""Token-window chunking: every token lands in a chunk, windows respect the limit and overlap."""

from __future__ import annotations

import re

import pytest

from ragtide.embedder.chunking import Chunker, chunk_text
from tests.doubles import WhitespaceTokenizer


def offsets(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def test_short_text_is_one_chunk() -> None:
    assert chunk_text("  a b c  ", offsets("a b c"), 10, 2) == ["a b c"]
    assert chunk_text("   ", [], 10, 2) == []


@pytest.mark.parametrize(("n_words", "max_tokens", "overlap"), [(25, 10, 3), (100, 16, 0), (11, 10, 9), (10, 10, 2)])
def test_windows_cover_every_token_within_the_limit(n_words: int, max_tokens: int, overlap: int) -> None:
    words = [f"w{i}" for i in range(n_words)]
    text = " ".join(words)
    chunks = chunk_text(text, offsets(text), max_tokens, overlap)
    seen: list[str] = []
    for c in chunks:
        toks = c.split()
        assert 1 <= len(toks) <= max_tokens
        seen += toks
    assert set(seen) == set(words)  # nothing is truncated
    if len(chunks) > 1:
        # consecutive windows share exactly `overlap` tokens
        assert chunks[0].split()[-overlap:] == chunks[1].split()[:overlap] if overlap else True


def test_invalid_limits() -> None:
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("a b", offsets("a b"), 2, 2)
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_text("a b", offsets("a b"), 0, 0)


def test_chunker_keeps_original_text_and_unicode() -> None:
    text = "Ünïcode  wörds 🚀 and\nnewlines " * 5
    chunks = Chunker(WhitespaceTokenizer(), max_tokens=6, overlap=1)(text)
    assert len(chunks) > 1
    assert all(c in text for c in chunks)
    assert "🚀" in "".join(chunks)


def test_windows_hand_over_ids_only_where_they_equal_the_windows_own_tokenization() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ragtide.embedder.chunking import Chunker

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "un": 4, "##able": 5}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                 pad_token="[PAD]")  # fmt: skip
    chunker = Chunker(hf, max_tokens=3, overlap=0, choice="rust")
    pieces = chunker.pieces_many(["unable unable unable"])[0]
    assert len(pieces) == 2
    for p in pieces:
        if p.ids is not None:
            assert p.ids == hf(p.text, add_special_tokens=False)["input_ids"], p


def test_the_batch_long_word_check_never_misses_a_word_the_exact_pattern_finds() -> None:
    """`may_hold_long_word` lets a batch skip the per-text pattern; it may say "maybe" wrongly (non-ASCII letters
    count in bytes), never "no" wrongly: random texts of word characters, punctuation, spaces and non-ASCII."""
    import random

    from ragtide.embedder.tokenize import _WORD_CHAR, may_hold_long_word

    exact = re.compile(f"{_WORD_CHAR}{{11,}}")
    rng = random.Random(5)
    alphabet = ["x", "7", "_", " ", "\t", "-", ".", "'", "é", "\u00a0", "\u4e2d", "\x1f", "\x00"]
    said_no = 0
    for _ in range(3000):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 4))]
        if not may_hold_long_word(texts, 10):
            said_no += 1
            assert not any(exact.search(t) for t in texts), texts
    assert said_no > 300  # it does clear batches, or it would save nothing
    assert not may_hold_long_word(["x" * 10, "y" * 10], 10)  # texts are separated: two runs of 10, not one of 20
    assert may_hold_long_word(["a " + "x" * 11], 10) and not may_hold_long_word([], 10)
