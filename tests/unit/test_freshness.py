"""Per-change stage timings, percentiles and the tracker's snapshot."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ragtide.contracts.freshness import ChangeTiming, FreshnessTracker, percentile, summarize


def timing(source: int, row: str = "1") -> ChangeTiming:
    # commit, +20 emitted, +30 kafka, +40 dequeued, +100 embedded, +10 acked
    return ChangeTiming(
        "public.docs", row, "u", source, source + 20, source + 50, source + 90, source + 190, source + 200
    )


def test_stages_add_up_to_end_to_end() -> None:
    t = timing(1_000)
    stages = t.stages()
    assert stages == {"debezium": 0.02, "kafka": 0.03, "consume": 0.04, "embed": 0.1, "store": 0.01}
    assert abs(sum(stages.values()) - t.end_to_end_s) < 1e-9


def test_clock_skew_never_gives_negative_stages() -> None:
    t = ChangeTiming("t", "1", "c", 1000, 990, 995, 1010, 1020, 1030)  # the JVM's clock 10 ms behind Postgres'
    stages = t.stages()
    assert stages["debezium"] == 0.0  # -10 ms, clamped
    assert stages == pytest.approx({"debezium": 0.0, "kafka": 0.005, "consume": 0.015, "embed": 0.01, "store": 0.01})


def test_percentiles() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([], 50) is None
    assert summarize([3.0, 1.0, 2.0]) == {"count": 3, "p50": 2.0, "p95": 3.0, "p99": 3.0, "max": 3.0}


def test_tracker_snapshot_and_histograms() -> None:
    registry = CollectorRegistry()
    tracker = FreshnessTracker(registry)
    now = 10_000_000
    tracker.record([timing(now - 5_000 + i * 10, str(i)) for i in range(10)])
    tracker.record([timing(now - 500_000, "old")])  # outside the 60 s window
    tracker.record_canary(0.25, at_ms=now - 1_000)
    snap = tracker.snapshot(window_s=60, now_ms=now)
    assert snap["changes"]["count"] == 10 and abs(snap["changes"]["p99"] - 0.2) < 1e-9
    assert snap["stages"]["embed"]["p50"] == 0.1
    assert snap["canary"]["last_s"] == 0.25 and snap["canary"]["history"] == [[now - 1_000, 0.25]]
    assert snap["newest"][0]["row_id"] == "9"
    assert registry.get_sample_value("ragtide_freshness_seconds_count") == 11
    assert registry.get_sample_value("ragtide_stage_seconds_count", {"stage": "store"}) == 11
    assert registry.get_sample_value("ragtide_canary_last_seconds") == 0.25
    assert len(tracker.changes(since_ms=now - 10_000)) == 10
