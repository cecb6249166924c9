"""Prepare the source database for CDC: heartbeat and signal tables, replica identity of indexed tables."""

from __future__ import annotations

import psycopg

from ragtide.contracts.errors import ConfigError
from ragtide.ingest.sources import SourcesConfig

CONTROL_DDL = [
    # Written by Debezium's heartbeat.action.query so the slot advances even when captured tables are idle.
    "CREATE TABLE IF NOT EXISTS public.ragtide_heartbeat (id int PRIMARY KEY, ts timestamptz NOT NULL)",
    # The freshness canary: a row per API process, rewritten on an interval and timed until a search returns it.
    "CREATE TABLE IF NOT EXISTS public.ragtide_canary (id int PRIMARY KEY, body text NOT NULL, ts timestamptz)",
    # Debezium's signal table (incremental snapshots of tables added later).
    "CREATE TABLE IF NOT EXISTS public.debezium_signal"
    " (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048) NULL)",
]


def prepare_source_db(dsn: str, sources: SourcesConfig) -> None:
    """Create control tables; check each source table exists and has the configured primary key."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for ddl in CONTROL_DDL:
            conn.execute(ddl)
        for src in sources.sources:
            schema, table = src.table.split(".")
            pk = conn.execute(
                """SELECT a.attname FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
                   WHERE i.indisprimary AND n.nspname = %s AND c.relname = %s
                   ORDER BY array_position(i.indkey, a.attnum)""",
                (schema, table),
            ).fetchall()
            if not pk:
                exists = conn.execute("SELECT to_regclass(%s)", (src.table,)).fetchone()
                what = "has no primary key" if exists and exists[0] else "does not exist"
                raise ConfigError(f"sources: table {src.table} {what}")
            actual = tuple(r[0] for r in pk)
            if actual != src.key:
                raise ConfigError(f"sources: {src.table}.key is {list(src.key)} but its primary key is {list(actual)}")
