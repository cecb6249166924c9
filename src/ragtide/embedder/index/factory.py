"""Choose the VectorIndex implementation from the settings: Qdrant server when QDRANT_URL is set (several URLs, comma
separated: nodes of one cluster, tried in turn), else embedded."""

from __future__ import annotations

from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.index.base import VectorIndex


def open_index(settings: RagtideSettings, collection: str | None = None) -> VectorIndex:
    """The configured store's `collection` (default: the configured one), not yet ensured: call ensure_collection."""
    name = collection or settings.index.collection
    if settings.qdrant_url:
        from qdrant_client import QdrantClient

        from ragtide.embedder.index.remote import QdrantClientIndex

        key = settings.index.api_key.get_secret_value() if settings.index.api_key else None
        nodes = [QdrantClient(url=url.strip(), api_key=key) for url in settings.qdrant_url.split(",")]
        s = settings.index
        return QdrantClientIndex(nodes, name, s.shards, s.replication_factor, s.indexing_threshold_kb)
    from ragtide.embedder.index.edge import EdgeIndex

    return EdgeIndex(settings.index_path, name, settings.index.min_free_mb << 20, settings.index.indexing_threshold_kb)
