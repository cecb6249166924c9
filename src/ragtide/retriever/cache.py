"""The semantic answer cache, invalidated by the same change stream that keeps the index fresh.

Each answered question is stored in its own collection of the vector store (`<collection>-cache`, so it survives
restarts) with its embedding, the answer and its citations, the tenant, a scope (the request's retrieval and
generation parameters, and the encoder), and the source rows and tables its prompt was built from. A new
question of the same tenant and scope whose embedding is within `threshold` cosine gets the stored answer.

Invalidation: the embedder calls `invalidate(rows, tables)` for every applied batch, after the index write and
before the batch is acknowledged or reported searchable; every cached answer whose prompt used one of those rows
(or any row of a truncated table) is dropped. An answer that was being generated while a row it used changed is
not stored: `store` refuses when an invalidation since its retrieval (`seq`) touched its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge

from ragtide.contracts.chunks import row_key
from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.events import ChangeEvent, Op
from ragtide.contracts.logging import Throttled
from ragtide.contracts.settings import CacheSettings, RagtideSettings
from ragtide.embedder.index.base import Hit, IndexPoint, VectorIndex

if TYPE_CHECKING:
    from ragtide.embedder.worker import Applier
    from ragtide.embedder.writer import ApplyStats

log = logging.getLogger(__name__)

ALL_TENANTS = "*"  # callers that see every tenant (admin, dev mode without a key) share one cache scope
_RECENT_INVALIDATIONS = 10_000


@dataclass(frozen=True)
class CachedAnswer:
    """One stored answer as a hit returns it."""

    id: str
    question: str
    answer: str
    citations: list[dict[str, Any]]
    finish_reason: str
    created_ms: int
    similarity: float
    generation_s: float
    completion_tokens: int
    prompt_tokens: int

    def age_s(self, now: float) -> float:
        """Seconds since it was stored."""
        return max(0.0, now - self.created_ms / 1000)


def scope_key(**parts: Any) -> str:
    """A stable digest of what makes two answers comparable (filter, k, limits, model, history...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sources_of(hits: Sequence[Hit]) -> list[str]:
    """The row versions a retrieval returned: `table:row@lsn/ts`, sorted. A cached answer is served only when a
    fresh retrieval for the new question returns exactly these (same rows, same versions): never an answer
    built on other rows, nor on an older version of the same rows."""
    versions = set()
    for h in hits:
        p = h.payload
        versions.add(f"{p.get('table')}:{p.get('row_id')}@{p.get('lsn', 0)}/{p.get('source_ts_ms', 0)}")
    return sorted(versions)


class CacheMetrics:
    """Hit rate, savings and invalidations."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("ragtide_cache_requests", "Answer cache lookups", ["result"], registry=registry)
        self.invalidated = Counter(
            "ragtide_cache_invalidations", "Cached answers dropped because a row they used changed", registry=registry
        )
        self.saved_seconds = Counter(
            "ragtide_cache_saved_seconds", "Generation time saved by cache hits", registry=registry
        )
        self.saved_tokens = Counter("ragtide_cache_saved_tokens", "Generator tokens saved by hits", registry=registry)
        self.entries = Gauge("ragtide_cache_entries", "Answers in the cache", registry=registry)


def _totals(counter: Counter) -> list[Any]:
    return [s for c in counter.collect() for s in c.samples if s.name.endswith("_total")]


class SemanticCache:
    """Lookup, store, invalidate; thread-safe (the embedder invalidates from its worker thread)."""

    def __init__(
        self,
        index: VectorIndex,
        settings: CacheSettings,
        registry: CollectorRegistry,
        sole_writer: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`sole_writer`: this object stores every entry (the node); False when another process stores answers
        in the same collection (a standalone embedder invalidating for the retrievers). `clock`: wall time in
        seconds (entries carry their creation time, shared by every process)."""
        self.index = index
        self.clock = clock
        self.settings = settings
        self.sole_writer = sole_writer
        self.metrics = CacheMetrics(registry)
        self._lock = threading.Lock()
        self._order: OrderedDict[str, int] = OrderedDict()  # id -> created_ms, oldest first
        self._seq = 0
        self._recent: deque[tuple[int, frozenset[str], frozenset[str]]] = deque(maxlen=_RECENT_INVALIDATIONS)
        self._ready = False
        self._unwritable = Throttled(log, "answer cache not written (its store is unavailable); answers go on")

    def ensure(self, dim: int) -> None:
        """Create the collection and load the entry order (for the size bound) from it."""
        self.index.ensure_collection(dim)
        stored = self.index.scroll(None, limit=max(10 * self.settings.max_entries, 10_000))
        with self._lock:
            for p in sorted(stored, key=lambda p: int(p.payload.get("created_ms", 0))):
                self._order[p.id] = int(p.payload.get("created_ms", 0))
            self._ready = True
            self.metrics.entries.set(len(self._order))

    @property
    def seq(self) -> int:
        """The invalidation sequence number; take it before retrieving, hand it to `store`."""
        with self._lock:
            return self._seq

    def lookup(
        self, vector: npt.NDArray[np.float32], tenant: str, scope: str, sources: Sequence[str] | None = None
    ) -> CachedAnswer | None:
        """The closest stored answer of this tenant and scope, if within the threshold and the TTL, and (when
        `sources` is given: the fresh retrieval's `sources_of`) built on exactly those row versions."""
        if not self._ready:
            return None
        hits = self.index.search(vector, 1, {"tenant": tenant, "scope": scope})
        if not hits or hits[0].score < self.settings.threshold:
            self.metrics.requests.labels("miss").inc()
            return None
        hit = hits[0]
        p = hit.payload
        if sources is not None and list(p.get("sources") or []) != list(sources):
            self.metrics.requests.labels("other_sources").inc()
            return None
        if self.clock() * 1000 - int(p["created_ms"]) > self.settings.ttl_s * 1000:
            try:
                self._drop([hit.id])
            except StoreUnavailable as exc:  # dropped at a later lookup; the answer is not served either way
                self._unwritable.failed(exc)
            self.metrics.requests.labels("expired").inc()
            return None
        self.metrics.requests.labels("hit").inc()
        self.metrics.saved_seconds.inc(float(p.get("generation_s", 0.0)))
        self.metrics.saved_tokens.inc(int(p.get("prompt_tokens", 0)) + int(p.get("completion_tokens", 0)))
        return CachedAnswer(
            id=hit.id,
            question=str(p["question"]),
            answer=str(p["answer"]),
            citations=json.loads(p["citations"]),
            finish_reason=str(p.get("finish_reason", "stop")),
            created_ms=int(p["created_ms"]),
            similarity=round(hit.score, 4),
            generation_s=float(p.get("generation_s", 0.0)),
            completion_tokens=int(p.get("completion_tokens", 0)),
            prompt_tokens=int(p.get("prompt_tokens", 0)),
        )

    def store(
        self,
        vector: npt.NDArray[np.float32],
        tenant: str,
        scope: str,
        since_seq: int,
        question: str,
        answer: str,
        citations: Sequence[dict[str, Any]],
        finish_reason: str,
        generation_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        sources: Sequence[str] = (),
    ) -> bool:
        """Keep an answer, unless a row it used changed since `since_seq` (then it may already be stale)."""
        if not self._ready:
            return False
        rows = frozenset(row_key(str(c["table"]), str(c["row_id"])) for c in citations)
        tables = frozenset(str(c["table"]) for c in citations)
        with self._lock:
            for seq, changed_rows, changed_tables in reversed(self._recent):
                if seq <= since_seq:
                    break
                if rows & changed_rows or tables & changed_tables:
                    log.info("not caching an answer: a row it used changed while it was generated")
                    return False
        created = int(self.clock() * 1000)
        point_id = str(uuid.uuid4())
        payload = {
            "tenant": tenant,
            "scope": scope,
            "question": question,
            "answer": answer,
            "citations": json.dumps(list(citations), default=str),
            "rows": sorted(rows) or ["-"],
            "sources": list(sources),
            "tables": sorted(tables) or ["-"],
            "finish_reason": finish_reason,
            "created_ms": created,
            "generation_s": round(generation_s, 4),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        try:
            self.index.upsert([IndexPoint(point_id, vector, payload)])
        except StoreUnavailable as exc:  # caching is best effort: the answer was served, only not remembered
            self._unwritable.failed(exc)
            return False
        with self._lock:
            self._order[point_id] = created
            overflow = [self._order.popitem(last=False)[0] for _ in range(len(self._order) - self.settings.max_entries)]
            self.metrics.entries.set(len(self._order))
        if overflow:
            self.index.delete(overflow)
        if not self.sole_writer:
            self._bound_shared()
        return True

    def _bound_shared(self) -> None:
        """Other retrievers store in the same collection: the bound counts the store's entries, not this process'
        own, and drops the oldest of all of them."""
        try:
            total = self.index.count()
            if total <= self.settings.max_entries:
                return
            stored = self.index.scroll(None, limit=total + 1_000)
            stored.sort(key=lambda p: int(p.payload.get("created_ms", 0)))
            self._drop([p.id for p in stored[: len(stored) - self.settings.max_entries]])
        except StoreUnavailable as exc:  # the next store trims
            self._unwritable.failed(exc)

    def invalidate(self, rows: Iterable[str], tables: Iterable[str] = ()) -> int:
        """Drop every answer that used one of `rows` (table:row keys) or any row of `tables`; returns how many."""
        rows, tables = frozenset(rows), frozenset(tables)
        if not rows and not tables:
            return 0
        with self._lock:
            self._seq += 1
            self._recent.append((self._seq, rows, tables))
            nothing_cached = self.sole_writer and not self._order
        if nothing_cached or not self._ready:
            return 0
        doomed: set[str] = set()
        if rows:
            doomed.update(p.id for p in self.index.scroll({"rows": sorted(rows)}, limit=100_000))
        if tables:
            doomed.update(p.id for p in self.index.scroll({"tables": sorted(tables)}, limit=100_000))
        self._drop(sorted(doomed))
        self.metrics.invalidated.inc(len(doomed))
        return len(doomed)

    def invalidate_events(self, events: Sequence[ChangeEvent]) -> int:
        """What the embedder calls for an applied batch."""
        rows = {row_key(ev.table, ev.row_id) for ev in events if ev.op is not Op.TRUNCATE}
        tables = {ev.table for ev in events if ev.op is Op.TRUNCATE}
        return self.invalidate(rows, tables)

    def clear(self) -> int:
        """Drop everything, also what other processes stored (`POST /v1/admin/cache/clear`: a benchmark's clean
        start, or after a prompt change); returns how many answers were dropped."""
        with self._lock:
            ids = set(self._order)
            self._order.clear()
            self._seq += 1
        if not self.sole_writer:
            ids.update(p.id for p in self.index.scroll(None, limit=10 * self.settings.max_entries + 10_000))
        if ids:
            self.index.delete(sorted(ids))
        self.metrics.entries.set(0)
        return len(ids)

    def _drop(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        self.index.delete(ids)
        with self._lock:
            for i in ids:
                self._order.pop(i, None)
            self.metrics.entries.set(len(self._order))

    def stats(self) -> dict[str, Any]:
        """Counters since start: lookups by result, hit rate, invalidations, what hits saved, entries."""
        m = self.metrics
        results = {s.labels["result"]: s.value for s in _totals(m.requests)}
        lookups = sum(results.values())
        return {
            "hits": int(results.get("hit", 0)),
            "misses": int(results.get("miss", 0) + results.get("expired", 0) + results.get("other_sources", 0)),
            "refused_other_sources": int(results.get("other_sources", 0)),
            "hit_rate": round(results.get("hit", 0) / lookups, 4) if lookups else None,
            "invalidations": int(sum(s.value for s in _totals(m.invalidated))),
            "saved_seconds": round(sum(s.value for s in _totals(m.saved_seconds)), 3),
            "saved_tokens": int(sum(s.value for s in _totals(m.saved_tokens))),
            "entries": len(self),
        }

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def close(self) -> None:
        """Release the collection."""
        self.index.close()


class InvalidatingApplier:
    """Wraps the embedder's writer: apply the batch, then drop the cached answers it made stale, before the
    batch is acknowledged and reported searchable."""

    def __init__(self, inner: Applier, cache: SemanticCache) -> None:
        self.inner = inner
        self.cache = cache

    def apply(self, events: Sequence[ChangeEvent]) -> ApplyStats:
        """Write, then invalidate (also for events the writer found stale: being conservative is cheap)."""
        stats = self.inner.apply(events)
        self.cache.invalidate_events(events)
        return stats


def build_cache(
    settings: RagtideSettings, registry: CollectorRegistry, dim: int, sole_writer: bool = True
) -> SemanticCache | None:
    """The configured cache (collection `<collection>-cache` in the configured store), ready; None when off."""
    if not settings.cache.enabled:
        return None
    from ragtide.embedder.index.factory import open_index

    cache = SemanticCache(
        open_index(settings, f"{settings.index.collection}-cache"), settings.cache, registry, sole_writer
    )
    cache.ensure(dim)
    return cache
