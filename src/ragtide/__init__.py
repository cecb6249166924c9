"""ragtide: a CDC-driven streaming RAG ingestion pipeline (Postgres -> Debezium -> Kafka -> embedder -> Qdrant)."""

__version__ = "0.1.0"
