"""The freshness canary: commit a row in Postgres, then time how long until a real search returns it.

This is the number the dashboard leads with: it passes through every real component (Postgres WAL,
Debezium, Kafka, the embedder, the vector index, the search path). It also drives readiness.

Every process that serves the API runs its own canary (several retriever replicas behind a load balancer),
so each writes a row of its own (`slot`, from the host name: a pod keeps it for its life) and searches for
exactly that row. Sharing one row, replicas overwrote each other's probes and timed out in turn, and /readyz
flapped. A replica that is gone stops refreshing its row; the others delete rows not refreshed for
`STALE_ROW_S`, through the same change stream, so the table and the index hold one row per live replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
import zlib
from typing import Any

import psycopg

from ragtide.contracts.chunks import row_key
from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.settings import CanarySettings
from ragtide.embedder.encoder import QueryVectors
from ragtide.embedder.index.base import ActiveIndex
from ragtide.ingest.sources import CANARY_TABLE

log = logging.getLogger(__name__)

STALE_ROW_S = 600  # a canary row not refreshed for this long belongs to a replica that is gone


def canary_slot(host: str | None = None) -> int:
    """This process's canary row id: stable for a host name (a pod's name), distinct between replicas."""
    return zlib.crc32((host or socket.gethostname()).encode()) & 0x7FFFFFFF


class Canary:
    """Probes on an interval; remembers the last result for readiness."""

    def __init__(
        self,
        dsn: str,
        active: ActiveIndex,
        tracker: FreshnessTracker,
        settings: CanarySettings,
        vectors: QueryVectors | None = None,
        slot: int | None = None,
    ) -> None:
        self.dsn = dsn
        self.slot = canary_slot() if slot is None else slot
        self._filter = {"table": CANARY_TABLE, "row_key": row_key(CANARY_TABLE, str(self.slot))}
        self.active = active
        self.vectors = vectors or QueryVectors(size=8)  # the canary query per encoder (a switch changes it)
        self.tracker = tracker
        self.settings = settings
        self.last_ok_ms: int | None = None
        self.last_s: float | None = None
        self.last_error: str | None = "waiting for the first round trip"
        self._conn: psycopg.Connection[Any] | None = None

    def commit(self, nonce: str) -> float:
        """Commit the canary row; returns the wall time just before the commit was sent."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            # once per connection: rows of replicas gone for a while
            self._conn.execute(
                f"DELETE FROM {CANARY_TABLE} WHERE id <> %s AND (ts IS NULL OR ts < now() - make_interval(secs => %s))",
                (self.slot, STALE_ROW_S),
            )
        t0 = time.time()
        self._conn.execute(
            f"INSERT INTO {CANARY_TABLE} (id, body, ts) VALUES (%s, %s, now())"
            " ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, ts = EXCLUDED.ts",
            (self.slot, f"ragtide canary {nonce}"),
        )
        return t0

    def _found(self, nonce: str) -> bool:
        index, encoder = self.active.current()
        hits = index.search(self.vectors.embed(encoder, "ragtide canary"), 1, self._filter)
        return bool(hits) and nonce in str(hits[0].payload.get("text", ""))

    async def probe(self) -> float:
        """One round trip; returns seconds from commit to searchable."""
        nonce = uuid.uuid4().hex
        committed = await asyncio.to_thread(self.commit, nonce)
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
                        self.close()
                    self._conn = None
                await asyncio.sleep(max(0.0, self.settings.interval_s - (time.monotonic() - started)))
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection the probes write through (the next probe opens another)."""
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
