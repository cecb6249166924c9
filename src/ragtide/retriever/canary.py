"""The freshness canary: commit a row in Postgres, then time how long until a real search returns it.

This is the number the dashboard leads with: it passes through every real component (Postgres WAL,
Debezium, Kafka, the embedder, the vector index, the search path). It also drives readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import psycopg

from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.settings import CanarySettings
from ragtide.embedder.encoder import QueryVectors
from ragtide.embedder.index.base import ActiveIndex
from ragtide.ingest.sources import CANARY_TABLE

log = logging.getLogger(__name__)


class Canary:
    """Probes on an interval; remembers the last result for readiness."""

    def __init__(
        self,
        dsn: str,
        active: ActiveIndex,
        tracker: FreshnessTracker,
        settings: CanarySettings,
        vectors: QueryVectors | None = None,
    ) -> None:
        self.dsn = dsn
        self.active = active
        self.vectors = vectors or QueryVectors(size=8)  # the canary query per encoder (a switch changes it)
        self.tracker = tracker
        self.settings = settings
        self.last_ok_ms: int | None = None
        self.last_s: float | None = None
        self.last_error: str | None = "waiting for the first round trip"
        self._conn: psycopg.Connection[Any] | None = None

    def _write(self, nonce: str) -> float:
        """Commit the canary row; returns the wall time just before the commit was sent."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        t0 = time.time()
        self._conn.execute(
            f"UPDATE {CANARY_TABLE} SET body = %s, ts = now() WHERE id = 1", (f"ragtide canary {nonce}",)
        )
        return t0

    def _found(self, nonce: str) -> bool:
        index, encoder = self.active.current()
        hits = index.search(self.vectors.embed(encoder, "ragtide canary"), 1, {"table": CANARY_TABLE})
        return bool(hits) and nonce in str(hits[0].payload.get("text", ""))

    async def probe(self) -> float:
        """One round trip; returns seconds from commit to searchable."""
        nonce = uuid.uuid4().hex
        committed = await asyncio.to_thread(self._write, nonce)
        deadline = committed + self.settings.timeout_s
        while time.time() < deadline:
            if await asyncio.to_thread(self._found, nonce):
                seconds = time.time() - committed
                self.tracker.record_canary(seconds)
                self.last_ok_ms, self.last_s, self.last_error = int(time.time() * 1000), seconds, None
                return seconds
            await asyncio.sleep(0.01)
        raise TimeoutError(f"canary row not searchable within {self.settings.timeout_s:.0f}s")

    async def run(self) -> None:
        """Probe forever (cancelled at shutdown)."""
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.probe()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("canary failed", extra={"error": self.last_error})
                    with contextlib.suppress(Exception):
                        if self._conn is not None:
                            self._conn.close()
                    self._conn = None
                await asyncio.sleep(max(0.0, self.settings.interval_s - (time.monotonic() - started)))
        finally:
            if self._conn is not None:
                self._conn.close()

    def readiness(self) -> tuple[bool, str]:
        """Ready when the last round trip is recent and within the freshness bound."""
        if self.last_ok_ms is None or self.last_s is None:
            return False, f"no round trip yet ({self.last_error})"
        stale_after = max(3 * self.settings.interval_s, self.settings.timeout_s)
        age = time.time() - self.last_ok_ms / 1000
        if age > stale_after:
            return False, f"last round trip {age:.0f}s ago ({self.last_error})"
        if self.last_s > self.settings.max_freshness_s:
            return False, f"freshness {self.last_s:.2f}s exceeds {self.settings.max_freshness_s:.2f}s"
        return True, f"ok ({self.last_s * 1000:.0f} ms commit -> searchable)"
