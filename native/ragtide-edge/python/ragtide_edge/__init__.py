"""ragtide's binding of the embedded Qdrant engine (the qdrant-edge crate, 0.9.0). See src/lib.rs."""

from ragtide_edge._native import EdgeError, Shard

__all__ = ["EdgeError", "Shard"]
