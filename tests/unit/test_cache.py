"""The semantic cache on the in-memory index: hits by similarity within tenant and scope, invalidation by the
rows an answer used (and by truncate), the in-flight race, TTL, size bound, restart; and through the API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import CacheSettings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.writer import ApplyStats
from ragtide.retriever.cache import InvalidatingApplier, SemanticCache
from tests.doubles import EchoGenerator
from tests.unit.test_answer import Api, make_api

DIM = 8


def vec(*weights: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(weights)] = weights
    return v / np.linalg.norm(v)


def cite(table: str, row: str) -> dict[str, Any]:
    return {"n": 1, "table": table, "key": {"id": row}, "row_id": row, "chunk_no": 0, "score": 0.9, "text": "t",
            "source_commit_ts": None, "indexed_at": None}  # fmt: skip


def make(index: MemoryIndex | None = None, clock: Callable[[], float] = time.time, **kw: Any) -> SemanticCache:
    settings = CacheSettings(threshold=0.9, **kw)
    cache = SemanticCache(index or MemoryIndex(), settings, CollectorRegistry(), clock=clock)
    cache.ensure(DIM)
    return cache


def put(cache: SemanticCache, v: np.ndarray, *rows: tuple[str, str], tenant: str = "t1", since: int = 0) -> bool:
    citations = [cite(t, r) for t, r in rows]
    return cache.store(v, tenant, "scope", since, "q?", "answer", citations, "stop", 1.5, 100, 20)


def test_hits_within_threshold_tenant_and_scope_only() -> None:
    cache = make()
    assert put(cache, vec(1, 0), ("public.docs", "1"))
    hit = cache.lookup(vec(1, 0.2), "t1", "scope")  # cosine 0.98
    assert hit is not None and hit.answer == "answer" and hit.similarity > 0.9 and hit.citations[0]["row_id"] == "1"
    assert cache.lookup(vec(1, 1), "t1", "scope") is None  # cosine 0.71: a different question
    assert cache.lookup(vec(1, 0), "t2", "scope") is None  # never across tenants
    assert cache.lookup(vec(1, 0), "t1", "other") is None  # other filter/k/model
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"], stats["saved_tokens"]) == (1, 3, 0.25, 120)


def test_a_change_to_a_row_an_answer_used_drops_it_and_nothing_else() -> None:
    cache = make()
    put(cache, vec(1, 0), ("public.docs", "1"), ("public.docs", "2"))
    put(cache, vec(0, 1), ("public.docs", "3"))
    put(cache, vec(0, 0, 1), ("public.tickets", "9"))
    assert cache.invalidate({"public.docs:2"}) == 1
    assert cache.lookup(vec(1, 0), "t1", "scope") is None
    assert cache.lookup(vec(0, 1), "t1", "scope") is not None
    truncate = ChangeEvent("public.tickets", Op.TRUNCATE, {}, None, SourcePosition(5, 1))
    assert cache.invalidate_events([truncate]) == 1  # a truncate drops every answer that used the table
    assert cache.lookup(vec(0, 0, 1), "t1", "scope") is None and len(cache) == 1


def test_an_answer_generated_across_a_change_to_its_rows_is_not_stored() -> None:
    cache = make()
    since = cache.seq  # taken before retrieval
    cache.invalidate({"public.docs:7"})  # the row changes while the answer is generated
    assert not put(cache, vec(1, 0), ("public.docs", "7"), since=since)
    assert put(cache, vec(0, 1), ("public.docs", "8"), since=since)  # unrelated rows are fine
    assert len(cache) == 1


def test_ttl_size_bound_and_restart() -> None:
    index = MemoryIndex()
    cache = make(index, max_entries=2)
    for i in range(3):
        put(cache, vec(*([0.0] * i), 1.0), ("public.docs", str(i)))
    assert len(cache) == 2 and cache.lookup(vec(1), "t1", "scope") is None  # the oldest was evicted
    reopened = make(index, max_entries=2)  # the collection survives a restart
    assert len(reopened) == 2 and reopened.lookup(vec(0, 0, 1), "t1", "scope") is not None
    now = [1_000.0]
    short = make(ttl_s=60, clock=lambda: now[0])
    put(short, vec(1), ("public.docs", "1"))
    now[0] += 59
    assert short.lookup(vec(1), "t1", "scope") is not None  # within its TTL
    now[0] += 2
    assert short.lookup(vec(1), "t1", "scope") is None and len(short) == 0


@pytest.fixture
def cached_api() -> Iterator[Api]:
    yield from make_api(EchoGenerator(), cache=CacheSettings(threshold=0.99))


def ask(api: Api, **body: Any) -> dict[str, Any]:
    resp = api.client.post("/v1/answer", json={"query": "how are kafka topics stored", "k": 2, **body})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_repeat_questions_are_answered_from_the_cache_until_a_cited_row_changes(cached_api: Api) -> None:
    api = cached_api
    first = ask(api)
    assert first["cache"] == {"hit": False, "age_s": None, "similarity": None} and len(api.generator.calls) == 1
    again = ask(api)
    assert again["cache"]["hit"] is True and again["cache"]["similarity"] >= 0.99
    assert again["answer"] == first["answer"] and len(api.generator.calls) == 1  # no generator call
    assert [c["key"] for c in again["citations"]] == [c["key"] for c in first["citations"]]
    assert again["usage"]["total_tokens"] == 0
    assert ask(api, cache=False)["cache"]["hit"] is False and len(api.generator.calls) == 2  # opt-out

    # the embedder applies a change to a cited row: through the invalidating applier, like the node
    assert api.cache is not None
    applier = InvalidatingApplier(api.writer, api.cache)
    cited = first["citations"][0]
    new_text = "kafka topics now live in tiered object storage"
    ev = ChangeEvent(cited["table"], Op.UPDATE, cited["key"], {**cited["key"], "body": new_text},
                     SourcePosition(99, 1_800_000_000_000))  # fmt: skip
    applier.apply([ev])
    fresh = ask(api)
    assert fresh["cache"]["hit"] is False and len(api.generator.calls) == 3
    assert new_text in api.generator.calls[-1][-1].content  # regenerated from the new text


def test_cached_answers_never_cross_tenants_and_stream_with_their_cache_info(cached_api: Api) -> None:
    api = cached_api
    acme, globex = api.key("acme"), api.key("globex")
    body = {"query": "kafka consumer lag alert", "k": 3}
    api.client.post("/v1/answer", json=body, headers=acme)
    assert api.client.post("/v1/answer", json=body, headers=acme).json()["cache"]["hit"] is True
    other = api.client.post("/v1/answer", json=body, headers=globex).json()
    assert other["cache"]["hit"] is False and all(c["key"] != {"id": 10} for c in other["citations"])
    streamed = api.client.post("/v1/answer", json={**body, "stream": True}, headers=globex).text
    assert '"cache":{"hit":true' in streamed.replace(" ", "")


def test_a_close_question_whose_retrieval_differs_is_not_served_the_cached_answer() -> None:
    """'What does the alpha lighthouse keep?' and '... beta lighthouse ...' embed almost alike, but retrieve
    different rows: the cached answer is about the wrong row, so it is refused (and an older version too)."""
    cache = make()
    alpha = ["public.docs:alpha@10/1000"]
    cache.store(vec(1, 0), "t1", "scope", 0, "alpha?", "a red lantern", [cite("public.docs", "alpha")], "stop",
                1.0, 10, 5, alpha)  # fmt: skip
    assert cache.lookup(vec(1, 0.05), "t1", "scope", alpha) is not None
    assert cache.lookup(vec(1, 0.05), "t1", "scope", ["public.docs:beta@11/1001"]) is None  # another row
    assert cache.lookup(vec(1, 0.05), "t1", "scope", ["public.docs:alpha@12/1002"]) is None  # a newer version
    assert cache.stats()["refused_other_sources"] == 2


class NoWriter:
    def apply(self, events: Any) -> ApplyStats:
        return ApplyStats(events=len(events))


def test_the_invalidating_applier_drops_the_answers_that_cited_a_changed_row() -> None:
    cache = make()
    put(cache, vec(1, 0), ("public.docs", "1"))
    put(cache, vec(0, 1), ("public.docs", "2"))
    change = ChangeEvent("public.docs", Op.UPDATE, {"id": "1"}, {"id": "1", "body": "x"}, SourcePosition(9, 1))
    InvalidatingApplier(NoWriter(), cache).apply([change])
    assert cache.lookup(vec(1, 0), "t1", "scope") is None  # no sources given: only invalidation can refuse it
    assert cache.lookup(vec(0, 1), "t1", "scope") is not None and len(cache) == 1


def test_a_deleted_row_drops_the_answers_that_cited_it() -> None:
    cache = make()
    put(cache, vec(1, 0), ("public.docs", "1"))
    delete = ChangeEvent("public.docs", Op.DELETE, {"id": "1"}, None, SourcePosition(9, 1))
    assert cache.invalidate_events([delete]) == 1 and len(cache) == 0


def test_an_answer_generated_across_a_truncate_of_its_table_is_not_stored() -> None:
    cache = make()
    since = cache.seq
    cache.invalidate((), {"public.docs"})
    assert not put(cache, vec(1, 0), ("public.docs", "7"), since=since)
    assert put(cache, vec(0, 1), ("public.tickets", "8"), since=since)
