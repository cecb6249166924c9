"""The embedded Qdrant engine (qdrant-edge): in-process, persisted under the data folder, WAL-backed.

One process owns a shard directory: the node process, which runs the embedder and the retrieval API.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

from ragtide.embedder.index.base import (
    INTEGER_FIELDS,
    KEYWORD_FIELDS,
    TENANT_FIELD,
    Filter,
    Hit,
    IndexPoint,
    Range,
    StoredPoint,
    normalise_filter,
    scroll_pages,
)


def to_edge_filter(flt: Filter | None) -> qe.Filter | None:
    """Our dict filter as a qdrant-edge Filter."""
    conds: list[Any] = []
    for key, value in normalise_filter(flt):
        if isinstance(value, Range):
            conds.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value.gte, lt=value.lt)))
            continue
        match = qe.MatchAny(value) if isinstance(value, list) else qe.MatchValue(value)  # type: ignore[arg-type]
        conds.append(qe.FieldCondition(key=key, match=match))
    return qe.Filter(must=conds) if conds else None


class EdgeIndex:
    """VectorIndex over one qdrant-edge shard at <path>/<collection>."""

    def __init__(self, path: Path, collection: str) -> None:
        self.dir = path / collection
        self._shard: Any = None
        self._lock = threading.Lock()  # guards creation only; the shard itself is thread-safe

    @property
    def shard(self) -> Any:
        """The open shard (ensure_collection first)."""
        if self._shard is None:
            raise RuntimeError("index not open: call ensure_collection(dim) first")
        return self._shard

    def ensure_collection(self, dim: int) -> None:
        """Open the shard, creating it with cosine vectors of `dim` and payload indexes when new."""
        with self._lock:
            if self._shard is not None:
                return
            if (self.dir / "edge_config.json").exists() or any(self.dir.glob("*")):
                shard = qe.EdgeShard.load(str(self.dir))
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
                cfg = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))
                shard = qe.EdgeShard.create(str(self.dir), cfg)
            have = set(shard.info().payload_schema)  # a shard from an older version gets the indexes it lacks
            for field in KEYWORD_FIELDS:
                if field not in have:
                    shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
            for field in INTEGER_FIELDS:
                if field not in have:
                    shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Integer))
            if TENANT_FIELD not in have:
                shard.update(qe.UpdateOperation.create_field_index(TENANT_FIELD, qe.KeywordIndexParams(is_tenant=True)))
            self._shard = shard

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points."""
        if points:
            self.shard.update(
                qe.UpdateOperation.upsert_points(
                    [qe.Point(p.id, p.vector.astype(np.float32).tolist(), dict(p.payload)) for p in points]
                )
            )

    def set_payload(self, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Set payload fields on existing points."""
        if ids:
            self.shard.update(qe.UpdateOperation.set_payload(list(ids), dict(payload)))

    def delete(self, ids: Sequence[str]) -> None:
        """Delete by id."""
        if ids:
            self.shard.update(qe.UpdateOperation.delete_points(list(ids)))

    def delete_where(self, flt: Filter) -> None:
        """Delete everything matching the filter."""
        edge_filter = to_edge_filter(flt)
        if edge_filter is None:
            raise ValueError("refusing to delete with an empty filter")
        self.shard.update(qe.UpdateOperation.delete_points_by_filter(edge_filter))

    def scroll(self, flt: Filter | None = None, limit: int = 10_000) -> list[StoredPoint]:
        """Matching points without vectors."""
        edge_filter = to_edge_filter(flt)
        return scroll_pages(
            lambda offset, size: self.shard.scroll(
                qe.ScrollRequest(offset=offset, limit=size, filter=edge_filter, with_payload=True, with_vector=False)
            ),
            limit,
        )

    def search(self, vector: npt.NDArray[np.float32], k: int, flt: Filter | None = None) -> list[Hit]:
        """Nearest neighbours by cosine."""
        res = self.shard.search(
            qe.SearchRequest(
                query=qe.Query.Nearest(vector.astype(np.float32).tolist()),
                limit=k,
                filter=to_edge_filter(flt),
                with_payload=True,
                with_vector=False,
            )
        )
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res]

    def count(self, flt: Filter | None = None) -> int:
        """Exact count."""
        return int(self.shard.count(qe.CountRequest(exact=True, filter=to_edge_filter(flt))))

    def close(self) -> None:
        """Flush and close the shard."""
        with self._lock:
            if self._shard is not None:
                self._shard.flush()
                self._shard.close()
                self._shard = None

    def optimize(self) -> dict[str, Any]:
        """Merge segments and build HNSW. qdrant-edge has no background optimizer, and this call holds the GIL
        (the whole process pauses: about 0.5 s per 1,000 points on 2 cores), so it runs only when asked."""
        optimized = bool(self.shard.optimize())
        info = self.shard.info()
        return {
            "optimized": optimized,
            "points": info.points_count,
            "indexed_vectors": info.indexed_vectors_count,
            "segments": info.segments_count,
        }

    def drop(self) -> None:
        """Close the shard and delete its directory."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
