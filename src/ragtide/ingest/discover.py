"""`ragtide init`: read an existing database's tables and propose a sources file for the ones a user picks.

For each table the connecting role can read: its primary key, an estimate of its rows, its text-like columns
(which make the text template) and its low-cardinality columns (which become filterable metadata). A table
without a primary key is listed with that reason and never proposed: updates and deletes could not be matched to
indexed rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from ragtide.contracts.errors import ConfigError
from ragtide.ingest import pgsetup
from ragtide.ingest.sources import SourcesConfig, SourceTable

TEXT_TYPES = ("text", "character varying", "character", "citext", "name")
METADATA_TYPES = (*TEXT_TYPES, "boolean", "smallint", "integer", "bigint", "date")
LOW_CARDINALITY = 50  # distinct values at most for a metadata column
MAX_METADATA_CHARS = 64  # longer values are text, however few
SAMPLE_ROWS = 10_000  # rows read to estimate a column's distinct values and lengths
SOURCE_NAME = re.compile(SourceTable.model_fields["table"].metadata[0].pattern)
SKIPPED_SCHEMAS = ("pg_catalog", "information_schema", pgsetup.CONTROL_SCHEMA, *pgsetup.STATE_SCHEMAS)

_TABLES_SQL = """
SELECT n.nspname, c.relname, c.reltuples::bigint, has_table_privilege(c.oid, 'SELECT'), c.relkind = 'p'
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
   AND has_schema_privilege(n.oid, 'USAGE')
 ORDER BY 1, 2"""

_COLUMNS_SQL = """
SELECT attname, format_type(atttypid, NULL) FROM pg_attribute
 WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"""


@dataclass
class TableInfo:
    """What `init` knows of one table."""

    table: str
    key: tuple[str, ...]
    rows: int  # an estimate (statistics), or an exact count up to SAMPLE_ROWS
    columns: dict[str, str]  # name -> type
    readable: bool = True
    partitioned: bool = False
    text_columns: list[str] = field(default_factory=list)
    metadata_columns: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> str | None:
        """Why this table is not offered, or None."""
        if not self.readable:
            return f"this role may not read it (GRANT SELECT ON {self.table} TO <role>; to index it)"
        if self.partitioned:
            return "a partitioned table: its changes arrive under its partitions' names (index the partitions instead)"
        if not SOURCE_NAME.match(self.table):
            return "its name needs quoting (sources take lower-case schema.table names)"
        if not self.key:
            return f"no primary key (ALTER TABLE {self.table} ADD PRIMARY KEY (...) to index it)"
        if not self.text_columns:
            return "no text column to index"
        return None


def _sample(conn: psycopg.Connection[tuple[Any, ...]], table: str, column: str) -> tuple[int, int]:
    """(distinct values, longest value in characters) of a column, over at most SAMPLE_ROWS rows."""
    schema, name = table.split(".")
    query = sql.SQL(
        "SELECT count(DISTINCT {c}), coalesce(max(length({c}::text)), 0) FROM (SELECT {c} FROM {t} LIMIT %s) s"
    ).format(c=sql.Identifier(column), t=sql.Identifier(schema, name))
    row = conn.execute(query, (SAMPLE_ROWS,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def discover(dsn: str) -> list[TableInfo]:
    """Every table the role may read, outside the system and ragtide's own schemas."""
    found: list[TableInfo] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        listed = conn.execute(_TABLES_SQL, (list(SKIPPED_SCHEMAS),)).fetchall()
        for schema, name, reltuples, readable, partitioned in listed:
            table = f"{schema}.{name}"
            if not readable or partitioned:
                found.append(TableInfo(table, (), 0, {}, readable=bool(readable), partitioned=bool(partitioned)))
                continue
            regclass = sql.Identifier(schema, name).as_string(conn)
            rows = int(reltuples)
            if rows < 0:  # never analyzed: count, up to the sample size
                query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT %s) s").format(
                    sql.Identifier(schema, name)
                )
                counted = conn.execute(query, (SAMPLE_ROWS,)).fetchone()
                rows = int(counted[0]) if counted else 0
            info = TableInfo(table, pgsetup.primary_key(conn, table), rows, {})
            for column, type_ in conn.execute(_COLUMNS_SQL, (regclass,)).fetchall():
                info.columns[str(column)] = str(type_)
                if column in info.key or type_ not in METADATA_TYPES:
                    continue
                distinct, longest = _sample(conn, table, str(column))
                few = 0 < distinct <= LOW_CARDINALITY and min(rows, SAMPLE_ROWS) >= 2 * distinct
                if few and longest <= MAX_METADATA_CHARS:
                    info.metadata_columns.append(str(column))
                elif type_ in TEXT_TYPES:
                    info.text_columns.append(str(column))
            found.append(info)
    return found


def propose(tables: Sequence[TableInfo], picked: Sequence[str], tenant_column: str | None = None) -> SourcesConfig:
    """A sources config for `picked` tables: text from their text columns, metadata from their low-cardinality
    ones, and `tenant_column` where a table has it. A picked table that cannot be indexed is a ConfigError
    saying why."""
    by_name = {t.table: t for t in tables}
    chosen: list[SourceTable] = []
    for name in picked:
        info = by_name.get(name)
        if info is None:
            raise ConfigError(f"table {name} does not exist or this role may not read it; tables: {sorted(by_name)}")
        if info.skipped:
            raise ConfigError(f"table {name} cannot be indexed: {info.skipped}")
        tenant = tenant_column if tenant_column and tenant_column in info.columns else None
        text = [c for c in info.text_columns if c != tenant]
        if not text:
            raise ConfigError(f"table {name} cannot be indexed: its only text column is the tenant column")
        chosen.append(
            SourceTable(
                table=name,
                key=info.key,
                text="\n\n".join(f"{{{c}}}" for c in text),
                metadata=tuple(c for c in info.metadata_columns if c != tenant),
                tenant_column=tenant,
            )
        )
    if not chosen:
        raise ConfigError("no table picked")
    return SourcesConfig(sources=tuple(chosen))


HEADER = """\
# Which tables ragtide indexes, and how a row becomes text. Written by `ragtide init`; edit freely.
#
# table:          "schema.table" (must have a primary key)
# key:            the primary-key columns, in order
# text:           a template over column names; a NULL column renders as empty text
# metadata:       columns copied into each chunk's payload, filterable in /v1/search ("filter")
# tenant_column:  optional; a column whose value scopes every search to one tenant
#
# Next: `ragtide doctor`, then `make up SOURCE_DSN=...` (see the README, "Index your own database").
"""


def write_sources(config: SourcesConfig, path: Path) -> Path:
    """The config as YAML with a commented header."""
    body = {"sources": [s.model_dump(exclude_defaults=True, mode="json") for s in config.sources]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
