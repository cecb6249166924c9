"""The sources config: which tables are indexed, which columns make the text, which become metadata."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import RagtideSettings, format_validation_error

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
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

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


class SourcesConfig(BaseModel):
    """The whole sources file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[SourceTable, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tables(self) -> SourcesConfig:
        seen: set[str] = set()
        for s in self.sources:
            if s.table in seen:
                raise ValueError(f"table {s.table} is listed twice")
            seen.add(s.table)
        return self

    def get(self, table: str) -> SourceTable | None:
        """The source config of `table` ('schema.table'), if indexed."""
        return next((s for s in self.sources if s.table == table), None)

    @property
    def tables(self) -> list[str]:
        """Every indexed table."""
        return [s.table for s in self.sources]

    @property
    def user_tables(self) -> list[str]:
        """The indexed tables that users search (without ragtide's own canary)."""
        return [t for t in self.tables if t != CANARY_TABLE]

    def with_canary(self) -> SourcesConfig:
        """This config plus the canary table."""
        if self.get(CANARY_TABLE):
            return self
        canary = SourceTable(table=CANARY_TABLE, key=("id",), text="{body}")
        return SourcesConfig(sources=(*self.sources, canary))


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
