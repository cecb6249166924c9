"""Backfill progress gauges: done / total per table, the catch-up rate, and the ETA."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from ragtide.embedder.index.base import FixedIndex, IndexPoint
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.progress import BackfillMonitor
from tests.doubles import HashEncoder


def add_rows(index: MemoryIndex, table: str, start: int, n: int) -> None:
    index.upsert(
        [
            IndexPoint(f"{table}-{i}", np.ones(4, dtype=np.float32), {"table": table, "chunk_no": 0})
            for i in range(start, start + n)
        ]
    )


def test_progress_reports_done_total_rate_and_eta() -> None:
    index = MemoryIndex()
    index.ensure_collection(4)
    registry = CollectorRegistry()
    totals = {"public.docs": 100, "public.notes": 10}
    monitor = BackfillMonitor(FixedIndex(index, HashEncoder(4)), lambda: list(totals), lambda t: totals, registry)

    add_rows(index, "public.docs", 0, 20)
    add_rows(index, "public.notes", 0, 10)
    first = monitor.sample(now=100.0)
    assert first["public.docs"]["done"] == 20 and first["public.docs"]["eta_s"] == -1  # no rate yet
    assert first["public.notes"]["eta_s"] == 0  # caught up

    add_rows(index, "public.docs", 20, 40)  # 40 rows in 10 s: 4 rows/s, 40 left: 10 s
    second = monitor.sample(now=110.0)
    assert second["public.docs"] == {"total": 100, "done": 60, "rows_per_s": 4.0, "eta_s": 10.0}
    value = registry.get_sample_value("ragtide_backfill_eta_seconds", {"table": "public.docs"})
    assert value == 10.0
    assert registry.get_sample_value("ragtide_backfill_source_rows", {"table": "public.docs"}) == 100
