"""Decode Debezium change-event envelopes (JSON converter, schemas disabled or enabled) into ChangeEvents."""

from __future__ import annotations

import json
from typing import Any

from ragtide.contracts.errors import DecodeError
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition


def _load(raw: bytes | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"{what} is not JSON: {exc}") from exc
    # With `schemas.enable=true` the JSON converter wraps everything in {"schema":..., "payload":...}.
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        doc = doc["payload"]
    return doc


def decode(
    key: bytes | None,
    value: bytes | None,
    *,
    topic_table: str | None = None,
    kafka_ms: int = 0,
    partition: int = -1,
    offset: int = -1,
) -> ChangeEvent | None:
    """Turn one Kafka record into a ChangeEvent.

    Returns None for records that carry no change (a tombstone whose delete we already handled comes back
    as a DELETE so replays stay correct). Raises DecodeError for anything we cannot read.
    `topic_table` is the table's identity derived from the topic name ('schema.table', or 'database.schema.table'
    for another source database), used for tombstones and to tell databases apart.
    """
    key_doc = _load(key, "record key")
    value_doc = _load(value, "record value")
    if value_doc is None:
        # Tombstone after a delete: the row is gone.
        if not isinstance(key_doc, dict) or not key_doc or topic_table is None:
            raise DecodeError("tombstone without a usable key or topic")
        return ChangeEvent(
            table=topic_table,
            op=Op.DELETE,
            key=key_doc,
            row=None,
            position=SourcePosition(0, 0),
            kafka_ms=kafka_ms,
            partition=partition,
            offset=offset,
            extra={"tombstone": True},
        )
    if not isinstance(value_doc, dict):
        raise DecodeError(f"record value is a JSON {type(value_doc).__name__}, not an object")
    try:
        op = Op(value_doc["op"])
    except (KeyError, ValueError) as exc:
        raise DecodeError(f"missing or unknown op: {value_doc.get('op')!r}") from exc
    source = value_doc.get("source")
    if not isinstance(source, dict) or "table" not in source or "schema" not in source:
        raise DecodeError("envelope has no source.schema/source.table")
    table = f"{source['schema']}.{source['table']}"
    if topic_table is not None and topic_table.endswith("." + table):
        table = topic_table  # a table of another source database: '<database>.schema.table', from its topic
    try:
        position = SourcePosition(lsn=int(source.get("lsn") or 0), ts_ms=int(source.get("ts_ms") or 0))
        emitted_ms = int(value_doc.get("ts_ms") or 0)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"source position is not numeric: {exc}") from exc
    after = value_doc.get("after")
    before = value_doc.get("before")
    pk: dict[str, Any] = {}
    row: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    if op is not Op.TRUNCATE:  # a truncate names a table, not a row
        if op.writes_row and not isinstance(after, dict):
            raise DecodeError(f"op {op.value} without an 'after' row")
        if not isinstance(key_doc, dict) or not key_doc:
            raise DecodeError("record has no primary key (tables need a primary key)")
        if op is Op.DELETE and before is not None and not isinstance(before, dict):
            raise DecodeError("delete with a malformed 'before'")
        pk, row = key_doc, after if op.writes_row else None
        if source.get("snapshot") not in (None, "false"):
            extra = {"snapshot": source.get("snapshot")}
    return ChangeEvent(
        table=table,
        op=op,
        key=pk,
        row=row,
        position=position,
        emitted_ms=emitted_ms,
        kafka_ms=kafka_ms,
        partition=partition,
        offset=offset,
        extra=extra,
    )


def table_of_topic(topic: str, prefix: str) -> str | None:
    """'prefix.schema.table' -> 'schema.table', 'prefix.database.schema.table' -> 'database.schema.table' (a
    table of another source database); None for topics that are not a source table's."""
    if not topic.startswith(prefix + "."):
        return None
    rest = topic[len(prefix) + 1 :]
    return rest if rest.count(".") in (1, 2) else None
