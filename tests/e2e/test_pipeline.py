"""End to end on the real stack: Postgres -> Debezium -> Kafka -> Faust embedder -> Qdrant -> /v1/search."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ragtide.embedder.dlq import list_dead_letters, replay_dead_letters
from tests.e2e.conftest import SCRATCH_PARTITIONS, LiveStack, poll


def insert(live: LiveStack, row_id: str, title: str, body: str, topic: str, category: str = "e2e") -> None:
    live.sql(
        "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, %s, %s, %s, %s)",
        (row_id, title, body, topic, category),
    )


def hits_of(live: LiveStack, query: str, row_id: str, topic: str) -> list[dict[str, Any]]:
    return [h for h in live.search(query, k=10, flt={"topic": topic}) if h["row_id"] == row_id]


def test_demo_corpus_query_returns_relevant_hits(live: LiveStack) -> None:
    assert live.demo_rows > 300
    top = live.search("catching exceptions with try and except", k=3)
    assert "try" in {h["metadata"]["topic"] for h in top}
    top = live.search("the with statement and context managers", k=3)
    assert {h["metadata"]["topic"] for h in top} & {"with", "context-managers"}
    assert all(h["source_commit_ts"] and h["indexed_at"] for h in top)


def test_insert_update_delete_round_trip(live: LiveStack) -> None:
    topic = f"e2e-{uuid.uuid4().hex[:8]}"
    row = f"{topic}/1"
    insert(live, row, "Zebra migration", "Zebras cross the Mara river every July in search of fresh grass.", topic)
    hit = poll(lambda: hits_of(live, "zebra river crossing", row, topic), "the inserted row to be searchable")[0]
    assert "Mara river" in hit["text"] and hit["key"] == {"id": row} and hit["metadata"]["category"] == "e2e"

    live.sql(
        "UPDATE public.docs SET body = %s WHERE id = %s",
        ("Penguins huddle together through the Antarctic winter to stay warm.", row),
    )

    def updated() -> list[dict[str, Any]]:
        hits = hits_of(live, "penguins antarctic winter", row, topic)
        return hits if hits and all("Penguins" in h["text"] for h in hits) else []

    poll(updated, "the updated text to replace the old one")
    assert all("Mara" not in h["text"] for h in hits_of(live, "zebra river crossing", row, topic))

    live.sql("DELETE FROM public.docs WHERE id = %s", (row,))
    poll(lambda: live.search("penguins antarctic winter", k=10, flt={"topic": topic}) == [], "the delete")


def test_metadata_only_update_is_not_reembedded(live: LiveStack) -> None:
    topic = f"e2e-{uuid.uuid4().hex[:8]}"
    row = f"{topic}/1"
    insert(live, row, "Volcanoes", "Basaltic lava flows build shield volcanoes like Mauna Loa.", topic)
    poll(lambda: hits_of(live, "shield volcano lava", row, topic), "the row to be indexed")
    embedded = live.metric("ragtide_chunks_embedded_total", table="public.docs")
    live.sql("UPDATE public.docs SET category = 'geology' WHERE id = %s", (row,))
    poll(
        lambda: live.search("shield volcano lava", k=5, flt={"topic": topic, "category": "geology"}),
        "the new metadata to be searchable",
    )
    assert live.metric("ragtide_chunks_embedded_total", table="public.docs") == embedded


def test_chunks_are_tokenized_once(live: LiveStack) -> None:
    # The writer hands the chunker's token ids to the engine; only windows cut inside a word go as text.
    from_ids = live.metric("ragtide_chunks_embedded_from_ids_total")
    assert from_ids >= 0.8 * live.metric("ragtide_chunks_embedded_total") > 0


def test_row_inserted_while_embedder_is_stopped_is_indexed_after_restart(live: LiveStack) -> None:
    topic = f"e2e-{uuid.uuid4().hex[:8]}"
    row = f"{topic}/1"
    node = live.stack.daemon("node")
    assert node.stop(timeout=60)
    try:
        insert(live, row, "Glaciers", "Glaciers carve U-shaped valleys as they slowly flow downhill.", topic)
    finally:
        live.stack.start_node()
    hit = poll(lambda: hits_of(live, "glacier valley", row, topic), "the row written during the outage")[0]
    assert "U-shaped" in hit["text"]


def test_poison_record_goes_to_dead_letter_topic_and_the_stream_continues(live: LiveStack) -> None:
    s = live.settings
    source_topic = f"{s.connect.topic_prefix}.public.docs"
    marker = uuid.uuid4().hex.encode()

    async def send_poison() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(source_topic, key=b'{"id":"poison"}', value=b"{not json " + marker)
        finally:
            await producer.stop()

    asyncio.run(send_poison())
    topic = f"e2e-{uuid.uuid4().hex[:8]}"
    row = f"{topic}/1"
    insert(live, row, "After poison", "Lighthouses guide ships past dangerous rocky coasts at night.", topic)
    poll(lambda: hits_of(live, "lighthouse ships coast", row, topic), "a row written after the poison record")

    async def read_dlq() -> list[Any]:
        consumer = AIOKafkaConsumer(
            s.dlq_topic,
            bootstrap_servers=s.kafka.bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            batches = await consumer.getmany(timeout_ms=5000)
            return [m for msgs in batches.values() for m in msgs if m.value and marker in m.value]
        finally:
            await consumer.stop()

    dead = poll(lambda: asyncio.run(read_dlq()), "the poison record in the dead-letter topic", timeout=60)
    headers = dict(dead[0].headers)
    assert headers["ragtide.reason"].startswith(b"decode:")
    assert headers["ragtide.topic"] == source_topic.encode()
    assert dead[0].key == b'{"id":"poison"}'
    assert live.metric("ragtide_dlq_total") >= 1

    # `ragtide dlq list` sees it with its reason; `ragtide dlq replay` sends it back to be retried once.
    letters = [d for d in asyncio.run(list_dead_letters(s.kafka, s.dlq_topic)) if marker in (d.value or b"")]
    assert letters[0].reason.startswith("decode:") and letters[0].topic == source_topic
    replayed = asyncio.run(replay_dead_letters(s.kafka, s.dlq_topic))
    assert marker in b"".join(d.value or b"" for d in replayed)
    poll(lambda: len(asyncio.run(read_dlq())) == 2, "the replayed (still malformed) record to be dead-lettered again")
    again = asyncio.run(replay_dead_letters(s.kafka, s.dlq_topic))
    assert letters[0].offset not in {d.offset for d in again}  # progress is remembered: no double replay


def test_ops_endpoints(live: LiveStack) -> None:
    assert live.api("/healthz").json()["status"] == "ok"
    ready = live.api("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert live.api("/docs").status_code == 200
    assert "ragtide_freshness_seconds_bucket" in live.api("/metrics").text
    bad = httpx_post(live, {"query": "x", "filter": {"nope": 1}})
    assert bad.status_code == 422 and "unknown field 'nope'" in bad.text
    assert set(live.stack.status().values()) != {None}


def httpx_post(live: LiveStack, body: dict[str, Any]) -> Any:
    import httpx

    return httpx.post(f"{live.settings.api.url}/v1/search", json=body, timeout=30)


def test_the_embedder_checks_its_progress_against_kafkas_own_offsets(live: LiveStack) -> None:
    """The liveness watchdog reads the end and committed offsets of the node's partitions from Kafka (clients of
    its own) on a timer; a worker that keeps up is never reported stalled."""
    before = live.metric("ragtide_embedder_liveness_checks_total")
    poll(lambda: live.metric("ragtide_embedder_liveness_checks_total") >= before + 2, "two more liveness checks")
    assert live.metric("ragtide_embedder_stalled") == 0
    assert live.metric("ragtide_embedder_partitions") >= 1 + SCRATCH_PARTITIONS  # the docs topic, the scratch one
    # The node keeps up: between the canary's rows (one every 2 s) a check finds nothing left to consume.
    poll(lambda: live.metric("ragtide_embedder_backlog_records") == 0, "a liveness check with no backlog")
    logs = (live.settings.data_dir / "logs" / "node.log").read_text()
    assert "liveness check could not read" not in logs  # the checks read real offsets, not errors
