"""The embedded Qdrant engine (qdrant-edge): in-process, persisted under the data folder, WAL-backed.

One process owns a shard directory: the node process, which runs the embedder and the retrieval API.

The engine is reached through `ragtide_edge` (native/ragtide-edge), our binding of the qdrant-edge crate (the same
engine and on-disk format as the qdrant-edge-py wheel): a batch crosses as one float32 array and one JSON array of
payloads, and the engine parses and writes it with the GIL released. The wheel converted each payload field by
field from Python objects under the GIL, which capped the write path (docs/embedding.md).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from ragtide_edge import Shard

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
)

# The only errors of the embedded engine that mean "unavailable right now": its disk cannot take the write. Freeing
# space ends the outage with no restart (the worker retries the batch). Everything else the engine raises is a bug
# or a poison row.
_DISK_FULL = {errno.ENOSPC: "disk full (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)"}


def edge_unavailable(exc: BaseException) -> str | None:
    """Why the embedded engine cannot write now, or None when `exc` is not an outage. The engine reports Rust I/O
    errors as text ("No space left on device (os error 28)"); Python's own as OSError."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return _DISK_FULL[exc.errno]
    text = str(exc)
    for code, why in _DISK_FULL.items():
        if f"os error {code})" in text or os.strerror(code) in text:
            return f"{why}: {text}"
    return None


def to_edge_filter(flt: Filter | None) -> str | None:
    """Our dict filter as the engine's (Qdrant's REST JSON)."""
    rest = qdrant_filter(flt)
    return None if rest is None else orjson.dumps(rest).decode()


def _json_default(value: Any) -> Any:
    """Values orjson does not know: a Decimal (a numeric column read by psycopg) as a float, as before."""
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(type(value).__name__)


def _json(value: Any) -> bytes:
    """A payload (or a list of them) as JSON; a value JSON cannot hold is a TypeError that names it (a poison row,
    never retried). Integers past 64 bits are refused too; NaN and infinities are stored as null."""
    try:
        return orjson.dumps(value, default=_json_default)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"payload cannot be stored as JSON: {exc}") from exc


def _payload(raw: str) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(raw)
    return out


def check_free_space(directory: Path, min_free_bytes: int) -> None:
    """Refuse a write while the volume holding `directory` has less than `min_free_bytes` free: the engine writes
    through memory maps, and a page written into a full disk is a SIGBUS that kills the whole process (seen on a
    full tmpfs), not an error it could return. Refusing first turns a full disk into an outage the worker retries."""
    if min_free_bytes <= 0:
        return
    free = shutil.disk_usage(directory).free
    if free < min_free_bytes:
        raise StoreUnavailable(
            f"embedded index at {directory}: disk full ({free >> 20} MiB free, below index.min_free_mb = "
            f"{min_free_bytes >> 20}); free space on that volume and writing resumes by itself"
        )


class EdgeIndex:
    """VectorIndex over one qdrant-edge shard at <path>/<collection>."""

    def __init__(
        self, path: Path, collection: str, min_free_bytes: int = 0, indexing_threshold_kb: int | None = None
    ) -> None:
        self.dir = path / collection
        self.min_free_bytes = min_free_bytes
        self.indexing_threshold_kb = indexing_threshold_kb
        self._shard: Any = None
        self._lock = threading.Lock()  # guards creation only; the shard itself is thread-safe

    def _writable(self) -> Any:
        """The shard, once the disk has room for a write."""
        check_free_space(self.dir, self.min_free_bytes)
        return self.shard

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
                shard = Shard.load(self.dir)
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
                config: dict[str, Any] = {"vectors": {"": {"size": dim, "distance": "Cosine"}}}
                if self.indexing_threshold_kb is not None:
                    config["optimizers"] = {"indexing_threshold": self.indexing_threshold_kb}
                shard = Shard.create(self.dir, orjson.dumps(config).decode())
            have = set(shard.info()["payload_schema"])  # a shard from an older version gets the indexes it lacks
            schemas = {
                **dict.fromkeys(KEYWORD_FIELDS, '"keyword"'),
                **dict.fromkeys(INTEGER_FIELDS, '"integer"'),
                TENANT_FIELD: '{"type": "keyword", "is_tenant": true}',
            }
            for field, schema in schemas.items():
                if field not in have:
                    shard.create_field_index(field, schema)
            self._shard = Guarded(shard, f"embedded index at {self.dir}", edge_unavailable)

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points: one array of vectors, one JSON array of payloads."""
        if points:
            vectors = np.asarray([p.vector for p in points], dtype=np.float32)
            payloads = _json([p.payload if type(p.payload) is dict else dict(p.payload) for p in points])
            self._writable().upsert([p.id for p in points], vectors, payloads)

    def set_payload(self, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Set payload fields on existing points."""
        if ids:
            self._writable().set_payload(list(ids), _json(dict(payload)).decode())

    def delete(self, ids: Sequence[str]) -> None:
        """Delete by id."""
        if ids:
            self._writable().delete(list(ids))

    def delete_where(self, flt: Filter) -> None:
        """Delete everything matching the filter."""
        edge_filter = to_edge_filter(flt)
        if edge_filter is None:
            raise ValueError("refusing to delete with an empty filter")
        self._writable().delete_where(edge_filter)

    def scroll(self, flt: Filter | None = None, limit: int = 10_000) -> list[StoredPoint]:
        """Matching points without vectors."""
        edge_filter = to_edge_filter(flt)

        def page(offset: str | None, size: int) -> tuple[list[StoredPoint], str | None]:
            records, next_offset = self.shard.scroll(edge_filter, offset, size)
            return [StoredPoint(pid, _payload(raw)) for pid, raw in records], next_offset

        return scroll_pages(page, limit)

    def search(self, vector: npt.NDArray[np.float32], k: int, flt: Filter | None = None) -> list[Hit]:
        """Nearest neighbours by cosine."""
        res = self.shard.search(np.ascontiguousarray(vector, dtype=np.float32), k, to_edge_filter(flt))
        return [Hit(pid, float(score), _payload(raw)) for pid, score, raw in res]

    def count(self, flt: Filter | None = None) -> int:
        """Exact count."""
        return int(self.shard.count(to_edge_filter(flt)))

    def close(self) -> None:
        """Flush and close the shard."""
        with self._lock:
            if self._shard is not None:
                self._shard.flush()
                self._shard.close()
                self._shard = None

    def optimize(self) -> dict[str, Any]:
        """Merge segments and build HNSW. qdrant-edge has no background optimizer, so it runs only when asked
        (about 0.5 s per 1,000 points on 2 cores, with the GIL released: search keeps answering). It writes new
        segments: the free-space reserve applies."""
        optimized = bool(self._writable().optimize())
        info = self.shard.info()
        return {
            "optimized": optimized,
            "points": info["points_count"],
            "indexed_vectors": info["indexed_vectors_count"],
            "segments": info["segments_count"],
        }

    def drop(self) -> None:
        """Close the shard and delete its directory."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
