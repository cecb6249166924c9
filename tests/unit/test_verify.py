"""verify/repair: drift between source rows and the index is found exactly, and repair fixes exactly it."""

from __future__ import annotations

from typing import Any

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
