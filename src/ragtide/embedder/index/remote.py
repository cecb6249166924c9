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

from ragtide.contracts.errors import StoreUnavailable
from ragtide.embedder.index.base import (
    INTEGER_FIELDS,
    KEYWORD_FIELDS,
    TENANT_FIELD,
    Filter,
    Guarded,
    Hit,
    IndexPoint,
    StoredPoint,
    qdrant_filter,
    scroll_pages,
    vector_lists,
)


def to_client_filter(flt: Filter | None) -> models.Filter | None:
    """Our dict filter as a qdrant-client Filter."""
    rest = qdrant_filter(flt)
    return None if rest is None else models.Filter.model_validate(rest)


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


# Calls that change the store: passed to another node only when the first was never reached (a connection that
# was refused or never made). A write that timed out may still be applied there, later than the next write that
# another node took: sent elsewhere, it could land out of order (an older version over a newer one, a deleted row
# back). It goes back to the worker's batch retry instead, on the same node first.
_WRITES = frozenset(
    {"upsert", "set_payload", "overwrite_payload", "delete", "delete_vectors", "update_vectors", "batch_update_points"}
)


def _never_reached(exc: StoreUnavailable) -> bool:
    cause = exc.__cause__
    source = cause.source if isinstance(cause, ResponseHandlingException) else cause
    return isinstance(source, httpx.ConnectError | httpx.ConnectTimeout)


class _Failover:
    """Several nodes of one Qdrant cluster: a call goes to the node that answered last; a node that is unreachable
    (StoreUnavailable) passes the call to the next: any read, and a write that never reached it (_WRITES). Only
    when no node can take it does the caller see the outage."""

    def __init__(self, nodes: Sequence[Any]) -> None:
        self._nodes = list(nodes)
        self._current = 0

    def __getattr__(self, name: str) -> Any:
        if not callable(getattr(self._nodes[0], name)):
            return getattr(self._nodes[self._current], name)

        def failover(*args: Any, **kwargs: Any) -> Any:
            start = self._current
            for step in range(len(self._nodes)):
                i = (start + step) % len(self._nodes)
                try:
                    result = getattr(self._nodes[i], name)(*args, **kwargs)
                except StoreUnavailable as exc:
                    if step == len(self._nodes) - 1 or (name in _WRITES and not _never_reached(exc)):
                        raise
                    self._current = (i + 1) % len(self._nodes)
                    continue
                self._current = i
                return result
            raise AssertionError("unreachable")

        return failover


class QdrantClientIndex:
    """VectorIndex over one Qdrant collection, on one server or any node of a cluster (`client` may be a list: a
    node that is down passes each call to the next). `wait=True` on every write: it returns once acknowledged."""

    def __init__(
        self,
        client: QdrantClient | Sequence[QdrantClient],
        collection: str,
        shards: int = 1,
        replication: int = 1,
        indexing_threshold_kb: int | None = None,
    ) -> None:
        # qdrant-client's local mode (tests, no server) is plain Python and not safe across threads; the node
        # calls the index from worker threads, so calls to it are serialised. A real server needs no lock.
        clients = [client] if isinstance(client, QdrantClient) else list(client)
        guarded = [
            Guarded(_Serialized(c) if _is_local(c) else c, f"Qdrant collection {collection}", client_unavailable)
            for c in clients
        ]
        self.client: Any = guarded[0] if len(guarded) == 1 else _Failover(guarded)
        self._clients = clients
        self.collection = collection
        self.shards = shards
        self.replication = replication
        self.indexing_threshold_kb = indexing_threshold_kb

    def ensure_collection(self, dim: int) -> None:
        """Create the collection (its shards and replicas, on a cluster) and payload indexes if missing."""
        if self.client.collection_exists(self.collection):
            return
        try:
            self.client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                shard_number=self.shards,
                replication_factor=self.replication,
                optimizers_config=(
                    None
                    if self.indexing_threshold_kb is None
                    else models.OptimizersConfigDiff(indexing_threshold=self.indexing_threshold_kb)
                ),
            )
        except UnexpectedResponse as exc:  # another process of the cluster created it first
            if exc.status_code != 409 and "already exists" not in str(exc):
                raise
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
            batch = models.Batch(  # columns, not a pydantic model per point
                ids=[p.id for p in points], vectors=vector_lists(points), payloads=[dict(p.payload) for p in points]
            )
            self.client.upsert(self.collection, wait=True, points=batch)

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

        def page(offset: Any, size: int) -> tuple[list[StoredPoint], Any]:
            records, next_offset = self.client.scroll(
                self.collection,
                scroll_filter=client_filter,
                limit=size,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
            return [StoredPoint(str(r.id), dict(r.payload or {})) for r in records], next_offset

        return scroll_pages(page, limit)

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
        """Close the client (each node's)."""
        for client in self._clients:
            client.close()

    def optimize(self) -> dict[str, Any]:
        """Nothing to do: the Qdrant server indexes in the background."""
        return {"optimized": False, "points": self.count(), "detail": "the Qdrant server optimizes by itself"}

    def drop(self) -> None:
        """Delete the collection."""
        if self.client.collection_exists(self.collection):
            self.client.delete_collection(self.collection)
