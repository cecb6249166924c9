"""The VectorIndex protocol and the value types that cross it.

Filters are plain dicts: payload path -> value (equality), list of values (any of) or `Range` (a numeric
interval). That is all the services need, and it maps one-to-one onto Qdrant's `must` + MatchValue / MatchAny /
Range in every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ragtide.contracts.errors import ClientError, StoreUnavailable
from ragtide.embedder.encoder import Encoder


@dataclass(frozen=True, slots=True)
class Range:
    """A numeric interval condition, `gte <= value < lt` (a bound left None is open). Qdrant compares as
    float64: integers are exact up to 2**53 (a WAL position of 8 PiB)."""

    gte: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if self.gte is None and self.lt is None:
            raise ValueError("Range needs at least one bound")

    def holds(self, value: Any) -> bool:
        """Whether a payload value lies in the interval (non-numbers never do)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return (self.gte is None or value >= self.gte) and (self.lt is None or value < self.lt)


FilterValue = str | int | bool | Sequence[str] | Sequence[int] | Range
Filter = Mapping[str, FilterValue]
NormalValue = str | int | bool | list[str | int] | Range

# Payload fields with a keyword index: finding every chunk of a row or table, and tenant separation.
KEYWORD_FIELDS = ("row_key", "table")
# Counting indexed rows (chunk_no = 0 per table) must not scan: at 100k points an unindexed count held the
# GIL for ~300 ms in qdrant-edge, stalling the node's event loop.
INTEGER_FIELDS = ("chunk_no",)
TENANT_FIELD = "tenant"


class IndexPoint(NamedTuple):
    """A point to write. (A tuple: the write path makes one per chunk.)"""

    id: str
    vector: npt.NDArray[np.float32]
    payload: Mapping[str, Any]


def vector_lists(points: Sequence[IndexPoint]) -> list[list[float]]:
    """The points' vectors as float lists, in one conversion (one per point costs ~25 us of a write's time)."""
    out: list[list[float]] = np.asarray([p.vector for p in points], dtype=np.float32).tolist()
    return out


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """A stored point without its vector."""

    id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hit:
    """A search result."""

    id: str
    score: float
    payload: dict[str, Any]


@runtime_checkable
class VectorIndex(Protocol):
    """Everything the embedder writes and the retriever reads. Every write is acknowledged when it returns."""

    def ensure_collection(self, dim: int) -> None:
        """Create the collection and its payload indexes if they do not exist."""

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points (vector and whole payload)."""

    def set_payload(self, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Set these payload fields on existing points, keeping their vectors."""

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id."""

    def delete_where(self, flt: Filter) -> None:
        """Delete every point matching the filter (a row's chunks, a truncated table)."""

    def scroll(self, flt: Filter | None = None, limit: int = 10_000) -> list[StoredPoint]:
        """Points matching the filter, without vectors."""

    def search(self, vector: npt.NDArray[np.float32], k: int, flt: Filter | None = None) -> list[Hit]:
        """The k nearest points by cosine similarity, restricted by the filter."""

    def count(self, flt: Filter | None = None) -> int:
        """Exact number of points matching the filter."""

    def close(self) -> None:
        """Flush and release resources."""

    def drop(self) -> None:
        """Delete the whole collection (a retired generation)."""

    def optimize(self) -> dict[str, Any]:
        """Build the search index (HNSW) over what was written; what it did. A server does this by itself."""


class Guarded:
    """Forwards calls to a backend's client, raising `StoreUnavailable` for exactly the errors that `unavailable`
    names (it returns why, or None). Every other error passes through unchanged: a bug or a poison row, never
    retried. Each backend passes its own explicit mapping (edge.py, remote.py)."""

    def __init__(self, target: Any, store: str, unavailable: Callable[[BaseException], str | None]) -> None:
        self._target = target
        self._store = store
        self._unavailable = unavailable

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except StoreUnavailable:
                raise
            except Exception as exc:
                why = self._unavailable(exc)
                if why is None:
                    raise
                raise StoreUnavailable(f"{self._store}: {why}") from exc

        return guarded


def scroll_pages(fetch_page: Callable[[Any, int], tuple[Sequence[StoredPoint], Any]], limit: int) -> list[StoredPoint]:
    """Follow a backend's scroll pages (`fetch_page(offset, page_size) -> (points, next_offset)`, each backend
    making its records `StoredPoint`s) up to `limit`."""
    out: list[StoredPoint] = []
    offset: Any = None
    while len(out) < limit:
        points, offset = fetch_page(offset, min(1000, limit - len(out)))
        out.extend(points)
        if offset is None or not points:
            break
    return out


def normalise_filter(flt: Filter | None) -> list[tuple[str, NormalValue]]:
    """Sorted (key, value) pairs, rejecting shapes no backend supports."""
    if not flt:
        return []
    out: list[tuple[str, NormalValue]] = []
    for key, value in sorted(flt.items()):
        if isinstance(value, str | int | bool | Range):
            out.append((key, value))
        elif isinstance(value, Sequence) and value and all(isinstance(v, str | int) for v in value):
            out.append((key, [v for v in value if isinstance(v, str | int)]))
        else:
            raise ClientError(
                f"filter value for {key!r} must be a string, number, boolean, Range or non-empty list of them"
            )
    return out


def qdrant_filter(flt: Filter | None) -> dict[str, Any] | None:
    """Our dict filter as Qdrant's REST JSON filter (`must` of match / match-any / range conditions); None when
    empty. Both backends speak it: the embedded engine as JSON, the server through qdrant-client's model of it."""
    conds: list[dict[str, Any]] = []
    for key, value in normalise_filter(flt):
        if isinstance(value, Range):
            bounds = {"gte": value.gte, "lt": value.lt}
            conds.append({"key": key, "range": {k: v for k, v in bounds.items() if v is not None}})
        elif isinstance(value, list):
            conds.append({"key": key, "match": {"any": value}})
        else:
            conds.append({"key": key, "match": {"value": value}})
    return {"must": conds} if conds else None


@runtime_checkable
class ActiveIndex(Protocol):
    """What search reads: the live collection and the encoder its vectors came from, always as a pair (a
    generation switch changes both at once)."""

    def current(self) -> tuple[VectorIndex, Encoder]:
        """(index, encoder) of the live generation."""

    def close(self) -> None:
        """Release the collections."""


class FixedIndex:
    """An ActiveIndex that never switches: one collection, one encoder (tests, tools)."""

    def __init__(self, index: VectorIndex, encoder: Encoder) -> None:
        self.index = index
        self.encoder = encoder

    def current(self) -> tuple[VectorIndex, Encoder]:
        """The pair."""
        return self.index, self.encoder

    def close(self) -> None:
        """Close the index."""
        self.index.close()
