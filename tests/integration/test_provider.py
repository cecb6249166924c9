"""`encoder.backend: openai` against a real OpenAI-compatible server, ragtide's own `serve-embeddings` (the
packaged model, in a process of its own), through a proxy that injects provider faults: 429 with Retry-After,
500, a response past the client's timeout, a short vector list, an outage, a refused input. Nothing is lost: the
request or the batch is retried, the metrics count it, and only the refused row goes to the dead-letter list."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ragtide.compose import build_encoder
from ragtide.contracts.errors import ProviderUnavailable
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import ProviderSettings, RagtideSettings, load_settings
from ragtide.embedder.chunking import Chunker
from ragtide.embedder.generations import GenerationSpec
from ragtide.embedder.index.edge import EdgeIndex
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.provider import OpenAIEmbeddingsEncoder
from ragtide.embedder.worker import BatchProcessor
from ragtide.embedder.writer import IndexWriter
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import MemoryGatewayStore
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from tests.providers import MODEL, FaultProxy, embeddings_server

SOURCES = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})
TEXTS = [f"Document {i}: how to rotate the credentials of service {i} without downtime." for i in range(40)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with embeddings_server(tmp_path_factory.mktemp("provider")) as url:
        yield url


@pytest.fixture
def proxy(upstream: str) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream, slow_s=8.0, refuse="POISON")
    yield p
    p.close()


def provider(
    proxy: FaultProxy, registry: CollectorRegistry | None = None, **overrides: object
) -> OpenAIEmbeddingsEncoder:
    settings = {"url": proxy.url, "model": MODEL, "timeout_s": 4.0, "backoff_s": 0.05, "batch_size": 16, **overrides}
    return OpenAIEmbeddingsEncoder(ProviderSettings.model_validate(settings), registry)


def rows(first: int, n: int, what: str) -> list[ChangeEvent]:
    return [
        ChangeEvent("public.docs", Op.CREATE, {"id": i}, {"id": i, "body": f"{what} row {i}"}, SourcePosition(i, 1))
        for i in range(first, first + n)
    ]


def test_faults_are_retried_and_the_vectors_are_the_models(proxy: FaultProxy) -> None:
    registry = CollectorRegistry()
    enc = provider(proxy, registry, retries=5)
    # The same model, in this process, in the precision serve-embeddings runs it in under auto (float, on any CPU).
    local = build_encoder(load_settings(RagtideSettings), precision="float")
    assert enc.dim == local.dim == 384 and enc.provider == f"openai:{proxy.url.split('/')[2]}"
    proxy.faults = ["429", "500", "slow", "short"]
    got = enc.encode(TEXTS)  # three requests of at most 16 texts: the faults land on them in turn
    want = local.encode(TEXTS)
    assert np.min(np.sum(got * want, axis=1)) > 0.999
    assert proxy.seen == {"429": 1, "500": 1, "slow": 1, "short": 1}
    labels = {"provider": enc.provider, "model": MODEL}
    for reason in ("429", "5xx", "timeout", "short"):  # at least the injected one (a loaded CPU may add timeouts)
        retried = registry.get_sample_value("ragtide_provider_retries_total", {**labels, "reason": reason})
        assert retried is not None and retried >= 1
    assert registry.get_sample_value("ragtide_provider_texts_total", labels) == len(TEXTS) + 2  # and the probe
    tokens = registry.get_sample_value("ragtide_provider_tokens_total", labels)
    assert tokens is not None and tokens > len(TEXTS) * 10  # the server's usage report


def test_an_outage_loses_nothing_search_says_503_and_only_a_refused_row_is_dead_lettered(
    proxy: FaultProxy, tmp_path: Path
) -> None:
    enc = provider(proxy, retries=1, breaker_failures=3, breaker_reset_s=1.0)
    index = EdgeIndex(tmp_path, "docs")
    index.ensure_collection(enc.dim)
    registry = CollectorRegistry()
    writer = IndexWriter(index, enc, Chunker(enc.tokenizer, 200, 32), SOURCES, usd_per_million_tokens=20.0)
    proc = BatchProcessor(writer, EmbedderMetrics(registry), "ragtide")
    settings = load_settings(RagtideSettings, canary={"enabled": False})
    app = create_app(settings, index, enc, SOURCES, gateway=Gateway(settings.gateway, MemoryGatewayStore()))

    async def outage(api: TestClient) -> None:
        assert await proc.apply(rows(1, 20, "before the outage")) == []
        proxy.down = True
        batch = asyncio.create_task(proc.apply(rows(21, 20, "during the outage")))
        down_at = time.monotonic()
        while time.monotonic() - down_at < 8:
            await asyncio.sleep(1.0)
            resp = await asyncio.to_thread(api.post, "/v1/search", json={"query": "a fresh query", "k": 3})
            assert resp.status_code == 503 and resp.headers["retry-after"], resp.text
            assert not batch.done()  # nothing acknowledged while the provider is away
        proxy.down = False
        assert await asyncio.wait_for(batch, timeout=60) == []
        poisoned = rows(41, 5, "after the outage")
        poisoned[2] = ChangeEvent(
            "public.docs", Op.CREATE, {"id": 43}, {"id": 43, "body": "POISON"}, SourcePosition(43, 1)
        )
        dead = await proc.apply(poisoned)
        assert [(ev.row_id, "cannot be embedded" in reason) for ev, reason in dead] == [(poisoned[2].row_id, True)]

    with TestClient(app, raise_server_exceptions=False) as api:
        asyncio.run(outage(api))
        resp = api.post("/v1/search", json={"query": "row during the outage", "k": 3})
        assert resp.status_code == 200 and "during the outage" in resp.json()["hits"][0]["text"]
        assert index.count({"chunk_no": 0}) == 44 and proxy.seen["down"] > 3 and proxy.seen["refused"] >= 1
    retries = registry.get_sample_value("ragtide_store_retries_total")
    assert retries is not None and retries >= 2
    tokens = registry.get_sample_value("ragtide_embed_tokens_total", {"table": "public.docs"})
    cost = registry.get_sample_value("ragtide_embed_cost_usd_total", {"table": "public.docs"})
    assert tokens is not None and tokens > 44 * 3 and cost == pytest.approx(tokens * 20.0 / 1e6)


def test_an_older_generations_provider_is_reached_as_it_was_built_and_the_key_stays_home(proxy: FaultProxy) -> None:
    here = proxy.url.split("/")[2]
    configured = {"url": proxy.url, "model": MODEL, "api_key": "sk-current", "provider": "tei-prod"}
    settings = load_settings(RagtideSettings, encoder={"backend": "openai", "api": configured})
    base = GenerationSpec(model=MODEL, dim=384, max_tokens=200, overlap=32)

    # The configured provider, renamed since (its old generation keeps its old name) but moved nowhere: it
    # is another provider now, reached where it was built, without the configured key.
    old = build_encoder(settings, replace(base, provider=f"openai:{here}", url=proxy.url, encoding_format="float"))
    assert old.provider == f"openai:{here}" and proxy.keys[-1] is None
    assert proxy.formats[-1] == "float"  # its requests shaped as when it was built, not as configured now
    keyed = {**configured, "keys": {here: "sk-old"}}  # unless its own key is given, by its name
    settings_with_keys = load_settings(RagtideSettings, encoder={"backend": "openai", "api": keyed})
    build_encoder(settings_with_keys, replace(base, provider=f"openai:{here}", url=proxy.url))
    assert proxy.keys[-1] == "Bearer sk-old"

    # The configured provider, which has moved: reached at its configured address, with its key.
    moved = build_encoder(settings, replace(base, provider="openai:tei-prod", url="http://127.0.0.1:9/v1"))
    assert moved.provider == "openai:tei-prod" and proxy.keys[-1] == "Bearer sk-current"


def test_search_s_encoder_fails_fast_on_a_rate_limit_instead_of_waiting_it_out(proxy: FaultProxy) -> None:
    configured = {"url": proxy.url, "model": MODEL, "retries": 4, "max_retry_after_s": 60}
    settings = load_settings(RagtideSettings, encoder={"backend": "openai", "api": configured})
    search = build_encoder(settings, queries=True)
    proxy.faults = ["429"] * 3  # each with Retry-After: 1
    with pytest.raises(ProviderUnavailable, match="after 2 attempt"):
        search.encode(["a query"])
    assert proxy.seen["429"] == 2  # one short retry (Retry-After capped at 0.5 s), not four waits of a second
    proxy.faults = []
    assert search.encode(["a query"]).shape == (1, 384)
