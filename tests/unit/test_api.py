"""The retrieval API over the in-memory index and the hash encoder: shapes, filters and clear 4xx errors."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ragtide.contracts.errors import ClientError, StoreUnavailable
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.writer import IndexWriter
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import MemoryGatewayStore
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from tests.doubles import HashEncoder, word_chunker

SOURCES = SourcesConfig.model_validate(
    {"sources": [{"table": "public.docs", "key": ["id"], "text": "{title} {body}", "metadata": ["category"]}]}
)
ROWS = [
    (1, "Exceptions", "try except finally catches errors raised by code", "statements"),
    (2, "Loops", "for loops iterate over every item of a sequence", "statements"),
    (3, "Numbers", "integers floats and complex numbers support arithmetic", "expressions"),
]


@pytest.fixture
def client() -> Iterator[TestClient]:
    index, encoder = MemoryIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(50, 5), SOURCES)
    writer.apply(
        [
            ChangeEvent(
                "public.docs",
                Op.CREATE,
                {"id": i},
                {"id": i, "title": t, "body": b, "category": c},
                SourcePosition(i, 1_700_000_000_000),
            )
            for i, t, b, c in ROWS
        ]
    )
    settings = load_settings(RagtideSettings, api={"max_k": 20}, canary={"enabled": False})
    app = create_app(settings, index, encoder, SOURCES, gateway=Gateway(settings.gateway, MemoryGatewayStore()))
    with TestClient(app) as c:
        yield c


def search(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/search", json=body)


def test_search_returns_ranked_hits_with_provenance(client: TestClient) -> None:
    resp = search(client, query="for loops over a sequence", k=2)
    assert resp.status_code == 200
    body = resp.json()
    assert body["k"] == 2 and len(body["hits"]) == 2
    top = body["hits"][0]
    assert top["row_id"] == "2" and top["table"] == "public.docs" and top["key"] == {"id": 2}
    assert top["metadata"] == {"category": "statements"}
    assert top["source_commit_ts"].startswith("2023-11-14") and top["age_s"] > 0
    assert body["hits"][0]["score"] >= body["hits"][1]["score"]


def test_filter_on_metadata_and_table(client: TestClient) -> None:
    hits = search(client, query="numbers", k=5, filter={"category": "statements"}).json()["hits"]
    assert {h["row_id"] for h in hits} == {"1", "2"}
    hits = search(client, query="numbers", k=5, filter={"category": ["expressions"], "table": "public.docs"}).json()
    assert [h["row_id"] for h in hits["hits"]] == ["3"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"query": ""}, "query"),
        ({"query": "  \x00\x01 "}, "control characters"),
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "k": 21}, "at most 20"),
        ({"query": "x", "filter": {"colour": "red"}}, "unknown field 'colour'"),
        ({"query": "x", "filter": {"category": []}}, "empty list"),
        ({"query": "x", "filter": {"category": {"a": 1}}}, "filter"),
        ({"query": "x", "extra": 1}, "extra"),
        ({"query": "x" * 2001}, "query"),
        ({}, "query"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(client: TestClient, body: dict[str, Any], needle: str) -> None:
    resp = search(client, **body)
    assert resp.status_code == 422
    assert needle in resp.text


def test_malformed_json_is_a_4xx(client: TestClient) -> None:
    resp = client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422


def test_health_ready_stats_metrics_docs(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    stats = client.get("/v1/index/stats").json()
    assert stats["tables"]["public.docs"] == {"rows": 3, "chunks": 3}
    search(client, query="loops")
    assert "ragtide_request_seconds_count" in client.get("/metrics").text
    assert client.get("/openapi.json").json()["paths"]["/v1/search"]
    assert client.get("/docs").status_code == 200


def test_readyz_without_freshness_ignores_only_the_canary(client: TestClient) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    services.canary = SimpleNamespace(readiness=lambda: (False, "freshness 12.00s exceeds 10.00s"))
    stale = client.get("/readyz")
    assert stale.status_code == 503 and "exceeds" in stale.json()["checks"]["canary"]
    serving = client.get("/readyz", params={"freshness": "false"})
    assert serving.status_code == 200 and "exceeds" in serving.json()["checks"]["canary"]

    def broken(*_: Any, **__: Any) -> int:
        raise ConnectionError("store down")

    services.active.index.count = broken
    assert client.get("/readyz", params={"freshness": "false"}).status_code == 503


def test_readyz_is_503_when_the_index_fails(client: TestClient) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]

    def broken(*_: Any, **__: Any) -> int:
        raise ConnectionError("store down")

    services.active.index.count = broken
    resp = client.get("/readyz")
    assert resp.status_code == 503 and "store down" in resp.text


class BrokenIndex(MemoryIndex):
    """Search raises what `error` says: an internal bug, a store outage, or a client mistake found deep inside."""

    error: Exception = ValueError("corrupt payload in the index")

    def search(self, vector: Any, k: int, flt: Any = None) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "detail"),
    [
        (ValueError("corrupt payload in the index"), 500, "internal error (ValueError)"),
        (StoreUnavailable("Qdrant server at http://127.0.0.1:6333: unreachable"), 503, "unreachable"),
        (ClientError("filter value for 'category' must be a string"), 422, "must be a string"),
    ],
)
def test_internal_errors_are_5xx_that_count_and_only_client_mistakes_are_422(
    error: Exception, status: int, detail: str
) -> None:
    """Before, any ValueError became a 422 'client mistake', a corrupt cached answer included."""
    index, encoder = BrokenIndex(), HashEncoder()
    index.error = error
    index.ensure_collection(encoder.dim)
    settings = load_settings(RagtideSettings, canary={"enabled": False})
    app = create_app(settings, index, encoder, SOURCES, gateway=Gateway(settings.gateway, MemoryGatewayStore()))
    with TestClient(app, raise_server_exceptions=False) as c:
        resp = search(c, query="loops")
        assert resp.status_code == status and detail in resp.json()["detail"]
        if status == 503:
            assert resp.headers["retry-after"] == "5"
        internal = c.get("/metrics").text
        assert ('ragtide_http_internal_errors_total{exception="ValueError"} 1.0' in internal) == (status == 500)
