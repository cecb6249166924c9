"""Where each table's last TRUNCATE position is kept, so that every embedder, and every restart, can refuse the
events from before it.

Debezium keys row events by primary key, so one row's changes stay in order on one partition. A TRUNCATE has no
key and lands on one partition of its table's topic. With more than one partition, the row events around it are
consumed in no fixed order relative to it: an insert committed after the TRUNCATE can be applied before it, and
one committed before it can be applied after it, possibly by another worker of the group, or after a restart.
So the writer (`IndexWriter`):
- deletes only the table's points written from positions before the truncate's, not the whole table;
- refuses any event from before a table's last truncate, which needs that position after the truncate's points
  are gone. It must outlive the process and be seen by every worker, hence `TruncateLog`.

`PostgresTruncateLog` keeps it in the source database, in schema `ragtide_embedder`, which is outside Debezium's
publication. The test double is `tests.doubles.MemoryTruncateLog`. With one partition per topic nothing can be
reordered, but the log is cheap (one indexed read per batch), so the writer always uses it when it is given one.
"""

from __future__ import annotations

from typing import Any, Protocol

from ragtide.contracts.events import SourcePosition
from ragtide.contracts.pg import SerialConnection


class TruncateLog(Protocol):
    """Per source table, the position of its newest TRUNCATE."""

    def record(self, table: str, position: SourcePosition) -> None:
        """Remember that `table` was truncated at `position` (an older position than the stored one is ignored)."""
        ...

    def positions(self) -> dict[str, SourcePosition]:
        """Every table's newest truncate position."""
        ...


DDL = [
    "CREATE SCHEMA IF NOT EXISTS ragtide_embedder",
    """CREATE TABLE IF NOT EXISTS ragtide_embedder.truncations (
         table_name text PRIMARY KEY, lsn bigint NOT NULL, ts_ms bigint NOT NULL,
         recorded_at timestamptz NOT NULL DEFAULT now())""",
]


class PostgresTruncateLog:
    """The real log. Postgres being unreachable raises `StoreUnavailable`: the worker retries the batch and commits
    nothing, as when the vector store is down (refusing to guess keeps the index exact)."""

    def __init__(self, dsn: str) -> None:
        self._db = SerialConnection(dsn, setup=DDL, name="truncate log")

    def _run(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return self._db.run(sql, params)

    def record(self, table: str, position: SourcePosition) -> None:
        """Upsert, keeping the newer position."""
        self._run(
            "INSERT INTO ragtide_embedder.truncations AS t (table_name, lsn, ts_ms) VALUES (%s, %s, %s) "
            "ON CONFLICT (table_name) DO UPDATE SET lsn = EXCLUDED.lsn, ts_ms = EXCLUDED.ts_ms, recorded_at = now() "
            "WHERE (EXCLUDED.lsn, EXCLUDED.ts_ms) > (t.lsn, t.ts_ms)",
            (table, position.lsn, position.ts_ms),
        )

    def positions(self) -> dict[str, SourcePosition]:
        """All of them (one row per truncated table)."""
        rows = self._run("SELECT table_name, lsn, ts_ms FROM ragtide_embedder.truncations")
        return {r["table_name"]: SourcePosition(int(r["lsn"]), int(r["ts_ms"])) for r in rows}

    def close(self) -> None:
        """Close the connection."""
        self._db.close()
