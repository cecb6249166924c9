"""The sources config: which tables are indexed, which columns make the text, which become metadata."""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import PostgresSettings, RagtideSettings, format_validation_error

DATABASE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
UNAVAILABLE = "__debezium_unavailable_value"  # Debezium's placeholder for an unchanged TOASTed column
CANARY_TABLE = "ragtide.canary"  # written by the freshness canary, indexed like any source table (ingest.pgsetup)


class SourceTable(BaseModel):
    """One indexed table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: str = Field(pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$", description="schema.table")
    key: tuple[str, ...] = Field(min_length=1, description="primary-key columns, in order")
    text: str = Field(min_length=1, description="template over column names, e.g. '{title}\\n\\n{body}'")
    metadata: tuple[str, ...] = ()
    tenant_column: str | None = None
    database: str | None = Field(None, description="set for the tables of `databases.<name>`")

    @property
    def id(self) -> str:
        """The table's identity in the index and its topic: 'schema.table', or '<database>.schema.table'."""
        return self.table if self.database is None else f"{self.database}.{self.table}"

    @field_validator("text")
    @classmethod
    def _template_is_valid(cls, value: str) -> str:
        try:
            fields = [f for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from exc
        if not fields:
            raise ValueError("the template names no column; use e.g. '{title} {body}'")
        for f in fields:
            if not f.isidentifier():
                raise ValueError(f"'{{{f}}}' is not a plain column name")
        return value

    @property
    def text_columns(self) -> tuple[str, ...]:
        """The columns the text template reads."""
        return _template_columns(self.text)

    def render_text(self, row: dict[str, Any]) -> str:
        """The row's indexed text; NULL and missing columns render as empty."""
        values = {c: "" if row.get(c) is None else str(row[c]) for c in self.text_columns}
        return self.text.format(**values).strip()

    def render_metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row's metadata columns, as stored in the payload."""
        return {c: row.get(c) for c in self.metadata}

    def tenant_of(self, row: dict[str, Any]) -> str:
        """The row's tenant ('' when the table has no tenant column)."""
        if self.tenant_column is None:
            return ""
        value = row.get(self.tenant_column)
        return "" if value is None else str(value)


class SourceDatabase(BaseModel):
    """One more source database (`databases:` in the sources file): its own connector, slot and topic prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dsn: str = Field(min_length=1, description="libpq URL or key=value string; ${VAR} is read from the environment")
    source_writes: bool = Field(True, description="as postgres.source_writes, for this database")
    sources: tuple[SourceTable, ...] = Field(min_length=1)


class SourcesConfig(BaseModel):
    """The whole sources file: the tables of the source database (`postgres.*`), and of more databases."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[SourceTable, ...] = Field(min_length=1)
    databases: dict[str, SourceDatabase] = Field(
        default_factory=dict,
        description="more source databases by name ([a-z][a-z0-9_]*): searched with the others, filterable as "
        "{'database': name}; their tables are named '<name>.<schema>.<table>'",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_databases(cls, data: Any) -> Any:
        """Each table of `databases.<name>` carries that name (its identity is '<name>.<schema>.<table>')."""
        if not isinstance(data, dict):
            return data
        for t in data.get("sources") or ():
            if isinstance(t, dict) and "database" in t:
                raise ValueError(f"sources: {t.get('table')}: `database` is set by the `databases:` section only")
        if not isinstance(data.get("databases"), dict):
            return data
        named: dict[str, Any] = {}
        for name, db in data["databases"].items():
            if not isinstance(name, str) or not DATABASE_NAME.match(name):
                raise ValueError(f"databases: {name!r} is not a name ([a-z][a-z0-9_]*, at most 40 characters)")
            if isinstance(db, dict) and isinstance(db.get("sources"), list | tuple):
                db = {**db, "sources": [_with_database(t, name) for t in db["sources"]]}
                if isinstance(db.get("dsn"), str):
                    db["dsn"] = os.path.expandvars(db["dsn"])
            named[name] = db
        return {**data, "databases": named}

    @model_validator(mode="after")
    def _unique_tables(self) -> SourcesConfig:
        seen: set[str] = set()
        for s in self.all:
            if s.id in seen:
                raise ValueError(f"table {s.id} is listed twice")
            seen.add(s.id)
        return self

    @property
    def all(self) -> tuple[SourceTable, ...]:
        """Every table, of every database."""
        return (*self.sources, *(t for db in self.databases.values() for t in db.sources))

    def get(self, table: str) -> SourceTable | None:
        """The source config of the table with this identity ('schema.table', or '<db>.schema.table'), if indexed."""
        return next((s for s in self.all if s.id == table), None)

    @property
    def tables(self) -> list[str]:
        """Every indexed table's identity (its topic is '<topic_prefix>.<identity>')."""
        return [s.id for s in self.all]

    @property
    def pg_tables(self) -> list[str]:
        """'schema.table' of every table, as Postgres and Debezium name it (within its own database)."""
        return [s.table for s in self.all]

    @property
    def user_tables(self) -> list[str]:
        """The indexed tables that users search (without ragtide's own canary)."""
        return [t for t in self.tables if t != CANARY_TABLE]

    def with_canary(self) -> SourcesConfig:
        """This config plus the canary table (in the source database)."""
        if self.get(CANARY_TABLE):
            return self
        canary = SourceTable(table=CANARY_TABLE, key=("id",), text="{body}")
        return self.model_copy(update={"sources": (*self.sources, canary)})


@lru_cache(maxsize=256)
def _template_columns(template: str) -> tuple[str, ...]:
    """The columns a text template reads, parsed once per template (the write path asks per row)."""
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)


def _with_database(table: Any, name: str) -> Any:
    if isinstance(table, SourceTable):
        return table.model_copy(update={"database": name})
    return {**table, "database": name} if isinstance(table, dict) else table


def load_sources(path: Path, canary: bool = True) -> SourcesConfig:
    """Read and validate a sources YAML file (plus the canary table); mistakes raise ConfigError naming the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"sources file not found: {path} (set RAGTIDE_SOURCES_FILE)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"sources file {path} is not valid YAML: {exc}") from exc
    try:
        config = SourcesConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"sources file {path}")) from exc
    return config.with_canary() if canary else config


def sources_of(settings: RagtideSettings) -> SourcesConfig:
    """The configured sources, with the canary table unless the source database is read-only."""
    return load_sources(settings.sources_file, canary=settings.postgres.source_writes)


@dataclass(frozen=True)
class SourceDB:
    """One source database as its own settings: `postgres` and `connect` (connector, slot, publication, topic
    prefix) of that database, and its tables. Code that works on one database takes these."""

    name: str  # the source database's name (postgres.database), or its `databases:` key
    settings: RagtideSettings
    sources: SourcesConfig


def source_dbs(settings: RagtideSettings, sources: SourcesConfig) -> list[SourceDB]:
    """The source database (postgres.*) and each of `databases:`, with a connector, slot, publication and topic
    prefix of its own (the name appended) so that their topics are '<topic_prefix>.<name>.<schema>.<table>'."""
    primary = SourcesConfig(sources=sources.sources)
    dbs = [SourceDB(settings.postgres.database, settings, primary)]
    c = settings.connect
    for name, db in sources.databases.items():
        if name == settings.postgres.database:
            raise ConfigError(f"sources file: databases.{name}: {name} is the source database's own name; pick another")
        try:
            pg = PostgresSettings.model_validate(
                {"dsn": db.dsn, "source_writes": db.source_writes, "state_dsn": settings.postgres.state()}
            )
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"sources file: databases.{name}")) from exc
        connect = c.model_copy(
            update={
                "connector_name": f"{c.connector_name}-{name}",
                "slot_name": f"{c.slot_name}_{name}",
                "publication": f"{c.publication}_{name}",
                "topic_prefix": f"{c.topic_prefix}.{name}",
            }
        )
        view = settings.model_copy(update={"postgres": pg, "connect": connect})
        dbs.append(SourceDB(name, view, SourcesConfig(sources=db.sources)))
    return dbs


def dsn_of(settings: RagtideSettings, sources: SourcesConfig) -> Callable[[str], str]:
    """table identity -> the DSN of its database."""
    by_table = {t: db.settings.postgres.dsn() for db in source_dbs(settings, sources) for t in db.sources.tables}
    return lambda table: by_table[table]
