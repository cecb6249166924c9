"""A Qdrant server (or qdrant-client's local mode) through qdrant-client: used when QDRANT_URL is set."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ragtide.embedder.index.base import (
    INTEGER_FIELDS,
    KEYWORD_FIELDS,
    TENANT_FIELD,
    Filter,
    Guarded,
    Hit,
    IndexPoint,
    Range,
    StoredPoint,
    normalise_filter,
    scroll_pages,
)


def to_client_filter(flt: Filter | None) -> models.Filter | None:
    """Our dict filter as a qdrant-client Filter."""
    conds: list[models.Condition] = []
    for key, value in normalise_filter(flt):
        if isinstance(value, Range):
            conds.append(models.FieldCondition(key=key, range=models.Range(gte=value.gte, lt=value.lt)))
            continue
        match: models.MatchAny | models.MatchValue = (
            models.MatchAny(any=list(value)) if isinstance(value, list) else models.MatchValue(value=value)
        )
        conds.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=conds) if conds else None


# HTTP answers of a Qdrant server that mean "not now": overloaded, restarting, behind a proxy that lost it.
_NOT_NOW = {429: "overloaded (429)", 502: "bad gateway (502)", 503: "unavailable (503)", 504: "gateway timeout (504)"}


def client_unavailable(exc: BaseException) -> str | None:
    """Why a Qdrant server cannot serve now, or None when `exc` is not an outage: the connection failing or timing
    out (qdrant-client wraps httpx's transport errors in ResponseHandlingException), a not-now status, or the
    server's disk being full. Any other answer (400 for a bad point, 404 for a missing collection) is not."""
    source = exc.source if isinstance(exc, ResponseHandlingException) else exc  # qdrant-client wraps httpx's
    if isinstance(source, httpx.TransportError):  # not its wrapped response-parsing errors: those are bugs
        return f"unreachable ({type(source).__name__}: {source})"
    if isinstance(exc, UnexpectedResponse):
        if exc.status_code in _NOT_NOW:
            return _NOT_NOW[exc.status_code]
        if "No space left on device" in str(exc):
            return "the server's disk is full"
    return None


def _is_local(client: QdrantClient) -> bool:
    return type(getattr(client, "_client", None)).__name__ == "QdrantLocal"


class _Serialized:
    """Forwards method calls to `target`, one at a time."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class QdrantClientIndex:
    """VectorIndex over one Qdrant collection. `wait=True` on every write: it returns once acknowledged."""

    def __init__(self, client: QdrantClient, collection: str) -> None:
        # qdrant-client's local mode (tests, no server) is plain Python and not safe across threads; the node
        # calls the index from worker threads, so calls to it are serialised. A real server needs no lock.
        target = _Serialized(client) if _is_local(client) else client
        self.client: Any = Guarded(target, f"Qdrant collection {collection}", client_unavailable)
        self.collection = collection

    def ensure_collection(self, dim: int) -> None:
        """Create the collection and payload indexes if missing."""
        if self.client.collection_exists(self.collection):
            return
        self.client.create_collection(
            self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
        )
        for field in KEYWORD_FIELDS:
            self.client.create_payload_index(self.collection, field, models.PayloadSchemaType.KEYWORD, wait=True)
        for field in INTEGER_FIELDS:
            self.client.create_payload_index(self.collection, field, models.PayloadSchemaType.INTEGER, wait=True)
        self.client.create_payload_index(
            self.collection,
            TENANT_FIELD,
            models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
            wait=True,
        )

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points."""
        if points:
            self.client.upsert(
                self.collection,
                wait=True,
                points=[
                    models.PointStruct(id=p.id, vector=p.vector.astype(np.float32).tolist(), payload=dict(p.payload))
                    for p in points
                ],
            )

    def set_payload(self, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Set payload fields on existing points."""
        if ids:
            self.client.set_payload(self.collection, payload=dict(payload), points=list(ids), wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete by id."""
        if ids:
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def delete_where(self, flt: Filter) -> None:
        """Delete everything matching the filter."""
        client_filter = to_client_filter(flt)
        if client_filter is None:
            raise ValueError("refusing to delete with an empty filter")
        self.client.delete(self.collection, points_selector=models.FilterSelector(filter=client_filter), wait=True)

    def scroll(self, flt: Filter | None = None, limit: int = 10_000) -> list[StoredPoint]:
        """Matching points without vectors."""
        client_filter = to_client_filter(flt)
        return scroll_pages(
            lambda offset, size: self.client.scroll(
                self.collection,
                scroll_filter=client_filter,
                limit=size,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            ),
            limit,
        )

    def search(self, vector: npt.NDArray[np.float32], k: int, flt: Filter | None = None) -> list[Hit]:
        """Nearest neighbours by cosine."""
        res = self.client.query_points(
            self.collection,
            query=vector.astype(np.float32).tolist(),
            limit=k,
            query_filter=to_client_filter(flt),
            with_payload=True,
            with_vectors=False,
        )
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res.points]

    def count(self, flt: Filter | None = None) -> int:
        """Exact count."""
        return int(self.client.count(self.collection, count_filter=to_client_filter(flt), exact=True).count)

    def close(self) -> None:
        """Close the client."""
        self.client.close()

    def optimize(self) -> dict[str, Any]:
        """Nothing to do: the Qdrant server indexes in the background."""
        return {"optimized": False, "points": self.count(), "detail": "the Qdrant server optimizes by itself"}

    def drop(self) -> None:
        """Delete the collection."""
        if self.client.collection_exists(self.collection):
            self.client.delete_collection(self.collection)
