"""Composition roots of the long-running processes.

The embedded Qdrant engine is single-process, so in embedded mode one process, the *node*, owns it: it runs
the Faust embedder and the retrieval API on one event loop (uvicorn drives, Faust starts from the API's
lifespan). With QDRANT_URL set, `ragtide embedder` and `ragtide retriever` run as separate processes that
scale independently.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from fastapi import APIRouter, FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.chunking import Chunker
from ragtide.embedder.encoder import Encoder, SentenceTransformerEncoder
from ragtide.embedder.index.base import VectorIndex
from ragtide.embedder.index.factory import open_index
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.verify import verify_table
from ragtide.embedder.worker import BatchProcessor, create_worker_app
from ragtide.embedder.writer import IndexWriter
from ragtide.ingest.connector import source_topics
from ragtide.ingest.rows import read_rows
from ragtide.ingest.sources import SourcesConfig, load_sources
from ragtide.retriever.app import create_app


def build_encoder(settings: RagtideSettings) -> Encoder:
    """The configured encoder."""
    e = settings.encoder
    return SentenceTransformerEncoder(e.model_path, e.device, e.batch_size)


def build_writer(
    settings: RagtideSettings, index: VectorIndex, encoder: Encoder, sources: SourcesConfig
) -> IndexWriter:
    """The index writer with a chunker on the model's own tokenizer."""
    max_tokens = min(settings.chunking.max_tokens, encoder.max_tokens)
    chunker = Chunker(encoder.tokenizer, max_tokens, settings.chunking.overlap_tokens)
    return IndexWriter(index, encoder, chunker, sources)


def build_embedder(
    settings: RagtideSettings,
    index: VectorIndex,
    encoder: Encoder,
    sources: SourcesConfig,
    registry: CollectorRegistry,
    tracker: FreshnessTracker | None = None,
) -> faust.App:
    """The Faust app of the embedder."""
    processor = BatchProcessor(
        build_writer(settings, index, encoder, sources),
        EmbedderMetrics(registry),
        settings.connect.topic_prefix,
        tracker,
    )
    return create_worker_app(settings, processor, source_topics(settings, sources))


def create_node_app(settings: RagtideSettings) -> FastAPI:
    """Embedder + retrieval API in one process, sharing the encoder and the (embedded) index."""
    from faust.contrib.asgi import faust_lifespan

    sources = load_sources(settings.sources_file)
    encoder = build_encoder(settings)
    index = open_index(settings)
    registry = CollectorRegistry()
    tracker = FreshnessTracker(registry)
    worker = build_embedder(settings, index, encoder, sources, registry, tracker)
    admin = admin_router(settings, index, build_writer(settings, index, encoder, sources), sources)
    return create_app(
        settings, index, encoder, sources, registry, lifespan=faust_lifespan(worker), tracker=tracker, routers=[admin]
    )


class VerifyRequest(BaseModel):
    """POST /v1/admin/verify."""

    model_config = ConfigDict(extra="forbid")

    table: str | None = Field(None, description="one source table (schema.table); default: all")
    repair: bool = Field(False, description="fix exactly the drift that was found")


def admin_router(
    settings: RagtideSettings, index: VectorIndex, writer: IndexWriter, sources: SourcesConfig
) -> APIRouter:
    """Operator endpoints of the node (the owner of the embedded index)."""
    router = APIRouter(prefix="/v1/admin", tags=["admin"])

    @router.post("/verify")
    async def verify(body: VerifyRequest) -> dict[str, Any]:
        """Compare the source tables with the index (missing, stale, orphaned rows); optionally repair."""
        if body.table is not None and body.table not in sources.user_tables:
            raise HTTPException(422, f"table: {body.table!r} is not a source table; tables: {sources.user_tables}")
        reports = []
        for table in [body.table] if body.table else sources.user_tables:
            source = sources.get(table)
            assert source is not None
            position, rows = await asyncio.to_thread(read_rows, settings.postgres.dsn(), source)
            report = await asyncio.to_thread(verify_table, source, position, rows, index, writer, body.repair)
            reports.append(report.as_dict())
        return {"drift": sum(r["drift"] for r in reports), "repair": body.repair, "tables": reports}

    return router


def create_retriever_app(settings: RagtideSettings) -> FastAPI:
    """The retrieval API alone; it reads a Qdrant server that the embedder writes."""
    if not settings.qdrant_url:
        raise ConfigError(
            "QDRANT_URL: the standalone retriever needs a Qdrant server; in embedded mode run `ragtide node`"
        )
    sources = load_sources(settings.sources_file)
    return create_app(settings, open_index(settings), build_encoder(settings), sources)
