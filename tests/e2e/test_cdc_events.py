"""Every kind of change Debezium emits ends with the index equal to the source (more in test_verify.py)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import httpx
import psycopg

from ragtide.embedder.liveness import KafkaOffsets
from ragtide.embedder.worker import EMBEDDER_GROUP
from ragtide.ingest.connector import topic_end_offsets
from tests.e2e.conftest import SCRATCH_PARTITIONS, SCRATCH_SOURCE, LiveStack, poll


def new_topic() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


def insert(live: LiveStack, row: str, title: str, body: str | None, topic: str) -> None:
    live.sql(
        "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, %s, %s, %s, 'e2e')",
        (row, title, body, topic),
    )


def rows_of(live: LiveStack, query: str, topic: str, k: int = 20) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for h in live.search(query, k=k, flt={"topic": topic}):
        out.setdefault(h["row_id"], []).append(h)
    return out


def test_primary_key_change_moves_the_row(live: LiveStack) -> None:
    topic = new_topic()
    insert(live, f"{topic}/old", "Kelp forests", "Giant kelp forests shelter sea otters and urchins.", topic)
    poll(lambda: f"{topic}/old" in rows_of(live, "kelp forest otters", topic), "the row under its old key")
    live.sql("UPDATE public.docs SET id = %s WHERE id = %s", (f"{topic}/new", f"{topic}/old"))
    poll(lambda: set(rows_of(live, "kelp forest otters", topic)) == {f"{topic}/new"}, "the row under its new key only")


def test_burst_on_one_row_ends_in_the_last_state(live: LiveStack) -> None:
    topic = new_topic()
    row = f"{topic}/1"
    insert(live, row, "Counter", "version 0 of the lighthouse keeper's log", topic)
    for i in range(1, 31):
        live.sql("UPDATE public.docs SET body = %s WHERE id = %s", (f"version {i} of the lighthouse keeper's log", row))

    def final() -> bool:
        hits = rows_of(live, "lighthouse keeper log version", topic).get(row, [])
        return len(hits) == 1 and "version 30 " in hits[0]["text"]

    poll(final, "the 30th version to be the only indexed text")


def test_null_text_long_rows_and_unicode(live: LiveStack) -> None:
    topic = new_topic()
    insert(live, f"{topic}/null", "Only a title about narwhals", None, topic)
    words = " ".join(f"fjord{i} glacier{i} iceberg{i}" for i in range(700))  # ~2100 words, many chunks
    insert(live, f"{topic}/long", "A very long row", words, topic)
    insert(live, f"{topic}/uni", "Ünïcödé 🐋 café", "Les baleines chantent sous la banquise 🐳 — 鯨の歌", topic)

    def indexed() -> dict[str, list[dict[str, Any]]] | None:
        got = rows_of(live, "narwhals fjord glacier iceberg baleines 🐳", topic, k=50)
        return got if {f"{topic}/null", f"{topic}/long", f"{topic}/uni"} <= set(got) else None

    got = poll(indexed, "all three rows")
    assert got[f"{topic}/null"][0]["text"] == "Only a title about narwhals"
    long_hit = got[f"{topic}/long"][0]
    assert long_hit["chunk_count"] > 10
    assert "🐳" in got[f"{topic}/uni"][0]["text"]
    # shrink the long row: the surplus chunks disappear
    live.sql("UPDATE public.docs SET body = 'short now' WHERE id = %s", (f"{topic}/long",))

    def shrunk() -> bool:
        hits = rows_of(live, "A very long row short now", topic, k=50).get(f"{topic}/long", [])
        return len(hits) == 1 and hits[0]["chunk_count"] == 1

    poll(shrunk, "the long row to shrink to one chunk")


def test_unchanged_toasted_column_is_never_indexed_as_placeholder(live: LiveStack) -> None:
    topic = new_topic()
    row = f"{topic}/toast"
    # Random hex does not compress: well over the 2 kB TOAST threshold, so Postgres stores it out of line.
    body = "seabird colony census " + " ".join(secrets.token_hex(16) for _ in range(600))
    insert(live, row, "Seabird census", body, topic)
    poll(lambda: row in rows_of(live, "seabird colony census", topic), "the toasted row")
    live.sql("UPDATE public.docs SET category = 'toasted' WHERE id = %s", (row,))  # body unchanged: TOAST placeholder

    def updated() -> list[dict[str, Any]] | None:
        hits = live.search("seabird colony census", k=50, flt={"topic": topic, "category": "toasted"})
        return hits or None

    hits = poll(updated, "the metadata-only update of the toasted row")
    assert all("__debezium_unavailable_value" not in h["text"] for h in hits)
    assert any(h["text"].startswith("Seabird census") for h in hits)


def test_columns_added_and_dropped_while_running(live: LiveStack) -> None:
    topic = new_topic()
    live.sql("ALTER TABLE public.docs ADD COLUMN IF NOT EXISTS e2e_extra text")
    try:
        live.sql(
            "INSERT INTO public.docs (id, title, body, topic, category, e2e_extra) VALUES"
            " (%s, 'Tide pools', 'Anemones and hermit crabs live in tide pools.', %s, 'e2e', 'x')",
            (f"{topic}/1", topic),
        )
        poll(lambda: f"{topic}/1" in rows_of(live, "tide pool anemones", topic), "a row written with the new column")
    finally:
        live.sql("ALTER TABLE public.docs DROP COLUMN IF EXISTS e2e_extra")
    insert(live, f"{topic}/2", "Sandbars", "Longshore drift builds sandbars along the coast.", topic)
    poll(lambda: f"{topic}/2" in rows_of(live, "longshore drift sandbars", topic), "a row written after the drop")


def test_truncate_empties_only_its_table_and_later_rows_come_back(live: LiveStack) -> None:
    def rows(table: str) -> int:
        return int(live.api("/v1/index/stats").json()["tables"][table]["rows"])

    def scratch_hits(query: str) -> set[str]:
        return {h["row_id"] for h in live.search(query, k=20, flt={"table": "public.scratch"})}

    live.sql(
        "INSERT INTO public.scratch (id, body) SELECT g, 'quokka ' || g || ' basks on Rottnest island' "
        "FROM generate_series(1, 6) g"
    )
    poll(lambda: rows("public.scratch") == 6, "the 6 scratch rows")
    tickets = rows("public.tickets")
    live.sql("TRUNCATE public.scratch")
    poll(lambda: rows("public.scratch") == 0, "the truncate to empty the table's index")
    assert scratch_hits("quokka basks on Rottnest island") == set()
    assert rows("public.tickets") == tickets > 0  # other tables untouched
    live.sql("INSERT INTO public.scratch (id, body) VALUES (100, 'a quokka came back after the truncate')")
    poll(lambda: scratch_hits("quokka came back") == {"100"}, "a row inserted after the truncate")


def topic_offsets(live: LiveStack, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(end offset, the embedder group's committed offset) per partition of `topic`."""

    async def read() -> tuple[dict[int, int], dict[int, int]]:
        kafka = live.settings.kafka
        offsets = KafkaOffsets(kafka, EMBEDDER_GROUP)  # what the embedder's liveness checks read
        try:
            both = await offsets.read([(topic, p) for p in await topic_end_offsets(kafka, topic)])
        finally:
            await offsets.close()
        return {p: end for (_, p), (end, _) in both.items()}, {p: done for (_, p), (_, done) in both.items()}

    return asyncio.run(read())


def test_a_truncate_between_rows_on_other_partitions_leaves_exactly_the_rows_after_it(live: LiveStack) -> None:
    """One transaction inserts 12 rows, truncates, inserts 12 more. Debezium keys the rows by id over the table's
    3 partitions and puts the TRUNCATE (no key) on one of them; the worker reads them in partition order, not in
    commit order. The index must end with exactly the 12 later rows."""
    table, topic = SCRATCH_SOURCE["table"], f"{live.settings.connect.topic_prefix}.{SCRATCH_SOURCE['table']}"
    before, after = range(201, 213), range(301, 313)
    insert = "INSERT INTO public.scratch (id, body) SELECT g, 'wombat ' || g || ' digs a burrow' FROM unnest(%s) g"
    with psycopg.connect(live.settings.postgres.dsn()) as conn:  # one transaction, committed as the block ends
        conn.execute(insert, (list(before),))
        conn.execute("TRUNCATE public.scratch")
        conn.execute(insert, (list(after),))

    seen: list[Any] = []

    def drained() -> bool:
        ends, committed = topic_offsets(live, topic)
        seen[:] = [ends, committed]
        return bool(ends) and all(committed.get(p, -1) >= end for p, end in ends.items())

    try:
        poll(drained, f"the embedder to commit every offset of {topic}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (end, committed) offsets: {seen}") from None
    ends, _ = topic_offsets(live, topic)
    assert len(ends) == SCRATCH_PARTITIONS and sum(1 for end in ends.values() if end > 0) >= 2, ends

    hits = {int(h["row_id"]) for h in live.search("wombat digs a burrow", k=50, flt={"table": table})}
    assert hits == set(after)
    assert live.api("/v1/index/stats").json()["tables"][table]["rows"] == len(after)
    report = httpx.post(f"{live.settings.api.url}/v1/admin/verify", json={"table": table}, timeout=120).json()
    assert report["drift"] == 0, report
    [(lsn,)] = live.sql("SELECT lsn FROM ragtide_embedder.truncations WHERE table_name = %s", (table,))
    assert lsn > 0

    live.sql("TRUNCATE public.scratch")  # leave the table empty for the other TRUNCATE test
    poll(lambda: live.api("/v1/index/stats").json()["tables"][table]["rows"] == 0, "the scratch table to empty")
