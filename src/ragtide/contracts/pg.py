"""One small Postgres connection for a service's own bookkeeping (gateway keys and usage, truncate positions):
serialised by a lock, autocommit, and reopened once when Postgres restarted under it. Every statement these
callers run touches a single indexed row, so one connection is all they need."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ragtide.contracts.errors import StoreUnavailable


class SerialConnection:
    """`run(sql, params)` -> the rows as dicts ([] for statements that return none). `setup` (idempotent DDL:
    the caller's schema) runs once, before the first statement, so an upgrade finds its new tables."""

    def __init__(
        self,
        dsn: str,
        setup: Sequence[str] = (),
        connect_timeout: int = 5,
        name: str = "Postgres",
        fail_fast_s: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.name = name
        self.connect_timeout = connect_timeout
        self._setup = list(setup)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        # After Postgres failed, callers within `fail_fast_s` get the same error at once instead of each waiting
        # for connection attempts of their own under the lock (every request of a gateway, say).
        self.fail_fast_s = fail_fast_s
        self._failed: tuple[float, str] | None = None

    def run(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """Execute one statement. Postgres unreachable, restarting, or refusing for want of resources (psycopg's
        OperationalError: connection failures, admin shutdown, disk full, out of memory) after one reconnect raises
        `StoreUnavailable`; any other error (a bug in a statement) propagates as it is."""
        failed = self._failed
        if failed is not None and time.monotonic() - failed[0] < self.fail_fast_s:
            raise StoreUnavailable(failed[1])
        with self._lock:
            for attempt in (1, 2):  # one reconnect: Postgres may have restarted
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(
                            self.dsn,
                            autocommit=True,
                            connect_timeout=self.connect_timeout,
                            row_factory=dict_row,
                            # a dead peer that sends nothing back is noticed in seconds, not at TCP's minutes
                            keepalives=1,
                            keepalives_idle=5,
                            keepalives_interval=2,
                            keepalives_count=2,
                            options="-c statement_timeout=10000",
                        )
                    while self._setup:
                        self._conn.execute(self._setup[0])
                        self._setup.pop(0)
                    cur = self._conn.execute(sql, params)
                    self._failed = None
                    return cur.fetchall() if cur.description else []
                except psycopg.OperationalError as exc:
                    self._conn = None
                    if attempt == 2:
                        error = StoreUnavailable(f"{self.name} (Postgres) unavailable: {exc}".strip())
                        self._failed = (time.monotonic(), str(error))
                        raise error from exc
            raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (the next `run` opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
