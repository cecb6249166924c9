"""What a generation is: the spec that decides its vectors (model, dimension, chunking, precision, provider,
revision) and names its collection, and the run-time `Generation` a factory opens from it."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from ragtide.embedder.encoder import Encoder, unprompted, with_query_prefix
from ragtide.embedder.index.base import VectorIndex
from ragtide.embedder.writer import IndexWriter

log = logging.getLogger(__name__)

PRECISIONS = ("float", "int8")


@dataclass(frozen=True)
class GenerationSpec:
    """What decides the vectors of a collection. `model_path` and `url` say where to load the model or reach its
    provider, not what it is."""

    model: str
    dim: int
    max_tokens: int
    overlap: int
    revision: int = 1
    model_path: str | None = None
    precision: str = "float"
    provider: str = "local"
    url: str | None = None  # where a provider's generation was embedded (like model_path: not what it is)
    query_prefix: str = ""  # put before each query (E5/BGE-style models)
    document_prefix: str = ""  # put before each chunk embedded
    # How a provider's requests were shaped when it was built (not what the vectors are: outside the fingerprint),
    # so that its generation is still reached the same way after the configuration moved to another provider.
    normalize: bool = False
    send_dimensions: bool = False
    encoding_format: str = "base64"
    REQUEST_SHAPE: ClassVar[tuple[str, ...]] = ("normalize", "send_dimensions", "encoding_format")

    @property
    def fingerprint(self) -> str:
        """Stable across machines: the model's name, not its path. int8 vectors are a generation of their own: they
        agree with fp32 only to a cosine of ~0.99 (fp32, bf16 and fp16 to 0.999), enough to reorder close results,
        so a change of precision is a blue/green rebuild, never a mix in one collection. So is a change of
        provider: two servers may serve different weights under one model name. "float" and "local" add nothing,
        so generations made before precision and provider were part of a spec keep their fingerprint."""
        ident = f"{self.model}|{self.dim}|{self.max_tokens}|{self.overlap}|{self.revision}"
        if self.precision != "float":
            ident += f"|{self.precision}"
        if self.provider != "local":
            ident += f"|{self.provider}"
        if self.query_prefix or self.document_prefix:
            ident += f"|q={self.query_prefix!r}|d={self.document_prefix!r}"
        return hashlib.sha256(ident.encode()).hexdigest()[:10]

    @property
    def encoder_identity(self) -> tuple[str, str, str, int]:
        """What an encoder of this generation must be (`encoder_identity` of it): provider, model, precision and
        dimension (a provider's model may make vectors of several sizes)."""
        return (self.provider, self.model, self.precision, self.dim)

    def collection(self, base: str) -> str:
        """The physical collection of this generation."""
        return f"{base}-{self.fingerprint}"

    def same_vectors(self, other: GenerationSpec) -> bool:
        """Same provider, model, prompts, precision and chunking: the vectors would be identical, whatever the
        revision."""
        # where and how it is reached, not what it makes
        reach: dict[str, Any] = {k: getattr(other, k) for k in ("revision", "model_path", "url", *self.REQUEST_SHAPE)}
        return replace(self, **reach) == other

    def as_dict(self) -> dict[str, Any]:
        """JSON form (catalog payload, API)."""
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationSpec:
        """Inverse of as_dict."""
        return cls(
            model=str(d["model"]),
            dim=int(d["dim"]),
            max_tokens=int(d["max_tokens"]),
            overlap=int(d["overlap"]),
            revision=int(d.get("revision", 1)),
            model_path=d.get("model_path"),
            precision=_precision(d.get("precision", "float")),
            provider=str(d.get("provider", "local")),
            url=d.get("url"),
            query_prefix=str(d.get("query_prefix", "")),
            document_prefix=str(d.get("document_prefix", "")),
            normalize=bool(d.get("normalize", False)),
            send_dimensions=bool(d.get("send_dimensions", False)),
            encoding_format=str(d.get("encoding_format", "base64")),
        )


def encoder_identity(encoder: Encoder) -> tuple[str, str, str, int]:
    """Which generations an encoder can serve: those whose `GenerationSpec.encoder_identity` this is."""
    return (encoder.provider, encoder.model_name, encoder.precision, encoder.dim)


def _precision(value: Any) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"a generation's precision is one of {', '.join(PRECISIONS)}, not {value!r}")
    return str(value)


@dataclass
class Generation:
    """A generation at run time: its collection, its encoder and the writer that keeps it equal to the source."""

    spec: GenerationSpec
    index: VectorIndex
    encoder: Encoder
    writer: IndexWriter

    def close(self) -> None:
        """This process is done with it: its writer's threads end (after the writes in flight), its collection is
        closed."""
        self.writer.close()
        self.index.close()


GenerationFactory = Callable[[GenerationSpec], Generation]


class SearchEncoders:
    """Search's own encoder for each generation (`Generations(query_encoder=...)` in a process that both writes and
    searches: the node): `configured` for the generations of its model, and for a generation of another model (a
    migration) one loaded by `load(spec)` once, when search first reads it; never the writer's, whose lock holds
    whole batches and whose threads run at a lower priority. One that cannot be loaded leaves search on the
    writer's (logged). Each with the generation's query prompt."""

    def __init__(self, configured: Encoder, load: Callable[[GenerationSpec], Encoder]) -> None:
        self.load = load
        self._own: dict[tuple[str, str, str, int], Encoder] = {encoder_identity(configured): configured}
        self._prompted: dict[tuple[tuple[str, str, str, int], str], Encoder] = {}  # the batcher groups by encoder
        self._loading = threading.Lock()

    def __call__(self, gen: Generation) -> Encoder:
        key = (gen.spec.encoder_identity, gen.spec.query_prefix)
        found = self._prompted.get(key)
        if found is None:
            with self._loading:
                found = self._prompted.get(key)
                if found is None:
                    found = self._prompted[key] = with_query_prefix(self._of(gen), gen.spec.query_prefix)
        return found

    def _of(self, gen: Generation) -> Encoder:
        identity = gen.spec.encoder_identity
        if identity not in self._own:
            try:
                self._own[identity] = self.load(gen.spec)
            except Exception as exc:  # search still answers, on the writer's encoder
                log.warning("no encoder of search's own", extra={"generation": gen.spec.fingerprint, "error": str(exc)})
                self._own[identity] = unprompted(gen.encoder)  # the writer's carries the prompt: one, not two
        return self._own[identity]
