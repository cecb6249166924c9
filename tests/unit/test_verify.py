"""verify/repair: drift between source rows and the index is found exactly, and repair fixes exactly it."""

from __future__ import annotations

from typing import Any

import pytest

from ragtide.contracts.errors import ClientError
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.verify import verify_table
from ragtide.embedder.writer import IndexWriter
from ragtide.ingest.sources import SourcesConfig
from tests.doubles import HashEncoder, word_chunker

SOURCES = SourcesConfig.model_validate(
    {"sources": [{"table": "public.docs", "key": ["id"], "text": "{title} {body}", "metadata": ["category"]}]}
)
SRC = SOURCES.sources[0]


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "title": f"t{i}", "body": f"body of row {i} " * 3, "category": "a"} for i in range(n)]


def setup(n: int = 6) -> tuple[MemoryIndex, IndexWriter, list[dict[str, Any]]]:
    index, encoder = MemoryIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(6, 1), SOURCES)
    data = rows(n)
    writer.apply(
        [ChangeEvent("public.docs", Op.CREATE, {"id": r["id"]}, r, SourcePosition(100 + r["id"], 1)) for r in data]
    )
    return index, writer, data


def test_no_drift_when_index_equals_source() -> None:
    index, writer, data = setup()
    report = verify_table(SRC, SourcePosition(1_000, 2), data, index, writer)
    assert report.drift == 0 and report.rows == 6 and report.points == index.count()


def test_missing_stale_orphaned_are_found_and_repaired() -> None:
    index, writer, data = setup()
    index.delete_where({"row_key": "public.docs:1"})  # missing
    data[2] = {**data[2], "body": "edited behind our back"}  # stale text
    data[3] = {**data[3], "category": "b"}  # stale metadata
    some = index.scroll({"row_key": "public.docs:4"})
    index.delete([p.id for p in some if p.payload["chunk_no"] == 1])  # stale: a chunk is gone
    current = [r for r in data if r["id"] != 5]  # row 5 deleted in the source: orphaned
    report = verify_table(SRC, SourcePosition(1_000, 2), current, index, writer)
    assert (report.missing, sorted(report.stale), report.orphaned) == (["1"], ["2", "3", "4"], ["5"])
    assert report.as_dict()["drift"] == 5

    fixed = verify_table(SRC, SourcePosition(1_000, 2), current, index, writer, repair=True)
    assert fixed.repaired == 5
    again = verify_table(SRC, SourcePosition(1_001, 2), current, index, writer)
    assert again.drift == 0
    assert index.count({"metadata.category": "b"}) > 0


def test_rows_newer_than_the_snapshot_are_not_orphans() -> None:
    index, writer, data = setup(3)
    # row 2 was indexed from a change newer (lsn 102) than the snapshot (lsn 101) that does not include it yet
    report = verify_table(SRC, SourcePosition(101, 2), data[:2], index, writer, repair=True)
    assert report.orphaned == [] and index.count({"row_key": "public.docs:2"}) > 0


def test_rows_from_an_incremental_snapshot_read_after_the_snapshot_are_not_orphans() -> None:
    index, writer, data = setup(2)
    late = {"id": 7, "title": "t7", "body": "inserted after the verify snapshot", "category": "a"}
    writer.apply([ChangeEvent("public.docs", Op.READ, {"id": 7}, late, SourcePosition(0, 5_000))])  # no LSN
    report = verify_table(SRC, SourcePosition(1_000, 4_000), data, index, writer, repair=True)
    assert report.orphaned == [] and index.count({"row_key": "public.docs:7"}) > 0
    # ...while one read before the snapshot, and gone from the source, is an orphan.
    report = verify_table(SRC, SourcePosition(1_000, 6_000), data, index, writer)
    assert report.orphaned == ["7"]


class DeletesDuringRepair:
    """A writer whose stream deletes rows (or truncates the table) after the repair read its snapshot and
    before its writes land: the race that once resurrected deleted rows."""

    def __init__(self, writer: IndexWriter, stream: list[ChangeEvent]) -> None:
        self.writer = writer
        self.chunker = writer.chunker
        self.stream = stream

    def apply(self, events: Any) -> Any:
        if self.stream:
            self.writer.apply(self.stream)
            self.stream = []
        return self.writer.apply(events)


def test_repair_does_not_resurrect_rows_the_stream_deleted_after_its_snapshot() -> None:
    index, writer, data = setup(4)
    index.delete_where({"row_key": "public.docs:1"})  # drift: missing, so repair will write row 1...
    data[2] = {**data[2], "body": "edited behind our back"}  # ...and stale, so repair will rewrite row 2
    snapshot = SourcePosition(1_000, 2)
    stream = [  # committed after the snapshot, applied while the repair runs
        ChangeEvent("public.docs", Op.DELETE, {"id": 1}, None, SourcePosition(1_010, 3)),
        ChangeEvent("public.docs", Op.DELETE, {"id": 2}, None, SourcePosition(1_020, 3)),
    ]
    with writer.remembering_deletes():
        report = verify_table(SRC, snapshot, data, index, DeletesDuringRepair(writer, stream), repair=True)
    assert sorted([*report.missing, *report.stale]) == ["1", "2"]
    assert index.count({"row_key": ["public.docs:1", "public.docs:2"]}) == 0  # deleted stays deleted
    assert index.count({"row_key": "public.docs:3"}) > 0
    # Without the tombstones (no repair in flight) the same older write would have gone in: they are needed.
    writer.apply([ChangeEvent("public.docs", Op.READ, {"id": 1}, data[1], snapshot)])
    assert index.count({"row_key": "public.docs:1"}) > 0


def test_repair_does_not_resurrect_a_table_the_stream_truncated_after_its_snapshot() -> None:
    index, writer, data = setup(3)
    index.delete_where({"row_key": "public.docs:0"})
    truncate = ChangeEvent("public.docs", Op.TRUNCATE, {}, None, SourcePosition(1_010, 3))
    with writer.remembering_deletes():
        verify_table(SRC, SourcePosition(1_000, 2), data, index, DeletesDuringRepair(writer, [truncate]), repair=True)
        # a row inserted after the truncate is newer than it, and written
        fresh = {"id": 9, "title": "t9", "body": "after the truncate", "category": "a"}
        writer.apply([ChangeEvent("public.docs", Op.CREATE, {"id": 9}, fresh, SourcePosition(1_020, 4))])
    assert [p.payload["row_id"] for p in index.scroll()] == ["9"]


class RefusingEncoder(HashEncoder):
    """An encoder that refuses one text, as an embeddings provider refuses an input it cannot embed (422)."""

    def encode(self, texts: Any) -> Any:
        if any("REFUSED" in t for t in texts):
            raise ClientError("embeddings provider refused the input (422): too long")
        return super().encode(texts)


def test_a_row_the_encoder_refuses_is_reported_and_does_not_stop_the_rest_of_the_repair() -> None:
    index, encoder = MemoryIndex(), RefusingEncoder()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(6, 1), SOURCES)
    data = rows(6)
    data[2] = {**data[2], "body": "REFUSED text"}
    fixed = verify_table(SRC, SourcePosition(1_000, 2), data, index, writer, repair=True)
    assert fixed.repaired == 5 and list(fixed.unrepairable) == ["2"] and "too long" in fixed.unrepairable["2"]
    again = verify_table(SRC, SourcePosition(1_001, 2), data, index, writer)
    assert again.missing == ["2"] and again.drift == 1  # still drift: a build with it is never switched live
    assert fixed.as_dict()["unrepairable"] == {"2": fixed.unrepairable["2"]}


def test_a_repair_whose_every_row_fails_stops_with_the_error_rather_than_reporting_each_row() -> None:
    index, encoder = MemoryIndex(), RefusingEncoder()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(6, 1), SOURCES)
    data = [{**r, "body": "REFUSED"} for r in rows(4)]  # not about a row: everything fails
    with pytest.raises(ClientError, match="refused"):
        verify_table(SRC, SourcePosition(1_000, 2), data, index, writer, repair=True)
