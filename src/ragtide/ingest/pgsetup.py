"""ragtide's objects in the source database, and their removal.

In the source database ragtide owns one schema, `ragtide` (only when `postgres.source_writes`):
- `ragtide.heartbeat`: written by Debezium's heartbeat.action.query, so the slot advances while the indexed
  tables are idle;
- `ragtide.canary`: the freshness canary, a row per API process, indexed like a source table;
- `ragtide.debezium_signal`: Debezium's signal table (incremental snapshots of tables added later).

ragtide's state (schemas `ragtide_gateway` and `ragtide_embedder`) lives in `postgres.state()`: the source database
unless `postgres.state_dsn` names another. Outside the database: the replication slot and the publication.
"""

from __future__ import annotations

import psycopg

from ragtide.contracts.settings import RagtideSettings
from ragtide.ingest.sources import CANARY_TABLE, SourcesConfig

CONTROL_SCHEMA = "ragtide"
HEARTBEAT_TABLE = f"{CONTROL_SCHEMA}.heartbeat"
SIGNAL_TABLE = f"{CONTROL_SCHEMA}.debezium_signal"
STATE_SCHEMAS = ("ragtide_gateway", "ragtide_embedder")

CONTROL_TABLES = {  # created by ragtide, or beforehand by the database owner (control_script) for a role that may not
    HEARTBEAT_TABLE: "(id int PRIMARY KEY, ts timestamptz NOT NULL)",
    CANARY_TABLE: "(id int PRIMARY KEY, body text NOT NULL, ts timestamptz)",
    SIGNAL_TABLE: "(id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048) NULL)",
}


def control_script(role: str) -> str:
    """What a database owner runs so that `role` (which may not create schemas) can use ragtide's control tables."""
    tables = "".join(f" CREATE TABLE IF NOT EXISTS {t} {cols};" for t, cols in CONTROL_TABLES.items())
    return (
        f"CREATE SCHEMA IF NOT EXISTS {CONTROL_SCHEMA};{tables} GRANT USAGE ON SCHEMA {CONTROL_SCHEMA} TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {CONTROL_SCHEMA} TO {role};"
    )


HEARTBEAT_QUERY = (
    f"INSERT INTO {HEARTBEAT_TABLE} (id, ts) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts"
)

PRIMARY_KEY_SQL = """SELECT a.attname FROM pg_index i
   JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
   WHERE i.indisprimary AND n.nspname = %s AND c.relname = %s
   ORDER BY array_position(i.indkey, a.attnum)"""


def primary_key(conn: psycopg.Connection[tuple[object, ...]], table: str) -> tuple[str, ...]:
    """The primary-key columns of `table` ('schema.table'), in order; () when it has none."""
    schema, name = table.split(".")
    return tuple(str(r[0]) for r in conn.execute(PRIMARY_KEY_SQL, (schema, name)).fetchall())


def publication_tables(settings: RagtideSettings, sources: SourcesConfig) -> list[str]:
    """Every table the publication must carry: the sources (with the canary) and the signal table."""
    return [*sources.pg_tables, *([SIGNAL_TABLE] if settings.postgres.source_writes else [])]


def unpublished(conn: psycopg.Connection[tuple[object, ...]], publication: str, tables: list[str]) -> list[str] | None:
    """Those of `tables` that `publication` does not publish; None when it does not exist."""
    row = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if row is None:
        return None
    if row[0]:
        return []
    published = {
        f"{r[0]}.{r[1]}"
        for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (publication,)
        )
    }
    return [t for t in tables if t not in published]


def publication_covers(dsn: str, publication: str, tables: list[str]) -> bool:
    """True when `publication` exists and publishes every one of `tables`: Debezium then leaves it alone
    (publication.autocreate.mode=disabled), so a role that does not own the tables can stream them."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return unpublished(conn, publication, tables) == []


def prepare_source_db(settings: RagtideSettings) -> None:
    """Create ragtide's control tables, unless the source is read-only. The doctor (ingest.doctor) has checked the
    database first: each source table, its key, and whether this role may create these."""
    if not settings.postgres.source_writes:
        return
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
        # Only what is missing: a schema the database owner prepared (control_script) may not be ours to alter.
        if conn.execute("SELECT to_regnamespace(%s)", (CONTROL_SCHEMA,)).fetchone() == (None,):
            conn.execute(f"CREATE SCHEMA {CONTROL_SCHEMA}")
        for table, columns in CONTROL_TABLES.items():
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
                conn.execute(f"CREATE TABLE IF NOT EXISTS {table} {columns}")


def drop_schemas(dsn: str, schemas: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """DROP SCHEMA ... CASCADE for those of `schemas` that exist and this role owns; returns (dropped, the SQL for
    those another role owns)."""
    dropped: list[str] = []
    refused: list[str] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        present = conn.execute(
            "SELECT nspname, pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = ANY(%s)",
            (list(schemas),),
        ).fetchall()
        for schema, owned in present:
            drop = f"DROP SCHEMA {schema} CASCADE;"  # ragtide's own names, plain identifiers
            if owned:
                conn.execute(drop)
                dropped.append(str(schema))
            else:
                refused.append(drop)
    return dropped, refused
