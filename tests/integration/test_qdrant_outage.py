"""The store unavailable for 30 s on the qdrant-client path, against a real Qdrant server (built from source by
infra/scripts/build-qdrant.sh): the worker's batch is retried with nothing acknowledged and health says
'degraded'; search answers 503 with Retry-After, not 500; when the server is back (restarted on its own storage,
recovering from its WAL) the batch goes in and search answers again, with every row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from qdrant_client import QdrantClient

from ragtide.compose import build_encoder
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.embedder.chunking import Chunker
from ragtide.embedder.index.remote import QdrantClientIndex
from ragtide.embedder.liveness import Watchdog
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.worker import BatchProcessor
from ragtide.embedder.writer import IndexWriter
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import MemoryGatewayStore
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from ragtide.stack.process import Daemon, free_port
from ragtide.stack.qdrant import QDRANT_VERSION, QdrantServer, qdrant_binary

SOURCES = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})
OUTAGE_S = 30.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[QdrantServer]:
    if qdrant_binary() is None:
        pytest.skip(f"no Qdrant {QDRANT_VERSION} build: run `make qdrant` once (about 45 minutes on 2 cores)")
    daemon = Daemon("qdrant", tmp_path / "run", tmp_path / "logs")
    qdrant = QdrantServer(daemon, tmp_path / "qdrant", free_port(), free_port())
    qdrant.start()
    try:
        yield qdrant
    finally:
        daemon.stop()


def rows(first: int, n: int, what: str) -> list[ChangeEvent]:
    return [
        ChangeEvent("public.docs", Op.CREATE, {"id": i}, {"id": i, "body": f"{what} row {i}"}, SourcePosition(i, 1))
        for i in range(first, first + n)
    ]


def test_a_qdrant_server_down_for_30_s_loses_nothing_and_search_says_503(server: QdrantServer) -> None:
    client = QdrantClient(url=server.url, timeout=5, check_compatibility=False)
    index = QdrantClientIndex(client, "docs")
    settings = load_settings(RagtideSettings, canary={"enabled": False})
    encoder = build_encoder(settings)  # the engine on the packaged model
    index.ensure_collection(encoder.dim)
    registry = CollectorRegistry()
    chunker = Chunker(encoder.tokenizer, 200, 32)
    proc = BatchProcessor(IndexWriter(index, encoder, chunker, SOURCES), EmbedderMetrics(registry), "ragtide")
    dog = Watchdog(stall_s=120, degraded_s=10)
    dog.outage = proc.outage
    app = create_app(settings, index, encoder, SOURCES, gateway=Gateway(settings.gateway, MemoryGatewayStore()))

    async def outage(api: TestClient) -> None:
        assert await proc.apply(rows(1, 20, "before the outage")) == []
        server.daemon.stop(timeout=5)  # SIGTERM; SIGKILL after 5 s
        down_at = time.monotonic()
        batch = asyncio.create_task(proc.apply(rows(21, 20, "during the outage")))
        while time.monotonic() - down_at < OUTAGE_S:
            await asyncio.sleep(1.0)
            resp = await asyncio.to_thread(api.post, "/v1/search", json={"query": "outage row", "k": 3})
            assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text
            assert not batch.done()  # nothing acknowledged while the store is away
        verdict = dog.verdict()
        assert verdict.ok and verdict.degraded and "Qdrant collection docs: unreachable" in verdict.reason
        await asyncio.to_thread(server.start)  # the same storage: Qdrant recovers from its WAL
        assert await asyncio.wait_for(batch, timeout=120) == []
        resp = await asyncio.to_thread(api.post, "/v1/search", json={"query": "row during the outage", "k": 3})
        assert resp.status_code == 200 and "during the outage" in resp.json()["hits"][0]["text"]
        assert index.count({"chunk_no": 0}) == 40

    with TestClient(app, raise_server_exceptions=False) as api:  # started while the server is up
        asyncio.run(outage(api))
    retries = registry.get_sample_value("ragtide_store_retries_total")
    assert retries is not None and retries > 3
    assert registry.get_sample_value("ragtide_store_outage_seconds") == 0
