"""Freshness: per-change stage timestamps, per-stage histograms, the canary's history, and summaries.

The embedder records a ChangeTiming for each applied change; the canary records how long a committed row
took to come back from a real search. The retriever serves both (`/v1/freshness`, `/dashboard`). In the node
both sides share one tracker; a standalone retriever has the canary only.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

STAGES = ("debezium", "kafka", "consume", "embed", "store")
STAGE_HELP = {
    "debezium": "source commit -> Debezium emitted the event",
    "kafka": "Debezium emitted -> record timestamp in Kafka",
    "consume": "Kafka -> embedder dequeued the batch (includes the batch window)",
    "embed": "dequeued -> chunks embedded",
    "store": "embedded -> vector store acknowledged",
}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class ChangeTiming:
    """When one change passed each stage (epoch milliseconds)."""

    table: str
    row_id: str
    op: str
    source_ms: int
    emitted_ms: int
    kafka_ms: int
    dequeued_ms: int
    embedded_ms: int
    acked_ms: int

    @property
    def end_to_end_s(self) -> float:
        """Source commit -> searchable (store acknowledged)."""
        return max(0.0, (self.acked_ms - self.source_ms) / 1000)

    def stages(self) -> dict[str, float]:
        """Seconds spent in each stage (clamped at zero: clocks of Postgres and the JVM may differ slightly)."""
        points = (self.source_ms, self.emitted_ms, self.kafka_ms, self.dequeued_ms, self.embedded_ms, self.acked_ms)
        return {s: max(0.0, (b - a) / 1000) for s, a, b in zip(STAGES, points, points[1:], strict=False)}

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            **asdict(self),
            "end_to_end_s": round(self.end_to_end_s, 4),
            "stages": {k: round(v, 4) for k, v in self.stages().items()},
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p95, p99, max."""
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def summarize_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """`summarize` of durations in seconds, reported in milliseconds (the count stays a count)."""
    return {k: round(v * 1000, 2) if isinstance(v, float) else v for k, v in summarize(seconds).items()}


class FreshnessTracker:
    """Thread-safe ring buffers plus Prometheus histograms on the given registry."""

    def __init__(self, registry: CollectorRegistry, capacity: int = 50_000, canary_capacity: int = 2_000) -> None:
        self._lock = threading.Lock()
        self._changes: deque[ChangeTiming] = deque(maxlen=capacity)
        self._canary: deque[tuple[int, float]] = deque(maxlen=canary_capacity)
        self.stage = Histogram(
            "ragtide_stage_seconds", "seconds spent per pipeline stage", ["stage"], buckets=BUCKETS, registry=registry
        )
        self.end_to_end = Histogram(
            "ragtide_freshness_seconds",
            "source commit -> vector store ack, per change",
            buckets=BUCKETS,
            registry=registry,
        )
        self.canary_seconds = Histogram(
            "ragtide_canary_freshness_seconds",
            "canary: commit in Postgres -> returned by a real search",
            buckets=BUCKETS,
            registry=registry,
        )
        self.canary_last = Gauge("ragtide_canary_last_seconds", "latest canary freshness", registry=registry)
        self.canary_age = Gauge(
            "ragtide_canary_last_success_timestamp", "when the canary last succeeded", registry=registry
        )

    def record(self, timings: Iterable[ChangeTiming]) -> None:
        """Add applied changes."""
        timings = list(timings)
        for t in timings:
            for stage, seconds in t.stages().items():
                self.stage.labels(stage).observe(seconds)
            self.end_to_end.observe(t.end_to_end_s)
        with self._lock:
            self._changes.extend(timings)

    def record_canary(self, seconds: float, at_ms: int | None = None) -> None:
        """Add one canary round trip."""
        at = at_ms or int(time.time() * 1000)
        self.canary_seconds.observe(seconds)
        self.canary_last.set(seconds)
        self.canary_age.set(at / 1000)
        with self._lock:
            self._canary.append((at, seconds))

    def changes(self, since_ms: int = 0, limit: int | None = None) -> list[ChangeTiming]:
        """Applied changes acked at or after `since_ms`, oldest first (the last `limit` of them)."""
        with self._lock:
            out = [t for t in self._changes if t.acked_ms >= since_ms]
        return out[-limit:] if limit else out

    def canary(self, since_ms: int = 0) -> list[tuple[int, float]]:
        """(epoch ms, seconds) of canary round trips since `since_ms`."""
        with self._lock:
            return [c for c in self._canary if c[0] >= since_ms]

    def snapshot(self, window_s: float = 60.0, history_s: float = 3600.0, now_ms: int | None = None) -> dict[str, Any]:
        """Everything /v1/freshness and the dashboard show."""
        now = now_ms or int(time.time() * 1000)
        window_start = now - int(window_s * 1000)
        everything = self.changes()
        recent = [t for t in everything if t.acked_ms >= window_start]
        per_change = [t.stages() for t in recent]
        canary = self.canary(now - int(max(window_s, history_s) * 1000))
        canary_recent = [s for t, s in canary if t >= window_start]
        e2e = [t.end_to_end_s for t in recent]
        stages = {s: summarize([st[s] for st in per_change]) for s in STAGES}
        last_canary = self.canary()[-1:]
        return {
            "now_ms": now,
            "window_s": window_s,
            "canary": {
                "last_s": last_canary[0][1] if last_canary else None,
                "last_at_ms": last_canary[0][0] if last_canary else None,
                **summarize(canary_recent),
                "history": [[t, round(s, 4)] for t, s in canary if t >= now - int(history_s * 1000)],
            },
            "changes": {**summarize(e2e), "per_s": round(len(recent) / window_s, 3)},
            "stages": stages,
            "stage_help": STAGE_HELP,
            "newest": [
                t.as_dict() | {"age_s": round((now - t.source_ms) / 1000, 3)}
                for t in heapq.nlargest(10, everything, key=lambda t: t.acked_ms)
            ],
        }
