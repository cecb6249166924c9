"""The batch processor: decode errors and rows that cannot be indexed go to the DLQ; store outages are retried."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ragtide.contracts.chunks import row_key
from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.events import ChangeEvent
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.truncations import PostgresTruncateLog
from ragtide.embedder.worker import BatchProcessor, create_worker_app, is_transient
from ragtide.embedder.writer import ApplyStats, IndexWriter
from ragtide.ingest.sources import SourcesConfig
from ragtide.stack.process import free_port
from tests.doubles import HashEncoder, word_chunker

FIXTURES = Path(__file__).parents[1] / "fixtures" / "debezium"
SOURCES = SourcesConfig.model_validate(
    {"sources": [{"table": "public.docs", "key": ["id"], "text": "{title} {body}", "metadata": ["category"]}]}
)


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float

    @property
    def tp(self) -> Any:
        from faust.types import TP

        return TP(self.topic, self.partition)


def fixture_msg(name: str) -> Msg:
    r = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return Msg(
        r["topic"],
        r["partition"],
        r["offset"],
        r["key"] and r["key"].encode(),
        r["value"] and r["value"].encode(),
        r["timestamp"] / 1000,
    )


class FlakyIndex(MemoryIndex):
    """Fails the first `failures` writes as if the store were down."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def upsert(self, points: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("index: unreachable")
        super().upsert(points)


def processor(index: MemoryIndex) -> tuple[BatchProcessor, CollectorRegistry]:
    registry = CollectorRegistry()
    enc = HashEncoder()
    index.ensure_collection(enc.dim)
    return BatchProcessor(
        IndexWriter(index, enc, word_chunker(), SOURCES), EmbedderMetrics(registry), "ragtide"
    ), registry


def test_decode_all_splits_poison_from_good_records() -> None:
    proc, _ = processor(MemoryIndex())
    bad = Msg("ragtide.public.docs", 0, 99, b'{"id":"x"}', b"{broken", 1.0)
    good, poison = proc.decode_all([fixture_msg("create"), bad, fixture_msg("delete")])
    assert [e.op.value for e in good] == ["c", "d"]
    assert len(poison) == 1 and poison[0].offset == 99 and poison[0].value == b"{broken"
    assert poison[0].reason.startswith("decode:")
    assert good[0].kafka_ms == fixture_msg("create").timestamp * 1000


def test_store_outage_is_retried_until_acknowledged() -> None:
    index = FlakyIndex(failures=2)
    proc, registry = processor(index)
    good, _ = proc.decode_all([fixture_msg("create")])
    failed = asyncio.run(proc.apply(good))
    assert failed == [] and index.count() == 1
    assert registry.get_sample_value("ragtide_store_retries_total") == 2
    assert registry.get_sample_value("ragtide_chunks_embedded_total", {"table": "public.docs"}) == 1


def test_a_row_that_cannot_be_indexed_is_isolated_for_the_dlq() -> None:
    index = MemoryIndex()
    proc, _ = processor(index)
    good, _ = proc.decode_all([fixture_msg("create")])
    ok = good[0]
    bad = ChangeEvent(ok.table, ok.op, {"id": "bad"}, {**(ok.row or {}), "id": "bad"}, ok.position, offset=7)

    def apply_one(events: list[ChangeEvent]) -> Any:
        if any(e.key == {"id": "bad"} for e in events):
            raise ValueError("cannot index this row")
        return IndexWriter.apply(proc.writer, events)

    proc.writer.apply = apply_one  # type: ignore[method-assign]
    failed = asyncio.run(proc.apply([ok, bad]))
    assert [(e.key, reason.split(":")[0]) for e, reason in failed] == [({"id": "bad"}, "apply")]
    assert index.count() == 1


def test_an_unreachable_truncate_log_is_retried_like_a_store_outage_not_dead_lettered() -> None:
    """The real log against a port where no Postgres listens: the batch is retried and nothing is poisoned."""
    log = PostgresTruncateLog(f"postgresql://ragtide@127.0.0.1:{free_port()}/ragtide?connect_timeout=2")
    index, enc, registry = MemoryIndex(), HashEncoder(), CollectorRegistry()
    index.ensure_collection(enc.dim)
    proc = BatchProcessor(
        IndexWriter(index, enc, word_chunker(), SOURCES, truncations=log), EmbedderMetrics(registry), "ragtide"
    )
    good, _ = proc.decode_all([fixture_msg("create")])
    proc.base_delay_s = 0.01
    with pytest.raises(TimeoutError):  # the shutdown's cancellation is the only way out of an outage: nothing acked
        asyncio.run(asyncio.wait_for(proc.apply(good), timeout=1.0))
    retries = registry.get_sample_value("ragtide_store_retries_total")
    assert retries is not None and retries >= 1 and index.count() == 0


def test_only_what_a_backend_mapped_to_store_unavailable_is_retried() -> None:
    """Broad types are not a classification: an OSError from a bug, or a connection error raised by the encoder,
    is not a store outage. Each backend maps its own (tests in test_store_errors.py)."""
    assert is_transient(StoreUnavailable("embedded index: disk full (ENOSPC)"))
    for exc in (ConnectionError(), TimeoutError(), OSError(), ValueError(), KeyError()):
        assert not is_transient(exc)


def test_a_store_outage_during_the_row_by_row_fallback_returns_to_the_batch_retry() -> None:
    """The drop the fault review found: a batch fails on a poison row, and while the rows are retried one by one the
    store goes down for longer than a row's attempts. Each row must end in the index or in the dead-letter list;
    before the fix the row hit by the outage was neither, and its offset was committed."""
    index = MemoryIndex()
    proc, registry = processor(index)
    good, _ = proc.decode_all([fixture_msg("create")])
    first = good[0]
    poison = ChangeEvent(
        first.table, first.op, {"id": "bad"}, {**(first.row or {}), "id": "bad"}, first.position, offset=7
    )
    last = ChangeEvent(
        first.table, first.op, {"id": "last"}, {**(first.row or {}), "id": "last"}, first.position, offset=8
    )
    outage = [6]  # the store refuses the next six writes that carry `last`: longer than any per-row retry

    def apply(events: list[ChangeEvent]) -> Any:
        if any(e.key == {"id": "bad"} for e in events):
            raise ValueError("cannot index this row")
        if outage[0] and any(e.key == {"id": "last"} for e in events):
            outage[0] -= 1
            raise StoreUnavailable("index unreachable")
        return IndexWriter.apply(proc.writer, events)

    proc.writer.apply = apply  # type: ignore[method-assign]
    proc.base_delay_s = 0.001
    failed = asyncio.run(proc.apply([first, poison, last]))
    assert [e.key for e, _ in failed] == [{"id": "bad"}]
    indexed = sorted(p.payload["row_key"] for p in index.scroll({"chunk_no": 0}))
    assert indexed == sorted(row_key(e.table, e.row_id) for e in (first, last))
    assert outage == [0] and registry.get_sample_value("ragtide_store_retries_total") == 6


def test_a_long_outage_neither_overflows_the_backoff_nor_stays_reported_after_it_ends() -> None:
    """The backoff doubled without bound: 2**1024 overflowed after ~1,000 retries (hours at the 10 s cap), which
    crashed the agent with the batch unacked while health still said 'a store is down'."""
    index = FlakyIndex(failures=1100)
    proc, registry = processor(index)
    proc.base_delay_s = 1e-9
    good, _ = proc.decode_all([fixture_msg("create")])
    assert asyncio.run(proc.apply(good)) == [] and index.count() == 1
    assert registry.get_sample_value("ragtide_store_retries_total") == 1100
    assert not proc.outage.ongoing

    first = good[0]
    other = ChangeEvent(first.table, first.op, {"id": "o"}, {**(first.row or {}), "id": "o"}, first.position, offset=9)

    async def cancelled_mid_outage() -> None:
        index.failures = 10**9
        task = asyncio.create_task(proc.apply([other]))
        for _ in range(1000):  # until the first failure
            if proc.outage.ongoing:
                break
            await asyncio.sleep(0.001)
        assert proc.outage.ongoing
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_mid_outage())
    assert not proc.outage.ongoing and registry.get_sample_value("ragtide_store_outage_seconds") == 0


@dataclass
class KEvent:
    message: Msg


def test_the_agent_acks_a_batch_only_after_its_writes_and_dead_letters_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    index, enc = MemoryIndex(), HashEncoder()
    index.ensure_collection(enc.dim)
    writer = IndexWriter(index, enc, word_chunker(), SOURCES)

    class Recording:
        def apply(self, events: Any) -> ApplyStats:
            stats = writer.apply(events)
            order.append("applied")
            return stats

    async def fake_send(self: Any, *a: Any, **kw: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(lambda: (order.append("dlq durable"), fut.set_result(None)))
        return fut

    from faust.topics import Topic

    monkeypatch.setattr(Topic, "send", fake_send)
    monkeypatch.setenv("RAGTIDE_DATA_DIR", str(tmp_path))
    settings = load_settings(RagtideSettings)
    proc = BatchProcessor(Recording(), EmbedderMetrics(CollectorRegistry()), settings.connect.topic_prefix)
    app = create_worker_app(settings, proc, ["ragtide.public.docs"])
    good = fixture_msg("create")
    msgs = [good, Msg(good.topic, good.partition, good.offset + 1, b'{"id":"x"}', b"{broken", good.timestamp)]

    class Stream:
        async def noack_take(self, n: int, within: float) -> Any:
            yield [KEvent(m) for m in msgs]

        async def ack(self, e: Any) -> None:
            order.append("ack")

    agent = next(iter(app.agents.values()))
    asyncio.run(agent.fun(Stream()))
    assert order == ["applied", "dlq durable", "ack", "ack"], order
