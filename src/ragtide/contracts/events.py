"""Our own change model: what a Debezium envelope means, independent of Debezium's wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Op(StrEnum):
    """What happened to the row."""

    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # snapshot read
    TRUNCATE = "t"

    @property
    def writes_row(self) -> bool:
        """True when the event carries the row's new state."""
        return self in (Op.CREATE, Op.UPDATE, Op.READ)


@dataclass(frozen=True, slots=True, order=True)
class SourcePosition:
    """Where in the source's history this row version comes from."""

    lsn: int
    ts_ms: int  # source commit time

    def is_older_than(self, other: SourcePosition) -> bool:
        """True when this position precedes `other` in WAL order. Without an LSN on either side there is no
        order to compare (Debezium's incremental-snapshot reads carry none): never older; topic order decides."""
        if self.lsn and other.lsn:
            return self < other
        return False


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row change of one source table.

    `key` is the primary key as column -> value; `row` the new state (None for deletes and truncates).
    """

    table: str  # "schema.table"
    op: Op
    key: dict[str, Any]
    row: dict[str, Any] | None
    position: SourcePosition
    emitted_ms: int = 0  # when Debezium produced the event
    kafka_ms: int = 0  # Kafka record timestamp
    partition: int = -1
    offset: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    _row_id: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def row_id(self) -> str:
        """Stable textual id of the row: the key values in key-column order, joined by '|'. Rendered once (the
        write path reads it several times per event); `key` is never changed after decoding."""
        rid = self._row_id
        if rid is None:
            rid = row_id(self.key)
            object.__setattr__(self, "_row_id", rid)
        return rid


def row_id(key: dict[str, Any]) -> str:
    """Render a primary key as a stable string (composite keys joined by '|')."""
    return "|".join(str(key[k]) for k in key)
