"""Choose the VectorIndex implementation from the settings: Qdrant server when QDRANT_URL is set, else embedded."""

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
        return QdrantClientIndex(QdrantClient(url=settings.qdrant_url, api_key=key), name)
    from ragtide.embedder.index.edge import EdgeIndex

    return EdgeIndex(settings.index_path, name, min_free_bytes=settings.index.min_free_mb << 20)
