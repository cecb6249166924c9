"""Postgres down for 30 s under load: the gateway keeps serving search to a tenant's key with what the process knows
(no 5xx) and charges the tokens it could not charge once Postgres is back; the embedder retries its batches (the
truncate watermarks live in Postgres) and says so on /healthz ('degraded' once past batch.degraded_after_s); the
index ends equal to the source, with an empty dead-letter topic."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime

import httpx
import psycopg

from ragtide.bench.faults import SOURCE, WriteLoad, audit, await_recovery
from ragtide.contracts.settings import KafkaSettings
from ragtide.embedder.dlq import list_dead_letters
from ragtide.embedder.liveness import consumed
from ragtide.embedder.worker import EMBEDDER_GROUP
from ragtide.gateway.store import PostgresGatewayStore, new_key
from ragtide.ingest.connector import topic_end_offsets
from ragtide.stack.stack import Stack
from tests.e2e.conftest import poll

OUTAGE_S = 30.0
QUERY = "fault row version"
BACKLOG = range(6_000_000, 6_010_000)  # several batches of embedding on any CPU


def end_of(kafka: KafkaSettings, topic: str) -> int:
    return asyncio.run(topic_end_offsets(kafka, topic)).get(0, 0)


def backlog_in_kafka(kafka: KafkaSettings, topic: str, start: int) -> bool:
    return end_of(kafka, topic) >= start + len(BACKLOG)


def test_postgres_down_for_30_s_serves_search_charges_later_and_loses_nothing(stack: Stack) -> None:
    s = stack.settings
    dsn, api = s.postgres.dsn(), s.api.url
    store = PostgresGatewayStore(dsn)
    key, record = new_key("acme", rate_per_s=1000.0, burst=1000)
    store.add_key(record)
    tokens_each = math.ceil(len(QUERY) / 4)
    day = datetime.now(UTC).date()
    used_before = store.usage("acme", day)

    load = WriteLoad(dsn, rate=20.0, seed=23, first_id=2_000_000)
    load.start()
    statuses: list[int] = []
    health: list[dict[str, str]] = []
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:

        def search() -> None:
            statuses.append(client.post("/v1/search", json={"query": QUERY, "k": 3}).status_code)

        search()  # the key's record is now known to the process
        # A backlog for the embedder: it is still applying these when Postgres goes, so its batches need the
        # truncate watermarks (in Postgres) while Postgres is down.
        start = end_of(s.kafka, f"{s.connect.topic_prefix}.{SOURCE['table']}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.faults (id, rid, body, label) SELECT g, g, 'backlog row ' || g, 'backlog' "
                "FROM generate_series(%s, %s) g",
                (BACKLOG[0], BACKLOG[-1]),
            )
        topic = f"{s.connect.topic_prefix}.{SOURCE['table']}"
        poll(lambda: backlog_in_kafka(s.kafka, topic, start), "Debezium to publish the backlog", 60)
        stack.daemon("postgres").stop()
        caught_up = asyncio.run(consumed(s.kafka, EMBEDDER_GROUP, {(topic, 0): end_of(s.kafka, topic)}))
        assert not caught_up, f"the embedder applied {len(BACKLOG)} rows before Postgres stopped: make BACKLOG larger"
        down_at = time.monotonic()
        while time.monotonic() - down_at < OUTAGE_S:
            search()
            health.append(httpx.get(f"{api}/healthz", timeout=10).json())
            time.sleep(1.0)
        stack.start_postgres()
        recovery = await_recovery(api, dsn, "postgres-outage", 9_000, time.monotonic(), 240.0)
        load.stop()
        final = await_recovery(api, dsn, "final", 9_001, time.monotonic(), 240.0)
        search()  # charges what the outage left owed

    assert recovery.fresh_s is not None and final.fresh_s is not None and load.errors == []
    assert set(statuses) == {200}, statuses  # every search answered, through the outage
    degraded = [h for h in health if h["status"] == "degraded"]
    assert degraded and "Postgres" in degraded[-1]["checks"]["embedder"], health[-3:]
    assert store.usage("acme", day) - used_before == tokens_each * len(statuses)  # nothing went uncharged
    store.close()

    result = audit(api, dsn, load.ever)  # the backlog rows are covered by verify below
    assert result.live_rows > 0 and load.failed > 0  # the load ran into the outage and went on
    assert (result.lost, result.stale, result.ghosts) == ([], [], [])
    verified = httpx.post(f"{api}/v1/admin/verify", json={"table": SOURCE["table"]}, timeout=300).json()
    assert verified["drift"] == 0
    assert asyncio.run(list_dead_letters(s.kafka, s.dlq_topic)) == []
