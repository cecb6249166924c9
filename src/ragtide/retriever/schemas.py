"""Request and response models of the retrieval API."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

FilterScalar = str | int | bool


class SearchRequest(BaseModel):
    """POST /v1/search."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=2000, description="natural-language query")
    k: int | None = Field(None, ge=1, le=1000, description="number of hits (default from settings)")
    filter: dict[str, FilterScalar | list[FilterScalar]] | None = Field(
        None, description="metadata column -> value (or list of values, any of); 'table' filters by source table"
    )

    @field_validator("query")
    @classmethod
    def _clean(cls, value: str) -> str:
        value = _CONTROL.sub("", value).strip()
        if not value:
            raise ValueError("query is empty after removing whitespace and control characters")
        return value


class SearchHit(BaseModel):
    """One retrieved chunk."""

    id: str
    score: float
    text: str
    table: str
    key: dict[str, Any]
    row_id: str
    chunk_no: int
    chunk_count: int
    metadata: dict[str, Any]
    source_commit_ts: str | None = Field(description="when the row version was committed in Postgres (UTC)")
    indexed_at: str | None = Field(description="when this chunk was written to the index (UTC)")
    age_s: float | None = Field(description="seconds since the row version was committed")


class SearchResponse(BaseModel):
    """POST /v1/search response."""

    query: str
    k: int
    hits: list[SearchHit]
    took_ms: float


class Health(BaseModel):
    """GET /healthz and /readyz."""

    status: str
    checks: dict[str, str] = {}


class TableStats(BaseModel):
    """Indexed rows and chunks of one table."""

    rows: int
    chunks: int


class IndexStats(BaseModel):
    """GET /v1/index/stats."""

    points: int
    tables: dict[str, TableStats]
    generation: dict[str, Any] | None = Field(
        None, description="the live generation (model, chunking) and the one being built, with its progress"
    )
