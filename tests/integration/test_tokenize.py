"""The chunker's fast paths give exactly what the model's own Rust tokenizer gives (the real packaged tokenizer):
- `OffsetsTokenizer` skips BERT's normaliser on plain ASCII: the same ids, offsets and words on every text, controls,
  special-token strings and non-ASCII text included;
- `Chunker.pieces_many` recognises one-window texts by flash-tokenizer's ids: the same pieces and ids as cutting
  every text with the Rust tokenizer's offsets, at the window's edge too; verify's `Chunker.__call__` agrees.
"""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ragtide.bench.write import corpus
from ragtide.embedder.chunking import Chunker, Piece, windows
from ragtide.embedder.encoder import default_model_path
from ragtide.embedder.tokenize import OffsetsTokenizer, TextTokenizer, probe_texts

AWKWARD = [
    "[SEP] x [sep] y [MASK] [cls] [Unk]",
    "a " + "y" * 150 + " word: WordPiece makes one unknown token of a word over 100 characters",
    "A\x00B\x07c and \x1b[31m colour",
    "Tab\tnew\nline\r\nEnd  ",
    "café Ünïcode naïve — “quoted” 🚀",
    "x" * 500,
    "",
    "   ",
    "UPPER lower MiXeD 3.14 $100 e.g. U.S.A. don't",
]


@pytest.fixture(scope="module")
def hf() -> Any:
    return AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)


@pytest.fixture(scope="module")
def rust(hf: Any) -> Any:
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def texts(n: int = 400) -> list[str]:
    rows = corpus(n)  # the write benchmark's: every seventh row several windows long
    probes = probe_texts(1500, seed=3)
    # several windows long: runs of probe texts, with the awkward ones in the middle
    long = [" ".join(probes[i : i + 40]) for i in range(0, 400, 40)] + [
        f"{probes[0]} {a} {probes[1]} " * 30 for a in AWKWARD
    ]
    return [*probes, *AWKWARD, *long, *(f"{r['title']}\n\n{r['body']}" for r in rows)]


def test_the_offsets_tokenizer_equals_the_models_tokenizer(hf: Any, rust: Any) -> None:
    fast = OffsetsTokenizer(hf.backend_tokenizer)
    assert fast._plain is not None  # BERT's normaliser: the fast path is on
    sample = texts()
    want = rust.encode_batch(sample, add_special_tokens=False)
    got = fast.encode_batch(sample)
    bad = [
        t
        for t, a, b in zip(sample, want, got, strict=True)
        if (a.ids, a.offsets, a.word_ids) != (b.ids, b.offsets, b.word_ids)
    ]
    assert bad == []
    assert fast.offsets(AWKWARD[0]) == [tuple(o) for o in rust.encode(AWKWARD[0], add_special_tokens=False).offsets]


def reference_pieces(rust: Any, text: str, max_tokens: int, overlap: int) -> list[Piece]:
    """Every text cut with the Rust tokenizer's offsets (what the chunker did before its fast path)."""
    text = text.strip()
    if not text:
        return []
    enc = rust.encode(text, add_special_tokens=False)
    ids, offsets, words = enc.ids, enc.offsets, enc.word_ids
    spans = windows(len(ids), max_tokens, overlap)
    if len(spans) == 1:
        return [Piece(text, list(ids))]
    out = []
    for start, end in spans:
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        exact = (start == 0 or words[start] != words[start - 1]) and (end == len(ids) or words[end] != words[end - 1])
        if piece:
            out.append(Piece(piece, list(ids[start:end]) if exact else None))
    return out


@pytest.mark.parametrize(("max_tokens", "overlap"), [(254, 32), (40, 8)])
def test_pieces_are_those_of_cutting_every_text_by_offsets(hf: Any, rust: Any, max_tokens: int, overlap: int) -> None:
    chunker = Chunker(hf, max_tokens, overlap)
    sample = texts(300)
    # at the window's edge: exactly max_tokens tokens fit one window, one more does not
    edge = " ".join(["harbor"] * (max_tokens - 1))
    # more than 4 characters a token yet one window: tokenized in full for spans, still one piece with its ids
    wordy = " ".join(["internationalization"] * (max_tokens // 4))
    assert len(wordy) > 4 * max_tokens
    sample += [wordy, edge, edge + " harbor", edge + " harbor harbor"]
    got = chunker.pieces_many(sample)
    assert chunker._ids is not None and chunker._ids.flash is not None  # the fast path was on
    want = [reference_pieces(rust, t, max_tokens, overlap) for t in sample]
    bad = [t[:60] for t, a, b in zip(sample, want, got, strict=True) if a != b]
    assert bad == []
    assert [len(p) for p in got[-3:]] == [1, 1, 2]
    assert len(got[-4]) == 1 and got[-4][0].ids is not None
    assert all(chunker(t) == [p.text for p in pieces] for t, pieces in zip(sample[:200], got, strict=False))
    rust_only = Chunker(hf, max_tokens, overlap, "rust")  # encoder.tokenizer: rust keeps flash out of chunking
    assert rust_only.pieces_many(sample) == want and rust_only._ids is not None and rust_only._ids.flash is None


def test_spans_from_flash_ids_are_the_rust_tokenizers_offsets_or_none(hf: Any, rust: Any) -> None:
    """Long ASCII text: flash-tokenizer's ids with spans found by walking the words are exactly the Rust
    tokenizer's ids, offsets and words; text where they could differ (control characters, a word WordPiece makes
    [UNK] of, other scripts, special-token strings) gets None and is cut by the Rust tokenizer's offsets."""
    tok = TextTokenizer(hf.backend_tokenizer.to_str(), 256)
    sample = [t.strip() for t in texts(300) if t.strip()]
    got = tok.spans(sample)
    served = 0
    for text, spans in zip(sample, got, strict=True):
        if spans is None:
            continue
        served += 1
        want = rust.encode(text, add_special_tokens=False)
        assert spans.ids == want.ids, text[:60]
        assert [tuple(o) for o in spans.offsets.tolist()] == [tuple(o) for o in want.offsets], text[:60]
        assert spans.word_ids.tolist() == want.word_ids, text[:60]
    assert served > 1000
    # the batch is one vectorised pass: each text's result is the one it gets alone
    assert tok._spans is not None
    assert tok._spans.many(["\x00", "\x07\x07"], [[100], [100, 100]]) == [None, None]  # ids and no word at all
    seqs = [tok.spans([t])[0] for t in sample[:400]]
    for alone, together in zip(seqs, got[:400], strict=True):
        assert (alone is None) == (together is None)
        if alone is not None and together is not None:
            assert alone.ids == together.ids and alone.offsets.tolist() == together.offsets.tolist()
            assert alone.word_ids.tolist() == together.word_ids.tolist()
    assert None not in tok.spans([f"{r['title']}\n\n{r['body']}" for r in corpus(50)])  # plain text: all served
    refused = ["A\x00B\x07c and colour " * 40, "a " + "y" * 150 + " b", "café " * 300, "[SEP] x " * 200]
    assert tok.spans(refused) == [None] * 4
    assert tok.content_ids(["a " + "y" * 150 + " b"], 200) == [None]  # flash-tokenizer splits such a word
    # the long-word check runs once per batch: a batch with one such word refuses that text alone
    mixed = ["plain words " * 30, "a " + "y" * 101 + " b", "z" * 100, "café " + "é" * 90]
    assert [s is None for s in tok.spans(mixed)] == [False, True, False, True]  # the last: not ASCII
    assert [i is None for i in tok.content_ids(mixed, 200)] == [False, True, False, False]


def test_content_ids_refuse_a_window_too_small_and_tell_apart_fitting_texts(hf: Any) -> None:
    tok = TextTokenizer(hf.backend_tokenizer.to_str(), 42)
    assert tok.flash is not None
    with pytest.raises(ValueError, match="does not fit"):
        tok.content_ids(["a"], 41)
    sample = ["one two three", " ".join(["word"] * 40), " ".join(["word"] * 41), "café au lait", "[SEP] x", "\u4e2d"]
    ids = tok.content_ids(sample, 40)
    assert ids[0] is not None and len(ids[0]) == 3 and ids[1] is not None and len(ids[1]) == 40
    assert ids[2] is None  # one token too many: cut by offsets instead
    assert ids[3] is not None  # FLASH_EXTRA letters are flash-tokenizer's too
    assert ids[4] is None and ids[5] is None  # a special-token string, another script: the Rust tokenizer's
