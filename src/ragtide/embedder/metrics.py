"""Prometheus metrics of the embedder, on a registry created by the composition root (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EmbedderMetrics:
    """Counters of what the writer did, and how long changes took to become searchable."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("ragtide_events_total", "change events consumed", ["table", "op"], registry=registry)
        self.embedded = Counter("ragtide_chunks_embedded_total", "chunks embedded", ["table"], registry=registry)
        self.embedded_from_ids = Counter(
            "ragtide_chunks_embedded_from_ids_total",
            "chunks embedded from the chunker's token ids, never tokenized a second time",
            registry=registry,
        )
        self.skipped = Counter(
            "ragtide_chunks_skipped_total",
            "chunks whose text was unchanged (not embedded)",
            ["table"],
            registry=registry,
        )
        self.tokens = Counter(
            "ragtide_embed_tokens",
            "tokens of the chunks embedded (every generation written)",
            ["table"],
            registry=registry,
        )
        self.cost_usd = Counter(
            "ragtide_embed_cost_usd",
            "what an embeddings provider charged for them (encoder.api.usd_per_million_tokens)",
            ["table"],
            registry=registry,
        )
        self.payload_updates = Counter(
            "ragtide_payload_updates_total", "points updated in place (no embedding)", registry=registry
        )
        self.deleted = Counter("ragtide_chunks_deleted_total", "points deleted", registry=registry)
        self.backfilled = Counter(
            "ragtide_backfill_rows_total",
            "rows indexed from Debezium snapshots (initial or incremental)",
            ["table"],
            registry=registry,
        )
        self.stale = Counter(
            "ragtide_events_stale_total", "events older than the stored row version (ignored)", registry=registry
        )
        self.dlq = Counter("ragtide_dlq_total", "events sent to the dead-letter topic", ["reason"], registry=registry)
        self.store_retries = Counter(
            "ragtide_store_retries_total", "batch retries because a store was unavailable", registry=registry
        )
        self.outage_seconds = Gauge(
            "ragtide_store_outage_seconds",
            "how long a store the embedder writes to (index, truncate log) has been unavailable; 0 when none is",
            registry=registry,
        )
        self.batch_size = Histogram(
            "ragtide_batch_events",
            "events per processed batch",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=registry,
        )
        self.lag_records = Gauge(
            "ragtide_consumer_lag_records",
            "records behind the partition's end",
            ["topic", "partition"],
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "ragtide_consumer_lag_seconds",
            "age of the newest processed record while behind",
            ["topic", "partition"],
            registry=registry,
        )
        self.stalled = Gauge(
            "ragtide_embedder_stalled", "1 while /healthz says the consumer is stalled or blocked", registry=registry
        )
        self.rewinds = Counter(
            "ragtide_embedder_partition_rewinds",
            "partitions sought back to their committed offset: records waited there with none reaching the worker "
            "(faust-streaming lost them in flight, e.g. at a rebalance)",
            ["topic", "partition"],
            registry=registry,
        )
        self.liveness_checks = Counter(
            "ragtide_embedder_liveness_checks_total", "progress checks against Kafka's offsets", registry=registry
        )
        self.partitions = Gauge(
            "ragtide_embedder_partitions",
            "source partitions assigned to this worker (at the last check)",
            registry=registry,
        )
        self.backlog = Gauge(
            "ragtide_embedder_backlog_records",
            "records not yet committed on this worker's partitions, as Kafka itself reports them",
            registry=registry,
        )
