"""/v1/answer and /v1/chat/completions through the gateway, over the in-memory index, the hash encoder and the
echo generator: citations, SSE order, 503s, tenant isolation, keys, limits, quota headers, input hygiene."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import CacheSettings, RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.writer import IndexWriter
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import MemoryGatewayStore, new_key
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from ragtide.retriever.cache import SemanticCache
from tests.doubles import EchoGenerator, HashEncoder, word_chunker

SOURCES = SourcesConfig.model_validate(
    {
        "sources": [
            {"table": "public.docs", "key": ["id"], "text": "{body}"},
            {"table": "public.tickets", "key": ["id"], "text": "{body}", "tenant_column": "org"},
        ]
    }
)
ADMIN = "9e2f4a6b8d0c1e3f3f9c1a7b5e2d4c6a8b0f1e3d5c7a9b2e4f6a8c0e1d3b5a7c"


def event(table: str, i: int, body: str, org: str | None = None) -> ChangeEvent:
    row: dict[str, Any] = {"id": i, "body": body} | ({"org": org} if org else {})
    return ChangeEvent(table, Op.CREATE, {"id": i}, row, SourcePosition(i, 1_700_000_000_000))


class Api:
    def __init__(
        self,
        client: TestClient,
        store: MemoryGatewayStore,
        generator: EchoGenerator,
        writer: IndexWriter,
        cache: SemanticCache | None,
    ) -> None:
        self.client, self.store, self.generator = client, store, generator
        self.writer, self.cache = writer, cache

    def key(self, tenant: str, **kw: Any) -> dict[str, str]:
        key, record = new_key(tenant, **kw)
        self.store.add_key(record)
        return {"Authorization": f"Bearer {key}"}


def make_api(generator: EchoGenerator, /, cache: CacheSettings | None = None, **settings: Any) -> Iterator[Api]:
    index, encoder = MemoryIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(50, 5), SOURCES)
    writer.apply(
        [
            event("public.docs", 1, "kafka topics are partitioned logs of records"),
            event("public.docs", 2, "postgres replication slots keep the write ahead log"),
            event("public.tickets", 10, "kafka consumer lag alert for acme billing", org="acme"),
            event("public.tickets", 11, "kafka consumer lag alert for globex payroll", org="globex"),
        ]
    )
    store = MemoryGatewayStore()
    gateway = {"admin_key": ADMIN, "key_cache_s": 0, **settings.pop("gateway", {})}
    s = load_settings(RagtideSettings, canary={"enabled": False}, gateway=gateway, **settings)
    semantic = None
    if cache is not None:
        semantic = SemanticCache(MemoryIndex(), cache, CollectorRegistry())
        semantic.ensure(encoder.dim)
    app = create_app(s, index, encoder, SOURCES, gateway=Gateway(s.gateway, store), generator=generator, cache=semantic)
    with TestClient(app) as client:
        yield Api(client, store, generator, writer, semantic)


@pytest.fixture
def api() -> Iterator[Api]:
    yield from make_api(EchoGenerator())


def sse_events(text: str) -> list[tuple[str | None, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        assert data is not None, block
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def test_answer_cites_numbered_sources_with_their_age(api: Api) -> None:
    resp = api.client.post("/v1/answer", json={"query": "how are kafka topics stored", "k": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["answer"] == "According to [1]."
    first = body["citations"][0]
    assert [c["n"] for c in body["citations"]] == [1, 2]
    assert first["table"] == "public.docs" and first["key"] == {"id": 1} and first["cited"] is True
    assert body["citations"][1]["cited"] is False
    assert first["age_s"] > 0 and first["source_commit_ts"].startswith("2023-11-14")
    assert body["usage"]["completion_tokens"] == 3 and body["usage"]["total_tokens"] > 3
    prompt = api.generator.calls[0][-1].content
    assert '<source id="1" table="public.docs" key="id=1">' in prompt and "kafka topics" in prompt
    metrics = api.client.get("/metrics").text
    assert 'ragtide_answer_ttft_seconds_count{endpoint="answer"} 1.0' in metrics
    assert 'ragtide_answer_tokens_total{kind="completion",tenant="anonymous"} 3.0' in metrics


def test_streamed_answer_sends_citations_first_then_tokens_then_done(api: Api) -> None:
    resp = api.client.post("/v1/answer", json={"query": "kafka topics", "k": 1, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert [e[0] for e in events] == ["citations", "token", "token", "token", "done"]
    assert events[0][1]["citations"][0]["key"] == {"id": 1}
    assert "".join(e[1]["text"] for e in events if e[0] == "token") == "According to [1]. "
    assert events[-1][1]["cited"] == [1] and events[-1][1]["finish_reason"] == "stop"


def test_a_generator_that_breaks_mid_answer_ends_each_stream_in_its_shape_and_is_charged() -> None:
    """Both routes, one token in: /v1/answer sends an error event, then done; chat completions ends with a chunk
    whose finish_reason is "error", then [DONE]. The tokens used so far are charged; nothing is cached."""
    for api in make_api(EchoGenerator(break_after=1), cache=CacheSettings(threshold=0.99)):
        headers = api.key("acme")
        resp = api.client.post("/v1/answer", json={"query": "kafka topics", "stream": True}, headers=headers)
        events = sse_events(resp.text)
        assert [e[0] for e in events] == ["citations", "token", "error", "done"], events
        assert "connection reset by the generator" in events[2][1]["detail"]
        assert events[-1][1]["usage"]["completion_tokens"] == 1
        chat = {"messages": [{"role": "user", "content": "kafka topics"}], "stream": True}
        events = sse_events(api.client.post("/v1/chat/completions", json=chat, headers=headers).text)
        assert events[0][1]["choices"][0]["delta"] == {"role": "assistant"}
        assert [e[1]["choices"][0]["delta"].get("content") for e in events[1:2]] == ["According "]
        assert events[-2][1]["choices"][0]["finish_reason"] == "error" and events[-1][1] == "[DONE]"
        assert api.store.usage("acme", next(iter(api.store.used))[1]) > 0  # both charged
        assert api.cache is not None and len(api.cache) == 0  # a broken answer is never replayed


def test_no_generator_is_a_503_with_the_reason_and_search_still_works() -> None:
    for api in make_api(EchoGenerator(fail="connection refused by gen:8000")):
        for stream in (False, True):
            resp = api.client.post("/v1/answer", json={"query": "kafka", "stream": stream})
            assert resp.status_code == 503 and "connection refused by gen:8000" in resp.json()["detail"]
        for stream in (False, True):  # the OpenAI-compatible route answers in OpenAI's error shape
            ask = {"messages": [{"role": "user", "content": "kafka"}], "stream": stream}
            resp = api.client.post("/v1/chat/completions", json=ask)
            error = resp.json()["error"]
            assert resp.status_code == 503 and error["type"] == "server_error", resp.text
            assert "connection refused by gen:8000" in error["message"] == resp.json()["detail"]
        assert api.client.post("/v1/search", json={"query": "kafka"}).status_code == 200


def test_the_real_client_against_nothing_is_a_503_not_a_hang() -> None:
    from ragtide.stack.process import free_port

    settings = load_settings(
        RagtideSettings,
        canary={"enabled": False},
        generator={"port": free_port(), "retries": 1, "backoff_s": 0},
    )
    index, encoder = MemoryIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    app = create_app(settings, index, encoder, SOURCES, gateway=Gateway(settings.gateway, MemoryGatewayStore()))
    with TestClient(app) as client:
        resp = client.post("/v1/answer", json={"query": "kafka"})
        assert resp.status_code == 503 and "cannot reach http://127.0.0.1:" in resp.json()["detail"]


def test_a_tenant_never_retrieves_or_is_answered_from_another_tenants_rows(api: Api) -> None:
    acme = api.key("acme")
    hits = api.client.post("/v1/search", json={"query": "kafka consumer lag alert", "k": 10}, headers=acme).json()
    assert {(h["table"], h["row_id"]) for h in hits["hits"]} == {
        ("public.tickets", "10"),
        ("public.docs", "1"),
        ("public.docs", "2"),
    }
    answer = api.client.post("/v1/answer", json={"query": "globex payroll lag", "k": 10}, headers=acme).json()
    assert all(c["key"] != {"id": 11} for c in answer["citations"])
    assert "globex payroll\n" not in api.generator.calls[-1][-1].content  # the row text never reaches the prompt
    chat = api.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "globex payroll"}]}, headers=acme
    ).json()
    assert all(c["key"] != {"id": 11} for c in chat["citations"])
    # tenant is not a filter a caller can set, and a table filter cannot widen the scope
    resp = api.client.post("/v1/search", json={"query": "x", "filter": {"tenant": "globex"}}, headers=acme)
    assert resp.status_code == 422
    only = {"query": "globex payroll", "filter": {"table": "public.tickets"}, "k": 10}
    hits = api.client.post("/v1/search", json=only, headers=acme).json()["hits"]
    assert [h["row_id"] for h in hits] == ["10"]
    # without a key (dev mode) every tenant is visible
    everyone = api.client.post("/v1/search", json=only).json()["hits"]
    assert {h["row_id"] for h in everyone} == {"10", "11"}


def test_keys_limits_and_quota_headers(api: Api) -> None:
    wrong = {"Authorization": "Bearer rtk_000000000000_" + "A" * 43}  # a ragtide key's shape: 401 even in dev mode
    assert api.client.post("/v1/search", json={"query": "x"}, headers=wrong).status_code == 401
    limited = api.key("acme", rate_per_s=0.01, burst=2)
    for remaining in ("1", "0"):
        resp = api.client.post("/v1/search", json={"query": "kafka"}, headers=limited)
        assert resp.status_code == 200 and resp.headers["X-RateLimit-Remaining"] == remaining
        assert int(resp.headers["X-Quota-Remaining"]) < 1_000_000
    resp = api.client.post("/v1/search", json={"query": "kafka"}, headers=limited)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1 and "rate limit" in resp.text

    api.store.set_quota("initech", 10)
    key = api.key("initech")
    first = api.client.post("/v1/answer", json={"query": "kafka topics"}, headers=key)
    assert first.status_code == 200 and first.headers["X-Quota-Limit"] == "10"
    over = api.client.post("/v1/answer", json={"query": "kafka topics"}, headers=key)
    assert over.status_code == 429 and "quota" in over.json()["detail"] and over.headers["Retry-After"]
    assert api.store.usage("initech", next(iter(api.store.used))[1]) >= first.json()["usage"]["total_tokens"]


def test_admin_endpoints_need_the_admin_key_in_prod() -> None:
    for api in make_api(EchoGenerator(), gateway={"mode": "prod"}):
        assert api.client.post("/v1/search", json={"query": "kafka"}).status_code == 401
        assert api.client.post("/v1/answer", json={"query": "kafka"}).status_code == 401
        ok = api.client.post("/v1/search", json={"query": "kafka"}, headers={"X-API-Key": ADMIN})
        assert ok.status_code == 200 and len(ok.json()["hits"]) == 4  # the admin sees every tenant


def test_chat_completions_is_openai_shaped_and_streams(api: Api) -> None:
    body = {
        "model": "anything",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is a replication slot?"},
            {"role": "assistant", "content": "a postgres thing"},
            {"role": "user", "content": "how does postgres keep the write ahead log?"},
        ],
        "temperature": 0,
        "top_p": 1,
    }
    resp = api.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == "According to [1]."
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert out["citations"][0]["key"] == {"id": 2}
    sent = api.generator.calls[-1]
    assert [m.role for m in sent] == ["system", "system", "user", "assistant", "user"]
    assert "Question: how does postgres keep the write ahead log?" in sent[-1].content

    stream = api.client.post("/v1/chat/completions", json={**body, "stream": True})
    events = sse_events(stream.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [e[1] for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"} and chunks[0]["citations"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "According to [1]. "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/answer", {"query": "x", "max_tokens": 5000}, 422, "max_tokens: must be at most 1024"),
        ("/v1/answer", {"query": "\x00\x07"}, 422, "control characters"),
        ("/v1/answer", {"query": "x", "k": 51}, 422, "k"),
        ("/v1/answer", {"query": "x", "stream": "yes"}, 422, "stream"),
        ("/v1/chat/completions", {"messages": []}, 422, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 422, "user message"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, 422, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 422, "n"),
        (  # found by schemathesis: a limit within bounds let the other one past them
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5, "max_tokens": 5000},
            422,
            "max_tokens: must be at most 1024",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000, "max_tokens": 5},
            422,
            "max_completion_tokens: must be at most 1024",
        ),
        ("/v1/answer", {"query": "x" * 70_000}, 413, "larger than 65536 bytes"),
    ],
)
def test_bad_answer_requests_get_a_4xx_that_says_what_is_wrong(
    api: Api, path: str, body: dict[str, Any], status: int, needle: str
) -> None:
    resp = api.client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert needle in resp.text


def test_serving_snapshot_has_percentiles_per_endpoint_and_totals(api: Api) -> None:
    for _ in range(3):
        api.client.post("/v1/search", json={"query": "kafka"})
    api.client.post("/v1/answer", json={"query": "kafka", "stream": True})
    snap = api.client.get("/v1/serving", params={"window_s": 60}).json()
    assert snap["latency"]["search"]["count"] == 3 and snap["latency"]["search"]["p99"] > 0
    assert snap["latency"]["answer"]["count"] == 1 and snap["ttft"]["answer"]["count"] == 1
    assert snap["itl"]["answer"]["count"] == 2  # three tokens, two gaps
    assert snap["totals"]["completion_tokens"] == 3 and snap["totals"]["prompt_tokens"] > 0
    assert snap["generator"] == {
        "configured": True,
        "model": "echo",
        "url": None,
        "circuit": "closed",
        "last_error": "",
    }
    assert api.client.get("/v1/serving", params={"window_s": 0}).status_code == 422


def test_a_configured_default_past_the_limit_is_refused_not_generated() -> None:
    """A request that sets no length gets generator.max_tokens; one configured past max_tokens_limit is a 422,
    on both routes (the limit holds whichever field, or none, the request uses)."""
    for api in make_api(EchoGenerator(), generator={"max_tokens": 2048, "max_tokens_limit": 1024}):
        for path, body in (
            ("/v1/answer", {"query": "kafka"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "kafka"}]}),
        ):
            resp = api.client.post(path, json=body)
            assert resp.status_code == 422 and "max_tokens: must be at most 1024" in resp.text, resp.text
