"""Backfill progress as metrics: per source table, rows in Postgres (total) against rows in the live index
(done), the rate at which that gap closes, and the ETA. It covers the initial snapshot, a table added later
(incremental snapshot) and any catch-up after downtime; the reindex build has its own gauges.

Rows whose rendered text is empty are never indexed, so `done` can stay a little below `total` for good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
from prometheus_client import CollectorRegistry, Gauge

from ragtide.contracts.logging import BackgroundFailures
from ragtide.embedder.index.base import ActiveIndex
from ragtide.ingest.sources import SourcesConfig, SourceTable

log = logging.getLogger(__name__)

EXACT_COUNT_LIMIT = 1_000_000  # above this, use the planner's estimate instead of count(*)


def source_counts(dsn: str, tables: list[str], exact_up_to: int | None = EXACT_COUNT_LIMIT) -> dict[str, int]:
    """Rows per table: exact for tables up to `exact_up_to` rows (None: always), else the planner's estimate
    (pg_class.reltuples)."""
    out: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        for table in tables:
            row = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
            estimate = int(row[0]) if row else -1
            if exact_up_to is None or estimate < exact_up_to:
                exact = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # names come from the sources file
                estimate = int(exact[0]) if exact else 0
            out[table] = estimate
    return out


def counts_by_table(
    dsn_of: Callable[[str], str], sources: SourcesConfig, tables: list[str], exact_up_to: int | None = EXACT_COUNT_LIMIT
) -> dict[str, int]:
    """source_counts for table identities that may live in several source databases."""
    by_dsn: dict[str, list[SourceTable]] = {}
    for table in tables:
        source = sources.get(table)
        assert source is not None, table
        by_dsn.setdefault(dsn_of(table), []).append(source)
    out: dict[str, int] = {}
    for dsn, group in by_dsn.items():
        counts = source_counts(dsn, [s.table for s in group], exact_up_to)
        out.update({s.id: counts[s.table] for s in group})
    return out


class BackfillMonitor:
    """Samples source and index row counts; exports done / total / rows per second / ETA per table."""

    def __init__(
        self,
        active: ActiveIndex,
        tables: Callable[[], list[str]],
        count_source: Callable[[list[str]], dict[str, int]],
        registry: CollectorRegistry,
        interval_s: float = 5.0,
        failures: BackgroundFailures | None = None,
    ) -> None:
        self.failures = failures or BackgroundFailures()
        self.active = active
        self.tables = tables
        self.count_source = count_source
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}
        self.total = Gauge(
            "ragtide_backfill_source_rows", "Rows per source table in Postgres", ["table"], registry=registry
        )
        self.done = Gauge(
            "ragtide_backfill_indexed_rows", "Rows per source table in the index", ["table"], registry=registry
        )
        self.rate = Gauge(
            "ragtide_backfill_rows_per_second",
            "How fast the index is catching up with the source",
            ["table"],
            registry=registry,
        )
        self.eta = Gauge(
            "ragtide_backfill_eta_seconds",
            "Seconds until the index holds every row (0: caught up, -1: unknown)",
            ["table"],
            registry=registry,
        )

    def sample(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """One sample of every table; returns what it exported."""
        now = time.monotonic() if now is None else now
        tables = self.tables()
        totals = self.count_source(tables)
        index, _ = self.active.current()
        out: dict[str, dict[str, float]] = {}
        for table in tables:
            total, done = totals.get(table, 0), index.count({"table": table, "chunk_no": 0})
            t0, done0 = self._last.get(table, (now, done))
            rate = max(0.0, (done - done0) / (now - t0)) if now > t0 else 0.0
            eta = 0.0 if done >= total else ((total - done) / rate if rate > 0 else -1.0)
            self._last[table] = (now, done)
            self.total.labels(table).set(total)
            self.done.labels(table).set(done)
            self.rate.labels(table).set(rate)
            self.eta.labels(table).set(eta)
            out[table] = {"total": total, "done": done, "rows_per_s": rate, "eta_s": eta}
        return out

    async def run(self) -> None:
        """Sample until cancelled."""
        failures = self.failures.loop("backfill progress sample", log)
        while True:
            try:
                await asyncio.to_thread(self.sample)
                failures.recovered()
            except Exception as exc:  # Postgres restarting, a table just added: try again next round
                failures.failed(exc)
            await asyncio.sleep(self.interval_s)
