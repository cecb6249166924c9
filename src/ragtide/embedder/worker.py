"""The Faust app of the embedder: consume Debezium topics in size-or-time batches, apply them to the index,
and ack (commit) offsets only after the vector store acknowledged every write of the batch.

This module is the one place that decides what is retried (the store being unavailable), what goes to the
dead-letter topic (a record we cannot decode, or a row we cannot index), and what stops the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faust
from faust.types import TP

from ragtide.contracts.errors import DecodeError, StoreUnavailable
from ragtide.contracts.events import ChangeEvent
from ragtide.contracts.freshness import ChangeTiming, FreshnessTracker
from ragtide.contracts.settings import KafkaSettings, RagtideSettings
from ragtide.embedder.liveness import KafkaOffsets, Outage, Watchdog
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.writer import ApplyStats
from ragtide.ingest.decode import decode, table_of_topic

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class Poison:
    """A record that goes to the dead-letter topic, with its original bytes and the reason."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


EMBEDDER_GROUP = "ragtide-embedder"  # the default of `kafka.group`: the Faust app id and its Kafka consumer group


def is_transient(exc: BaseException) -> bool:
    """A store is unavailable right now: retry the whole batch, commit nothing. Only `StoreUnavailable` is: each
    backend maps exactly the errors that mean that onto it (index/edge.py, index/remote.py, contracts/pg.py).
    Anything else is a bug or a poison row, and goes row by row to the dead-letter topic."""
    return isinstance(exc, StoreUnavailable)


class Applier(Protocol):
    """Applies decoded events to the index (an IndexWriter, or every open generation)."""

    def apply(self, events: Sequence[ChangeEvent]) -> ApplyStats: ...


class BatchProcessor:
    """Decode, apply with retries, and split out poison records. Knows nothing of Faust streams."""

    def __init__(
        self,
        writer: Applier,
        metrics: EmbedderMetrics,
        topic_prefix: str,
        tracker: FreshnessTracker | None = None,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.topic_prefix = topic_prefix
        self.tracker = tracker
        self.dequeued_ms = 0  # when the batch being applied left Kafka
        self.outage = Outage()  # a store is down and the batch waits for it (alive, not stuck)
        metrics.outage_seconds.set_function(self.outage.seconds)
        self.base_delay_s = 0.1  # the first retry's backoff; doubled per attempt up to MAX_BACKOFF_S
        self.seen: dict[tuple[str, int], float] = {}  # partition -> when a record of it was last taken or acked

    def saw(self, messages: Sequence[Any]) -> None:
        """Records of these partitions reached the worker now (the watchdog's sign that they are not lost)."""
        now = time.monotonic()
        for m in messages:
            self.seen[(m.topic, m.partition)] = now

    def decode_all(self, records: Sequence[Any]) -> tuple[list[ChangeEvent], list[Poison]]:
        """Decode Kafka messages (anything with topic/partition/offset/key/value/timestamp)."""
        good: list[ChangeEvent] = []
        bad: list[Poison] = []
        for m in records:
            try:
                ev = decode(
                    m.key,
                    m.value,
                    topic_table=table_of_topic(m.topic, self.topic_prefix),
                    kafka_ms=int(m.timestamp * 1000) if m.timestamp < 1e11 else int(m.timestamp),
                    partition=m.partition,
                    offset=m.offset,
                )
            except DecodeError as exc:
                bad.append(Poison(m.topic, m.partition, m.offset, m.key, m.value, f"decode: {exc}"))
                continue
            if ev is not None:
                good.append(ev)
        return good, bad

    async def apply(self, events: list[ChangeEvent]) -> list[tuple[ChangeEvent, str]]:
        """Apply the batch; retry while a store is unavailable; isolate rows that fail on their own.

        Returns the (event, reason) pairs that must go to the dead-letter topic. Every other event of the batch is
        in the index when this returns: there is no third outcome. A store outage, also one that starts while
        rows are retried one by one, goes back to the batch-level retry with the rows still pending; it ends
        only when the store answers, or when the agent is cancelled (shutdown), which acks nothing.
        """
        pending = list(events)
        poison: list[tuple[ChangeEvent, str]] = []
        attempt = 0
        one_by_one = False
        try:
            while pending:
                try:
                    if one_by_one:
                        await self._apply_one_by_one(pending, poison)
                    else:
                        self._record(await asyncio.to_thread(self.writer.apply, pending))
                        pending = []
                except Exception as exc:
                    if not is_transient(exc):
                        self.outage.end()  # the store answered: this batch holds a row that cannot be indexed
                        log.warning(
                            "batch failed; retrying row by row", extra={"error": repr(exc), "events": len(pending)}
                        )
                        one_by_one = True
                        continue
                    attempt += 1
                    one_by_one = False  # back to the batch: the rows after a poison one go in together again
                    self.metrics.store_retries.inc()
                    delay = min(MAX_BACKOFF_S, self.base_delay_s * 2 ** min(attempt, 16))
                    log.error(
                        "store unavailable; batch will be retried",
                        extra={"error": repr(exc), "attempt": attempt, "delay_s": delay, "pending": len(pending)},
                    )
                    self.outage.begin(str(exc))
                    await asyncio.sleep(delay)
        finally:
            self.outage.end()  # nothing waits for a store any more: done, cancelled (shutdown), or failed
        return poison

    async def _apply_one_by_one(self, pending: list[ChangeEvent], poison: list[tuple[ChangeEvent, str]]) -> None:
        """Apply the pending rows one at a time, taking each off `pending` once it is in the index or poisoned. A
        store outage is raised to the batch-level retry, which resumes with the rows still pending."""
        while pending:
            ev = pending[0]
            try:
                self._record(await asyncio.to_thread(self.writer.apply, [ev]))
            except Exception as exc:
                if is_transient(exc):
                    raise
                poison.append((ev, f"apply: {type(exc).__name__}: {exc}"))
            pending.pop(0)

    def _record(self, stats: ApplyStats) -> None:
        m = self.metrics
        acked_ms = int(time.time() * 1000)
        dequeued_ms = self.dequeued_ms or acked_ms
        timings = []
        for ev in stats.applied:
            m.events.labels(ev.table, ev.op.value).inc()
            if ev.extra.get("snapshot"):
                m.backfilled.labels(ev.table).inc()
            if ev.position.ts_ms and not ev.extra.get("snapshot"):
                # Snapshot reads carry the snapshot's start time, not a commit: backfill, not freshness.
                timings.append(
                    ChangeTiming(
                        table=ev.table,
                        row_id=ev.row_id,
                        op=ev.op.value,
                        source_ms=ev.position.ts_ms,
                        emitted_ms=ev.emitted_ms or ev.position.ts_ms,
                        kafka_ms=ev.kafka_ms or ev.emitted_ms,
                        dequeued_ms=dequeued_ms,
                        embedded_ms=stats.embedded_ms or dequeued_ms,
                        acked_ms=acked_ms,
                    )
                )
        if self.tracker is not None and timings:
            self.tracker.record(timings)
        for table, n in stats.embedded_by_table.items():
            m.embedded.labels(table).inc(n)
        for table, n in stats.skipped_by_table.items():
            m.skipped.labels(table).inc(n)
        for table, n in stats.tokens_by_table.items():
            m.tokens.labels(table).inc(n)
        for table, nano in stats.nano_usd_by_table.items():
            m.cost_usd.labels(table).inc(nano / 1e9)
        m.embedded_from_ids.inc(stats.embedded_from_ids)
        m.payload_updates.inc(stats.payload_updates)
        m.deleted.inc(stats.deleted_points)
        m.stale.inc(stats.stale)
        m.batch_size.observe(stats.events)


class AckLog:
    """`batch.ack_log`: one JSON line per acknowledged batch and partition, written through at once (a SIGKILL
    right after loses nothing of it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def record(self, messages: Sequence[Any]) -> None:
        """The batch's offsets, by partition."""
        spans: dict[tuple[str, int], list[int]] = {}
        for m in messages:
            spans.setdefault((m.topic, m.partition), []).append(m.offset)
        now = round(time.time(), 3)
        lines = [
            json.dumps({"t": now, "topic": t, "partition": p, "first": min(o), "last": max(o), "records": len(o)})
            for (t, p), o in sorted(spans.items())
        ]
        with self.path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def record_lag(app: faust.App, metrics: EmbedderMetrics, messages: Sequence[Any]) -> None:
    """Consumer lag per partition: records behind the high-water mark, and how old the newest processed one is."""
    newest: dict[Any, Any] = {}
    for m in messages:
        if m.tp not in newest or m.offset > newest[m.tp].offset:
            newest[m.tp] = m
    now = time.time()
    for tp, m in newest.items():
        try:
            highwater = app.consumer.highwater(tp)
        except Exception:  # the consumer may be rebalancing; lag is best effort
            continue
        behind = max(0, int(highwater or 0) - m.offset - 1)
        metrics.lag_records.labels(tp.topic, str(tp.partition)).set(behind)
        ts = m.timestamp if m.timestamp < 1e11 else m.timestamp / 1000
        metrics.lag_seconds.labels(tp.topic, str(tp.partition)).set(max(0.0, now - ts) if behind else 0.0)


def kafka_credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """Faust's form of the Kafka security settings (the same as `KafkaSettings.client_config`)."""
    from faust.types.auth import SASLMechanism

    ctx = kafka.ssl_context()
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=SASLMechanism(kafka.sasl_mechanism),
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def create_worker_app(
    settings: RagtideSettings,
    processor: BatchProcessor,
    topics: Sequence[str],
    on_gpu: bool = False,
    watchdog: Watchdog | None = None,
) -> faust.App:
    """The Faust app: one agent over every source topic, a dead-letter topic, manual acks; with a watchdog, a
    timer that checks the consumer's progress against Kafka's own offsets (liveness.py)."""
    app = faust.App(
        settings.kafka.group,
        broker=[f"kafka://{server}" for server in settings.kafka.bootstrap.split(",")],
        broker_credentials=kafka_credentials(settings.kafka),
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        broker_session_timeout=settings.kafka.session_timeout_s,
        consumer_group_instance_id=settings.kafka.member_id(settings.data_dir, topics),
        producer_linger_ms=0,
        stream_wait_empty=False,
        autodiscover=False,
    )
    source = app.topic(*topics, key_type=bytes, value_type=bytes, partitions=settings.kafka.partitions)
    dlq = app.topic(settings.dlq_topic, key_type=bytes, value_type=bytes, partitions=1)
    window_s = settings.batch.window_ms / 1000
    max_events = settings.batch.events_per_batch(on_gpu)
    ack_log = AckLog(settings.batch.ack_log) if settings.batch.ack_log else None

    async def dead_letter(p: Poison) -> None:
        processor.metrics.dlq.labels(p.reason.split(":", 1)[0]).inc()
        log.warning(
            "dead-lettered record",
            extra={"topic": p.topic, "partition": p.partition, "offset": p.offset, "reason": p.reason},
        )
        fut = await dlq.send(
            key=p.key,
            value=p.value,
            headers={
                "ragtide.reason": p.reason.encode(),
                "ragtide.topic": p.topic.encode(),
                "ragtide.partition": str(p.partition).encode(),
                "ragtide.offset": str(p.offset).encode(),
            },
        )
        await fut  # durable in the DLQ before the original offset is committed

    @app.agent(source, name="ragtide-embed")
    async def embed(stream: Any) -> None:
        async for events in stream.noack_take(max_events, within=window_s):
            processor.dequeued_ms = int(time.time() * 1000)
            messages = [e.message for e in events]
            processor.saw(messages)
            good, bad = processor.decode_all(messages)
            failed = await processor.apply(good) if good else []
            for p in bad:
                await dead_letter(p)
            for ev, reason in failed:
                m = next(
                    m
                    for m in messages
                    if (m.partition, m.offset) == (ev.partition, ev.offset)
                    and table_of_topic(m.topic, settings.connect.topic_prefix) == ev.table
                )
                await dead_letter(Poison(m.topic, m.partition, m.offset, m.key, m.value, reason))
            if ack_log is not None:  # before the acks: a kill in between shows as applied twice, never as once
                ack_log.record(messages)
            # Step 3 of the checkpoint: the store acknowledged every write; now the offsets may be committed.
            for e in events:
                await stream.ack(e)
            processor.saw(messages)
            record_lag(app, processor.metrics, messages)

    if watchdog is not None:
        watch(app, watchdog, processor, KafkaOffsets(settings.kafka, settings.kafka.group))
    return app


def watch(app: faust.App, watchdog: Watchdog, processor: BatchProcessor, offsets: KafkaOffsets) -> None:
    """Check progress every quarter of the stall limit (at most every 15 s)."""
    watchdog.outage = processor.outage
    metrics = processor.metrics
    rewind_s = min(20.0, watchdog.stall_s / 4)  # safe early: nothing of the partition is buffered or in a batch

    @app.timer(interval=min(15.0, watchdog.stall_s / 4))  # type: ignore[untyped-decorator]
    async def check_progress() -> None:
        assigned = sorted((tp.topic, tp.partition) for tp in app.consumer.assignment())
        try:
            watchdog.observe(await offsets.read(assigned))
        except Exception as exc:
            watchdog.unknown(exc)
        # Records wait on a partition and none reaches us: faust-streaming lost them in flight (seen here after a
        # rebalance under buffer pressure: its fetch position is past them, the commit never moves again). Seek
        # it back to the committed offset, well before the stall verdict would restart the process.
        unacked = getattr(app.consumer, "_unacked_messages", ())  # delivered to the stream, not acknowledged yet
        pending = {(m.tp.topic, m.tp.partition) for m in list(unacked)}  # buffered: not lost
        for (topic, partition), committed in watchdog.stuck(processor.seen, rewind_s, pending).items():
            log.warning(
                "records wait on a partition and none reach the worker: seeking it back to its committed offset",
                extra={"topic": topic, "partition": partition, "offset": committed},
            )
            metrics.rewinds.labels(topic, str(partition)).inc()
            await seek_back(app.consumer, TP(topic, partition), committed)
        verdict = watchdog.verdict()
        metrics.liveness_checks.inc()
        metrics.partitions.set(len(assigned))
        metrics.stalled.set(0 if verdict.ok else 1)
        metrics.backlog.set(verdict.backlog)
        if not verdict.ok:
            log.error("embedder not making progress", extra=verdict.as_dict())

    @app.task  # type: ignore[untyped-decorator]
    async def close_offsets() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await offsets.close()


async def seek_back(consumer: Any, tp: TP, offset: int) -> None:
    """Seek a partition on the consumer's own thread. faust-streaming runs aiokafka on a thread of its own, and its
    `Consumer.seek` calls aiokafka from the caller's thread: a seek racing the fetcher crashed the worker
    (`KeyError` in aiokafka's `fetched_records`, seen in `bench scale`). `seek_wait` goes through the thread. A
    partition revoked meanwhile cannot be sought: logged, and the next check decides again."""
    try:
        await consumer.seek_wait({tp: offset})
    except Exception as exc:
        log.warning("could not seek the partition back", extra={"partition": str(tp), "error": repr(exc)})
