"""One small Postgres connection for a service's own bookkeeping (gateway keys and usage, truncate positions):
serialised by a lock, autocommit, and reopened once when Postgres restarted under it. Every statement these
callers run touches a single indexed row, so one connection is all they need."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ragtide.contracts.errors import StoreUnavailable


class SerialConnection:
    """`run(sql, params)` -> the rows as dicts ([] for statements that return none). `setup` (idempotent DDL:
    the caller's schema) runs once, before the first statement, so an upgrade finds its new tables."""

    def __init__(self, dsn: str, setup: Sequence[str] = (), connect_timeout: int = 5, name: str = "Postgres") -> None:
        self.dsn = dsn
        self.name = name
        self.connect_timeout = connect_timeout
        self._setup = list(setup)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[dict[str, Any]] | None = None

    def run(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """Execute one statement. Postgres unreachable, restarting, or refusing for want of resources (psycopg's
        OperationalError: connection failures, admin shutdown, disk full, out of memory) after one reconnect raises
        `StoreUnavailable`; any other error (a bug in a statement) propagates as it is."""
        with self._lock:
            for attempt in (1, 2):  # one reconnect: Postgres may have restarted
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(
                            self.dsn, autocommit=True, connect_timeout=self.connect_timeout, row_factory=dict_row
                        )
                    while self._setup:
                        self._conn.execute(self._setup[0])
                        self._setup.pop(0)
                    cur = self._conn.execute(sql, params)
                    return cur.fetchall() if cur.description else []
                except psycopg.OperationalError as exc:
                    self._conn = None
                    if attempt == 2:
                        raise StoreUnavailable(f"{self.name} (Postgres) unavailable: {exc}".strip()) from exc
            raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (the next `run` opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
