"""The VectorIndex seam: the embedded Qdrant engine (qdrant-edge), a Qdrant server (qdrant-client), a test double."""

from ragtide.embedder.index.base import Hit, IndexPoint, StoredPoint, VectorIndex

__all__ = ["Hit", "IndexPoint", "StoredPoint", "VectorIndex"]
