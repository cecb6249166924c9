"""Read the current state of source tables straight from Postgres (for verify and repair)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ragtide.contracts.events import SourcePosition
from ragtide.ingest.sources import SourceTable


def read_rows(dsn: str, source: SourceTable, batch: int = 2000) -> tuple[SourcePosition, Iterator[dict[str, Any]]]:
    """All rows of a source table in one REPEATABLE READ snapshot, and the WAL position of that snapshot.

    Every change committed before the snapshot has a smaller LSN than the returned position, so rows written
    back with it win over those changes and lose to any later ones (the writer's source-position guard).
    """
    conn = psycopg.connect(dsn, row_factory=dict_row)
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    pos = conn.execute(
        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn AS lsn, (extract(epoch from now()) * 1000)::bigint AS ts"
    ).fetchone()
    assert pos is not None
    position = SourcePosition(int(pos["lsn"]), int(pos["ts"]))
    schema, table = source.table.split(".")

    def rows() -> Iterator[dict[str, Any]]:
        try:
            with conn.cursor(name="ragtide_verify") as cur:
                cur.itersize = batch
                cur.execute(sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
                yield from cur
        finally:
            conn.rollback()
            conn.close()

    return position, rows()
