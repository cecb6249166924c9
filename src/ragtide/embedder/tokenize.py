"""Tokenizers: text to token ids, fast and identical to the model's own tokenizer.

- `TextTokenizer`: ids per text with the special tokens, for the embedding engine and for the chunker. Text of
  ASCII and FLASH_EXTRA characters goes to flash-tokenizer's C++ WordPiece where it is installed and agrees with
  the model's tokenizer on probe sets at load (~10x the Rust tokenizer per core); everything else (other scripts,
  special-token strings) to the model's Rust fast tokenizer. The ids are identical either way.
- `OffsetsTokenizer`: ids with each token's character span and word, for cutting a long text into windows
  (chunking.py). The model's Rust tokenizer; ASCII text without control characters skips its normaliser (which
  costs half its time) when that normaliser only lowercases such text: same ids, same spans.
- `TextTokenizer.spans`: the same for long ASCII text from flash-tokenizer's ids, each token's span found by
  walking the text's words (a fifth of the Rust tokenizer's CPU); a text whose words and tokens do not line up
  exactly goes to `OffsetsTokenizer`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

TokenizerChoice = Literal["auto", "rust", "flash"]

# What the BERT normaliser's `clean_text` removes from ASCII text (control characters other than tab, newline and
# carriage return): text with one of them goes through the normaliser, whose removal shifts every offset after it.
_ASCII_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def added_tokens_pattern(tok: Any, flags: int = 0) -> re.Pattern[str] | None:
    """A pattern matching any of a Rust tokenizer's added tokens ("[SEP]") in raw text, longest first (None when it
    has none)."""
    added = sorted({str(t.content) for t in tok.get_added_tokens_decoder().values()}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in added), flags) if added else None


def _untruncated(spec: str) -> Any:
    """A Rust tokenizer from its JSON, with truncation and padding off."""
    from tokenizers import Tokenizer as RustTokenizer

    tok = RustTokenizer.from_str(spec)
    tok.no_truncation()
    tok.no_padding()
    return tok


class OffsetsTokenizer:
    """The fast (Rust) tokenizer behind a Hugging Face tokenizer, copied with truncation and padding off: ids,
    character offsets and words of every token, for cutting windows.

    Chunking must see every token of a long text; the model's own wrapper would warn about (or cut at) its maximum
    length, which is exactly what chunking exists to avoid. When the model's normaliser is BERT's, which on ASCII
    text without control characters only lowercases and turns tabs and line ends into spaces (one character for
    one: offsets unchanged; the pre-tokenizer splits on either), such text is lowercased here and tokenized by a
    copy without the normaliser: the same ids and offsets at half the cost.
    """

    def __init__(self, backend: Any) -> None:
        spec = backend.to_str()
        self._tok = _untruncated(spec)
        # WordPiece tokenizes each word on its own, so a window cut at word boundaries has exactly the ids that
        # tokenizing its text would give; other models only hand over the ids of a single-window text.
        self.word_exact = type(self._tok.model).__name__ == "WordPiece"
        self._plain: Any = None
        self._lower = False
        norm = json.loads(spec).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":  # its accent and Chinese-character options touch no ASCII
            self._plain = _untruncated(spec)
            self._plain.normalizer = None
            self._lower = bool(norm.get("lowercase", True))
        # Added tokens ("[SEP]") are matched on the raw text, before the normaliser: text holding one, in any
        # case, goes through the normaliser as the model's tokenizer would take it.
        self._added = added_tokens_pattern(self._tok, re.IGNORECASE)

    def _plain_ok(self, text: str) -> bool:
        return (
            self._plain is not None
            and text.isascii()
            and _ASCII_CONTROL.search(text) is None
            and (self._added is None or self._added.search(text) is None)
        )

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Token spans of one text."""
        return [(int(a), int(b)) for a, b in self.encode_batch([text])[0].offsets]

    def encode_batch(self, texts: list[str]) -> list[Any]:
        """Encodings (ids, offsets, word_ids) in at most two batched calls (parallel, outside the GIL)."""
        plain = [i for i, t in enumerate(texts) if self._plain_ok(t)]
        if not plain:
            return list(self._tok.encode_batch(texts, add_special_tokens=False))
        out: list[Any] = [None] * len(texts)
        fed = [texts[i].lower() if self._lower else texts[i] for i in plain]
        for i, enc in zip(plain, self._plain.encode_batch(fed, add_special_tokens=False), strict=True):
            out[i] = enc
        rest = [i for i, enc in enumerate(out) if enc is None]
        if rest:
            encs = self._tok.encode_batch([texts[i] for i in rest], add_special_tokens=False)
            for i, enc in zip(rest, encs, strict=True):
                out[i] = enc
        return out


def probe_texts(n: int = 2000, seed: int = 13) -> list[str]:
    """ASCII strings that exercise a WordPiece tokenizer's corners: every ASCII character (controls included),
    punctuation runs, digits, contractions, mixed case, URLs, and texts past the model's window."""
    rng = random.Random(seed)
    words = [
        "The",
        "quick",
        "BROWN",
        "fox's",
        "don't",
        "co-operate",
        "e.g.",
        "U.S.A.",
        "3.14",
        "$100",
        "#tag",
        "@user",
        "x86_64",
        "AT&T",
        "C++",
        "http://example.com/a?b=1&c=2",
        "tokenization",
        "unaffable",
        "...",
    ]
    chars = [chr(i) for i in range(128)]
    out = ["", " ", "a", "A\tb\nc\r\nd", "   padded   ", "!!!???", "word " * 400]
    for i in range(n):
        size = rng.randint(0, 300)
        if i % 2:
            out.append("".join(rng.choice(chars) for _ in range(size)))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(size // 5)))
    return out


def _unpad(ids: list[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] == 0:
        end -= 1
    return ids if end == len(ids) else ids[:end]


# Non-ASCII characters flash-tokenizer 1.2 tokenizes exactly as the model's tokenizer in every context tried
# (alone, inside, before and after words, doubled, beside digits and punctuation, in random ASCII): Latin-1 and
# Latin Extended letters, typographic quotes and dashes, currency and letterlike symbols. Left out, where the
# two differ: the marks below, the line/paragraph separators, invisible operators; and every other block
# (full-width forms, combining marks, a BOM, several scripts). Checked again at load and by a test.
FLASH_UNSAFE = "\u00a1\u00a7\u00ab\u00ad\u00b6\u00bb\u00bf\u2028\u2029\u2044\u2052"
FLASH_EXTRA = "".join(
    chr(c)
    for lo, hi in ((0x00A0, 0x024F), (0x2000, 0x205F), (0x20A0, 0x20BF), (0x2100, 0x21FF))
    for c in range(lo, hi + 1)
    if chr(c) not in FLASH_UNSAFE
)


def flash_contexts(ch: str) -> str:
    """One probe text that puts `ch` in the contexts where tokenizers disagree."""
    return f"{ch} a{ch}b {ch}word word{ch} It{ch}s {ch}{ch} x {ch}. ({ch}) {ch}1 2{ch}"


class Spans(NamedTuple):
    """A text's tokens without the special ones: ids, (start, end) character spans, and the word of each."""

    ids: list[int]
    offsets: npt.NDArray[np.int64]
    word_ids: npt.NDArray[np.int64]


# ASCII characters for BERT's pre-tokenizer: 0 whitespace, 1 letter or digit (runs of them make a word), 2
# punctuation (a word of its own), 3 a control character (the normaliser drops it: spans would shift).
_ASCII_CLASS = np.zeros(128, dtype=np.int8)
for _c in range(128):
    _ch = chr(_c)
    _ASCII_CLASS[_c] = 0 if _ch in " \t\n\r" else 3 if _c < 32 or _c == 127 else 1 if _ch.isalnum() else 2


# A character WordPiece counts into a word's length (not whitespace, not ASCII punctuation): a run of more than the
# model's `max_input_chars_per_word` of them is a word it makes [UNK] of, and flash-tokenizer does not.
_WORD_CHAR = r"[^\s!-/:-@\[-`{-~]"
# Per UTF-8 byte, whether it can be part of such a run: the ASCII word characters and every byte of a non-ASCII
# character (more bytes than characters: a run is never shorter in bytes).
_WORD_BYTE = np.array([c > 127 or re.fullmatch(_WORD_CHAR, chr(c)) is not None for c in range(256)], dtype=bool)


def may_hold_long_word(texts: Sequence[str], max_word: int) -> bool:
    """False when no text has a run of more than `max_word` word characters; True when one may (then each text
    is checked with the exact pattern). One vectorised pass over the batch instead of a regex scan per text."""
    if not texts:
        return False
    data = _WORD_BYTE[np.frombuffer(" ".join(texts).encode("utf-8", "surrogatepass"), dtype=np.uint8)]
    breaks = np.flatnonzero(~data)
    runs = np.diff(breaks, prepend=-1, append=data.size) - 1
    return bool(runs.max() > max_word)


class WordPieceSpans:
    """Character spans of WordPiece ids of lowercased ASCII text: each word's tokens spell it out in order (a
    continuation token "##ab" adds two characters, [UNK] stands for a whole word). Checked per text: every word
    must be spelled out exactly by its tokens, else None (the caller tokenizes with offsets instead)."""

    def __init__(self, vocab: dict[str, int], unk: str, max_word: int) -> None:
        size = max(vocab.values()) + 1
        self.length = np.zeros(size, dtype=np.int64)
        self.continues = np.zeros(size, dtype=bool)
        for token, i in vocab.items():
            self.continues[i] = token.startswith("##")
            self.length[i] = len(token) - 2 if self.continues[i] else len(token)
        self.unk = vocab.get(unk, -1)
        self.max_word = max_word

    def many(self, texts: Sequence[str], ids: Sequence[list[int]]) -> list[Spans | None]:
        """Spans of each text's `ids` (no special tokens) in the text (ASCII), or None where they do not line up; in
        one vectorised pass: the texts are joined by spaces (which end words), and each text's words and tokens are
        numbered within it."""
        out: list[Spans | None] = [None] * len(texts)
        rows = [i for i, t in enumerate(texts) if t and ids[i]]
        if not rows:
            return out
        kind = _ASCII_CLASS[np.frombuffer(" ".join(texts[i] for i in rows).encode("ascii"), dtype=np.uint8)]
        text_len = np.array([len(texts[i]) for i in rows], dtype=np.int64)
        text_at = np.cumsum(text_len + 1) - text_len - 1  # where each text starts in the joined string
        before = np.concatenate(([0], kind[:-1]))
        after = np.concatenate((kind[1:], [0]))
        starts = np.flatnonzero((kind == 2) | ((kind == 1) & (before != 1)))
        ends = np.flatnonzero((kind == 2) | ((kind == 1) & (after != 1))) + 1
        lengths = ends - starts
        if not starts.size:
            return out  # ids but not one word (control characters only): nothing they could spell
        m = len(rows)
        word_text = np.searchsorted(text_at, starts, side="right") - 1  # the text of each word
        n_words = np.bincount(word_text, minlength=m)
        tokens = np.concatenate([np.asarray(ids[i], dtype=np.int64) for i in rows])
        n_tokens = np.array([len(ids[i]) for i in rows], dtype=np.int64)
        token_at = np.cumsum(n_tokens) - n_tokens  # each text's first token
        token_text = np.repeat(np.arange(m), n_tokens)
        known = tokens < self.length.size
        tokens = np.where(known, tokens, 0)
        first = ~self.continues[tokens]
        n_first = np.bincount(token_text, weights=first, minlength=m).astype(np.int64)
        bad = (n_first != n_words) | ~first[token_at]
        bad |= np.bincount(token_text, weights=~known, minlength=m) > 0
        bad |= np.bincount(word_text, weights=lengths > self.max_word, minlength=m) > 0
        controls = np.flatnonzero(kind == 3)
        bad[np.searchsorted(text_at, controls, side="right") - 1] = True
        # Each token's word, numbered within its text and offset by the words of the texts before it.
        word_at = np.cumsum(n_words) - n_words
        first_before = np.cumsum(n_first) - n_first
        word = np.cumsum(first) - 1 - first_before[token_text] + word_at[token_text]
        word = np.clip(word, 0, max(0, starts.size - 1))
        size = self.length[tokens]
        unk = tokens == self.unk
        size[unk] = lengths[word[unk]]
        into = np.cumsum(size) - size  # characters before each token, over all the texts
        lead = np.maximum.accumulate(np.where(first, np.arange(tokens.size), 0))  # the first token of its word
        start = starts[word] + into - into[lead]
        # a text already refused adds nothing: its tokens may be numbered into another text's words
        spelled = np.bincount(word, weights=np.where(bad[token_text], 0, size), minlength=starts.size).astype(np.int64)
        bad |= np.bincount(word_text, weights=spelled != lengths, minlength=m) > 0
        for k, i in enumerate(rows):
            if bad[k]:
                continue
            a, b = token_at[k], token_at[k] + n_tokens[k]
            local = start[a:b] - text_at[k]
            out[i] = Spans(list(ids[i]), np.stack([local, local + size[a:b]], axis=1), word[a:b] - word_at[k])
        return out


class TextTokenizer:
    """Text -> ids with [CLS]/[SEP], cut to the model's window as sentence-transformers cuts (the final [SEP]
    kept), counting what was cut. Identical ids from either backend: flash-tokenizer serves text made of ASCII
    and the characters of FLASH_EXTRA only after it matched the Rust tokenizer on every probe text at load (if
    the extra characters fail, on ASCII alone); any other text always goes to the Rust tokenizer."""

    def __init__(
        self,
        spec: str,
        max_seq: int,
        choice: TokenizerChoice = "auto",
        threads: bool = False,
        vocab: Path | None = None,
    ) -> None:
        """`spec`: the model's tokenizer.json (or a fast tokenizer's `backend_tokenizer.to_str()`); `vocab`: its
        vocab.txt, where the folder has one (else it is written from `spec` for flash-tokenizer)."""
        from tokenizers import Tokenizer

        self.max_seq = max_seq
        self.rust: Any = Tokenizer.from_str(spec)
        self.rust.no_padding()
        self.rust.enable_truncation(max_seq)
        self.threads = threads  # flash-tokenizer's OpenMP threads: worth it only with cores to spare
        self.flash: Any = None
        self._flash_lock = threading.Lock()
        self.why_not_flash = ""
        self.other = re.compile("[^\x00-\x7f]")  # text that goes to the Rust tokenizer
        # Special-token strings in raw text ("[SEP]") are matched as the token by the Rust tokenizer (and the
        # chunker, and sentence-transformers); flash-tokenizer splits them as words: such text goes to Rust.
        self.special = added_tokens_pattern(self.rust)
        self._spans: WordPieceSpans | None = None
        self.long_word: re.Pattern[str] | None = None  # a word WordPiece makes [UNK] of, and flash-tokenizer not
        self.max_word = 0
        if choice != "rust":
            parsed = json.loads(spec)
            self.flash, self.why_not_flash = self._load_flash(parsed, vocab)
            if self.flash is None and choice == "flash":
                raise RuntimeError(f"tokenizer=flash: {self.why_not_flash}")
            if self.flash is not None:
                model, norm = parsed["model"], parsed.get("normalizer") or {}
                max_word = int(model.get("max_input_chars_per_word", 100))
                self.long_word = re.compile(f"{_WORD_CHAR}{{{max_word + 1},}}")
                self.max_word = max_word
                if norm.get("type") == "BertNormalizer" and norm.get("lowercase", True):
                    self._spans = WordPieceSpans(model["vocab"], model.get("unk_token", "[UNK]"), max_word)
        self.backend = "flash+rust" if self.flash is not None else "rust"

    @classmethod
    def of_model(
        cls, model_dir: Path, max_seq: int, choice: TokenizerChoice = "auto", threads: bool = False
    ) -> TextTokenizer:
        """The tokenizer of a model folder."""
        vocab = model_dir / "vocab.txt"
        spec = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
        return cls(spec, max_seq, choice, threads, vocab if vocab.exists() else None)

    def _load_flash(self, spec: dict[str, Any], vocab: Path | None) -> tuple[Any, str]:
        model = spec.get("model") or {}
        if model.get("type") != "WordPiece":
            return None, "the model's tokenizer is not a WordPiece vocabulary"
        try:
            from flash_tokenizer import BertTokenizerFlash
        except ImportError:
            return None, "flash-tokenizer is not installed"
        if vocab is None:  # a folder saved by newer transformers keeps only tokenizer.json
            self._vocab_dir = tempfile.TemporaryDirectory(prefix="ragtide-vocab-")
            vocab = Path(self._vocab_dir.name) / "vocab.txt"
            tokens = sorted(model["vocab"].items(), key=lambda kv: kv[1])
            vocab.write_text("".join(f"{token}\n" for token, _ in tokens), encoding="utf-8")
        lower = bool((spec.get("normalizer") or {}).get("lowercase", True))
        flash = BertTokenizerFlash(str(vocab), do_lower_case=lower, model_max_length=self.max_seq + 1)
        probes = probe_texts()
        bad = self._disagreements(flash, probes)
        if bad:
            log.warning(
                "flash-tokenizer disagrees with the model's tokenizer; using the Rust tokenizer",
                extra={"mismatches": bad, "probes": len(probes)},
            )
            return None, f"flash-tokenizer disagreed with the model's tokenizer on {bad} of {len(probes)} probes"
        if self._disagreements(flash, [flash_contexts(ch) for ch in FLASH_EXTRA]):
            log.warning("flash-tokenizer disagrees on non-ASCII characters; it serves ASCII text only")
        else:
            self.other = re.compile(f"[^\\x00-\\x7f{re.escape(FLASH_EXTRA)}]")
        return flash, ""

    def _disagreements(self, flash: Any, probes: list[str]) -> int:
        want = self.rust_ids(probes)[0]
        got = self._cut(self._flash_ids(flash, probes))[0]
        return sum(1 for a, b in zip(want, got, strict=True) if a != b)

    def _flash_ids(self, flash: Any, texts: list[str], max_len: int | None = None) -> list[list[int]]:
        # Unpadded lists; any trailing zeros are padding ([PAD] = 0 and every sequence ends with [SEP]). One call
        # at a time: the writer's chunking thread and verify may share this tokenizer. Cut past `max_len` ids
        # (default: one past the window, so that a cut text is told apart).
        with self._flash_lock:
            out = flash.tokenizer.batch_encode(texts, "longest", max_len or self.max_seq + 1, self.threads)
        return [_unpad(s) for s in out]

    def window(self, ids: Sequence[int]) -> list[int]:
        """Ids with specials cut to the model's window as sentence-transformers cuts: the final [SEP] kept."""
        return [*ids[: self.max_seq - 1], ids[-1]] if len(ids) > self.max_seq else list(ids)

    def _cut(self, seqs: list[list[int]]) -> tuple[list[list[int]], int]:
        return [self.window(s) if len(s) > self.max_seq else s for s in seqs], sum(
            1 for s in seqs if len(s) > self.max_seq
        )

    def rust_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Ids per text from the Rust tokenizer, and how many texts it cut to the window."""
        encs = self.rust.encode_batch(list(texts))
        return [e.ids for e in encs], sum(1 for e in encs if e.overflowing)

    def _for_flash(self, texts: Sequence[str]) -> list[bool]:
        """Whether flash-tokenizer serves each text (loaded, its characters, no special-token string, no word too
        long for WordPiece). The long-word pattern runs only where one pass over the batch found a long run."""
        if self.flash is None:
            return [False] * len(texts)
        long_word = self.long_word
        if long_word is not None and not may_hold_long_word(texts, self.max_word):
            long_word = None
        return [
            (text.isascii() or self.other.search(text) is None)
            and (long_word is None or long_word.search(text) is None)
            and (self.special is None or self.special.search(text) is None)
            for text in texts
        ]

    def __call__(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Ids per text, and how many texts were cut to the window."""
        texts = list(texts)
        rust_rows = [i for i, ok in enumerate(self._for_flash(texts)) if not ok]
        if len(rust_rows) == len(texts):
            return self.rust_ids(texts)
        if not rust_rows:
            return self._cut(self._flash_ids(self.flash, texts))
        skip = set(rust_rows)
        flash_rows = [i for i in range(len(texts)) if i not in skip]
        out: list[list[int]] = [[] for _ in texts]
        total = 0
        for rows, (seqs, cut) in (
            (rust_rows, self.rust_ids([texts[i] for i in rust_rows])),
            (flash_rows, self._cut(self._flash_ids(self.flash, [texts[i] for i in flash_rows]))),
        ):
            for i, s in zip(rows, seqs, strict=True):
                out[i] = s
            total += cut
        return out, total

    def spans(self, texts: Sequence[str]) -> list[Spans | None]:
        """For the chunker's long texts: each ASCII text's tokens with their spans, from flash-tokenizer's ids;
        None for the texts it does not serve or whose tokens do not line up with their words."""
        out: list[Spans | None] = [None] * len(texts)
        if self._spans is None:
            return out
        rows = [i for i, ok in enumerate(self._for_flash(texts)) if ok and texts[i].isascii()]
        if not rows:
            return out
        longest = max(len(texts[i]) for i in rows) + 2  # never more tokens than characters, plus the specials
        seqs = self._flash_ids(self.flash, [texts[i] for i in rows], longest)
        for i, spans in zip(rows, self._spans.many([texts[i] for i in rows], [q[1:-1] for q in seqs]), strict=True):
            out[i] = spans
        return out

    def content_ids(self, texts: Sequence[str], max_tokens: int) -> list[list[int] | None]:
        """For the chunker: each text's ids without the special tokens where flash-tokenizer serves the text and
        it has at most `max_tokens` tokens (one window: its ids are exactly the chunk's); None for every other text
        (longer, or for the Rust tokenizer), which the chunker cuts with token offsets. Needs `max_tokens + 2 <=
        max_seq`, so that a text cut at the window is never taken for one that fits."""
        if max_tokens + 2 > self.max_seq:
            raise ValueError(f"max_tokens {max_tokens} does not fit a window of {self.max_seq} with its specials")
        out: list[list[int] | None] = [None] * len(texts)
        rows = [i for i, ok in enumerate(self._for_flash(texts)) if ok]
        if not rows:
            return out
        for i, seq in zip(rows, self._flash_ids(self.flash, [texts[i] for i in rows]), strict=True):
            if len(seq) - 2 <= max_tokens:
                out[i] = seq[1:-1]
        return out
