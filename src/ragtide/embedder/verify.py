"""Compare the source tables with the index and report drift: missing, stale and orphaned rows.

`repair` fixes exactly the drift by writing the rows' current state through the normal IndexWriter (as
snapshot reads at the snapshot's WAL position), and deleting orphans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ragtide.contracts.chunks import content_hash, row_key
from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition, row_id
from ragtide.embedder.index.base import StoredPoint, VectorIndex
from ragtide.embedder.writer import ApplyStats
from ragtide.ingest.sources import SourceTable

EXAMPLES = 10


class RowWriter(Protocol):
    """What verify needs of a writer: its chunker (to know the expected chunks) and apply (to repair)."""

    @property
    def chunker(self) -> Callable[[str], list[str]]: ...

    def apply(self, events: Sequence[ChangeEvent]) -> ApplyStats: ...


@dataclass
class TableDrift:
    """Drift of one table."""

    table: str
    rows: int = 0
    points: int = 0
    missing: list[str] = field(default_factory=list)  # rows in Postgres, nothing in the index
    stale: list[str] = field(default_factory=list)  # indexed, but chunks or metadata differ from the row
    orphaned: list[str] = field(default_factory=list)  # in the index, no longer in Postgres
    repaired: int = 0
    # rows a repair could not write, with why (e.g. an embeddings provider refusing the text): still drift. The
    # first EXAMPLES with their reasons; `unrepaired` counts them all.
    unrepairable: dict[str, str] = field(default_factory=dict)
    unrepaired: int = 0

    @property
    def drift(self) -> int:
        """How many rows are wrong."""
        return len(self.missing) + len(self.stale) + len(self.orphaned)

    def as_dict(self) -> dict[str, Any]:
        """Counts and a few examples of each kind."""
        return {
            "table": self.table,
            "rows": self.rows,
            "points": self.points,
            "drift": self.drift,
            "missing": len(self.missing),
            "stale": len(self.stale),
            "orphaned": len(self.orphaned),
            "repaired": self.repaired,
            "unrepaired": self.unrepaired,
            "unrepairable": dict(list(self.unrepairable.items())[:EXAMPLES]),
            "examples": {
                "missing": self.missing[:EXAMPLES],
                "stale": self.stale[:EXAMPLES],
                "orphaned": self.orphaned[:EXAMPLES],
            },
        }


def _expected(source: SourceTable, row: dict[str, Any], chunker: Callable[[str], list[str]]) -> dict[str, Any]:
    chunks = chunker(source.render_text(row))
    return {
        "hashes": [content_hash(c) for c in chunks],
        "metadata": source.render_metadata(row),
        "tenant": source.tenant_of(row),
    }


def _stored(points: list[StoredPoint]) -> dict[str, Any]:
    ordered = sorted(points, key=lambda p: int(p.payload.get("chunk_no", 0)))
    first = ordered[0].payload
    return {
        "hashes": [p.payload.get("hash") for p in ordered],
        "metadata": first.get("metadata") or {},
        "tenant": first.get("tenant", ""),
        "consistent": all(p.payload.get("chunk_count") == len(ordered) for p in ordered)
        and [int(p.payload.get("chunk_no", -1)) for p in ordered] == list(range(len(ordered))),
    }


def _older_than_snapshot(p: StoredPoint, position: SourcePosition) -> bool:
    """Written before the snapshot was read: by LSN, or by time for LSN-less incremental-snapshot reads."""
    lsn = int(p.payload.get("lsn", 0) or 0)
    if lsn:
        return lsn < position.lsn
    return int(p.payload.get("source_ts_ms", 0) or 0) < position.ts_ms


def verify_table(
    source: SourceTable,
    position: SourcePosition,
    rows: Iterable[dict[str, Any]],
    index: VectorIndex,
    writer: RowWriter,
    repair: bool = False,
    reembed: bool = False,
) -> TableDrift:
    """Diff one table against the index; with `repair`, fix what differs; with `reembed`, rewrite every row
    with fresh embeddings (a one-table reindex), still at the snapshot's position so newer stream states win."""
    report = TableDrift(source.id)
    by_row: dict[str, list[StoredPoint]] = defaultdict(list)
    for p in index.scroll({"table": source.id}, limit=10_000_000):
        by_row[str(p.payload.get("row_id"))].append(p)
    report.points = sum(len(v) for v in by_row.values())
    fixes: list[ChangeEvent] = []
    seen: set[str] = set()
    for row in rows:
        report.rows += 1
        key = {k: row[k] for k in source.key}
        rid = row_id(key)
        seen.add(rid)
        expected = _expected(source, row, writer.chunker)
        have = by_row.get(rid)
        if not have:
            if not expected["hashes"]:
                continue  # empty text: correctly absent
            report.missing.append(rid)
        else:
            stored = _stored(have)
            if not (
                stored["consistent"]
                and stored["hashes"] == expected["hashes"]
                and stored["metadata"] == expected["metadata"]
                and stored["tenant"] == expected["tenant"]
            ):
                report.stale.append(rid)
            elif not reembed:
                continue
        if repair or reembed:
            # Written as a snapshot read at the snapshot's position: newer stream events still win.
            extra = {"repair": True, "reembed": True} if reembed else {"repair": True}
            fixes.append(ChangeEvent(source.id, Op.READ, key, dict(row), position, extra=extra))
    # A row inserted after the snapshot may already be indexed: only points older than the snapshot are orphans.
    report.orphaned = sorted(
        r for r, pts in by_row.items() if r not in seen and all(_older_than_snapshot(p, position) for p in pts)
    )
    if repair or reembed:
        failed = 0
        for i in range(0, len(fixes), 256):
            failed += _apply_fixes(writer, fixes[i : i + 256], report)
        if report.orphaned:
            index.delete_where({"row_key": [row_key(source.id, r) for r in report.orphaned]})
        report.repaired = len(fixes) - failed + len(report.orphaned)
    return report


def _apply_fixes(writer: RowWriter, fixes: list[ChangeEvent], report: TableDrift) -> int:
    """Write a slice of repairs; a slice that fails for a reason other than a store outage (which propagates: the
    repair is retried later) is written row by row, and the rows that still fail are reported, not left to block
    the rest. A failure of every row of a slice is not about rows: it propagates. Returns how many failed."""
    try:
        writer.apply(fixes)
        return 0
    except StoreUnavailable:
        raise
    except Exception as first:
        slice_error = first  # row by row below
    failed = 0
    for fix in fixes:
        try:
            writer.apply([fix])
        except StoreUnavailable:
            raise
        except Exception as exc:
            failed += 1
            if failed == len(fixes) > 1:
                raise exc from slice_error
            report.unrepaired += 1
            if len(report.unrepairable) < EXAMPLES:
                report.unrepairable[fix.row_id] = f"{type(exc).__name__}: {exc}"[:300]
    return failed
