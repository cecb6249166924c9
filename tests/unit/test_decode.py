"""Decoding real Debezium envelopes (recorded from the running connector) into ChangeEvents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtide.contracts.errors import DecodeError
from ragtide.contracts.events import Op
from ragtide.ingest.decode import decode, table_of_topic

FIXTURES = Path(__file__).parents[1] / "fixtures" / "debezium"


def record(name: str) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return rec


def decode_record(name: str) -> Any:
    r = record(name)
    key = r["key"].encode() if r["key"] is not None else None
    value = r["value"].encode() if r["value"] is not None else None
    return decode(
        key,
        value,
        topic_table=table_of_topic(r["topic"], "ragtide"),
        kafka_ms=r["timestamp"],
        partition=r["partition"],
        offset=r["offset"],
    )


def test_create_carries_row_key_and_position() -> None:
    ev = decode_record("create")
    assert ev.op is Op.CREATE
    assert ev.table == "public.docs"
    assert ev.key == {"id": "fx/1"}
    assert ev.row is not None and ev.row["title"] == "Fixture title"
    assert "🚀" in ev.row["body"]  # surrogate pairs in the JSON decode to the real emoji
    assert ev.position.lsn > 0 and ev.position.ts_ms > 0
    assert ev.emitted_ms >= ev.position.ts_ms
    assert ev.row_id == "fx/1"


def test_updates_and_delete_keep_wal_order() -> None:
    create, text, meta, delete = (decode_record(n) for n in ("create", "update_text", "update_metadata", "delete"))
    assert [e.op for e in (create, text, meta, delete)] == [Op.CREATE, Op.UPDATE, Op.UPDATE, Op.DELETE]
    assert create.position < text.position < meta.position < delete.position
    assert text.row["body"] == "Updated body"
    assert meta.row["category"] == "statements"
    assert delete.row is None and delete.key == {"id": "fx/1"}


def test_truncate_has_no_key() -> None:
    ev = decode_record("truncate")
    assert ev.op is Op.TRUNCATE
    assert ev.table == "public.docs"
    assert ev.row is None


def test_tombstone_is_a_delete_of_the_topic_table() -> None:
    ev = decode(b'{"id": 7}', None, topic_table="public.docs")
    assert ev is not None and ev.op is Op.DELETE and ev.key == {"id": 7} and ev.extra["tombstone"]


def test_schema_wrapped_envelope_is_unwrapped() -> None:
    r = record("create")
    wrapped = json.dumps({"schema": {"type": "struct"}, "payload": json.loads(r["value"])}).encode()
    key = json.dumps({"schema": {}, "payload": {"id": "fx/1"}}).encode()
    ev = decode(key, wrapped)
    assert ev is not None and ev.op is Op.CREATE and ev.key == {"id": "fx/1"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2]", "JSON list"),
        (b'{"op": "x", "source": {"schema": "public", "table": "docs"}}', "unknown op"),
        (b'{"after": {}}', "unknown op"),
        (b'{"op": "c", "after": {"id": 1}}', "source.schema"),
        (b'{"op": "c", "after": null, "source": {"schema": "public", "table": "docs"}}', "without an 'after'"),
        (b'{"op": "c", "after": {"id": 1}, "source": {"schema": "public", "table": "docs", "lsn": "abc"}}', "numeric"),
    ],
)
def test_malformed_records_raise_decode_error(value: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(b'{"id": 1}', value, topic_table="public.docs")


def test_keyless_row_event_is_rejected() -> None:
    r = record("create")
    with pytest.raises(DecodeError, match="primary key"):
        decode(None, r["value"].encode())


def test_tombstone_without_key_is_rejected() -> None:
    with pytest.raises(DecodeError, match="tombstone"):
        decode(None, None, topic_table="public.docs")


def test_table_of_topic() -> None:
    assert table_of_topic("ragtide.public.docs", "ragtide") == "public.docs"
    assert table_of_topic("__debezium-heartbeat.ragtide", "ragtide") is None
    assert table_of_topic("other.public.docs", "ragtide") is None
    assert table_of_topic("ragtide.billing.public.docs", "ragtide") == "billing.public.docs"  # another database
    assert table_of_topic("ragtide.dlq", "ragtide") is None


def test_a_table_of_another_source_database_is_named_by_its_topic() -> None:
    r = record("create")
    ev = decode(r["key"].encode(), r["value"].encode(), topic_table="billing.public.docs")
    assert ev is not None and ev.table == "billing.public.docs"
    other = decode(r["key"].encode(), r["value"].encode(), topic_table="billing.public.other")
    assert other is not None and other.table == "public.docs"  # a topic that does not end with the table: ignored


def test_snapshot_read_is_marked_as_backfill() -> None:
    ev = decode_record("snapshot_read")
    assert ev.op is Op.READ and ev.op.writes_row
    assert ev.extra.get("snapshot") in {"first", "true", "last", "first_in_data_collection", "last_in_data_collection"}
    assert ev.row is not None and ev.row["id"] == ev.key["id"]


def test_unchanged_toast_column_arrives_as_the_placeholder() -> None:
    from ragtide.ingest.sources import UNAVAILABLE

    ev = decode_record("update_toast_unchanged")
    assert ev.op is Op.UPDATE and ev.row is not None
    assert ev.row["body"] == UNAVAILABLE and ev.row["category"] == "b"
