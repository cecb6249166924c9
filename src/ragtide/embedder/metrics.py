"""Prometheus metrics of the embedder, on a registry created by the composition root (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class EmbedderMetrics:
    """Counters of what the writer did, and how long changes took to become searchable."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("ragtide_events_total", "change events consumed", ["table", "op"], registry=registry)
        self.embedded = Counter("ragtide_chunks_embedded_total", "chunks embedded", registry=registry)
        self.skipped = Counter(
            "ragtide_chunks_skipped_total", "chunks whose text was unchanged (not embedded)", registry=registry
        )
        self.payload_updates = Counter(
            "ragtide_payload_updates_total", "points updated in place (no embedding)", registry=registry
        )
        self.deleted = Counter("ragtide_chunks_deleted_total", "points deleted", registry=registry)
        self.stale = Counter(
            "ragtide_events_stale_total", "events older than the stored row version (ignored)", registry=registry
        )
        self.dlq = Counter("ragtide_dlq_total", "events sent to the dead-letter topic", ["reason"], registry=registry)
        self.store_retries = Counter("ragtide_store_retries_total", "vector store write retries", registry=registry)
        self.batch_size = Histogram(
            "ragtide_batch_events",
            "events per processed batch",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )
        self.commit_to_ack = Histogram(
            "ragtide_freshness_seconds", "source commit -> vector store ack", buckets=STAGE_BUCKETS, registry=registry
        )
