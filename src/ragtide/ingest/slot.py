"""The replication slot, watched from the source: how much WAL it holds back, and whether Postgres invalidated it.

Debezium streams through a logical replication slot, which keeps every WAL segment from its position on. While the
embedder or Connect is down, that WAL grows; `max_slot_wal_keep_size` caps it, and past the cap Postgres
*invalidates* the slot (`wal_status = 'lost'`): the changes in between are gone from the stream for good, and
Debezium cannot resume. This is the classic CDC failure. `SlotMonitor` reads the slot's state every few seconds,
exports it (`ragtide_slot_retained_wal_bytes`, `ragtide_slot_safe_wal_bytes`, `ragtide_slot_lost`) and says so
on /readyz and the dashboard with the recovery command: `ragtide resync` (resync.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Gauge

from ragtide.contracts.logging import BackgroundFailures

log = logging.getLogger(__name__)

RESYNC_HINT = "run `ragtide resync` (recreates the slot, re-snapshots every table, then verifies)"

_SLOT_SQL = """
SELECT wal_status, active,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,
       safe_wal_size::bigint AS safe
  FROM pg_replication_slots WHERE slot_name = %s"""


@dataclass(frozen=True)
class SlotState:
    """One reading of pg_replication_slots for our slot."""

    name: str
    exists: bool
    wal_status: str | None = None  # reserved | extended | unreserved | lost
    active: bool = False
    retained_bytes: int | None = None  # WAL kept for the slot (None once lost)
    safe_wal_bytes: int | None = None  # how much more WAL may be written before it is lost (None: no cap)

    @property
    def lost(self) -> bool:
        """Postgres invalidated the slot."""
        return self.wal_status == "lost"

    def verdict(self) -> tuple[bool, str]:
        """(ok, detail) for /readyz: only a lost slot is not ok."""
        if not self.exists:
            return True, f"ok (slot {self.name} not created yet: Debezium creates it when it first connects)"
        if self.lost:
            return False, (
                f"lost: Postgres invalidated replication slot {self.name} (more WAL than max_slot_wal_keep_size "
                f"was retained for it); changes since then were not streamed; {RESYNC_HINT}"
            )
        retained = f"{(self.retained_bytes or 0) / 2**20:.1f} MiB WAL retained"
        if self.wal_status == "unreserved":
            return True, f"ok but at risk: {retained}, past max_wal_size; the slot is lost once the cap is reached"
        return True, f"ok ({retained}, {'streaming' if self.active else 'no reader attached'})"

    def as_dict(self) -> dict[str, Any]:
        """For /v1/freshness and the dashboard."""
        ok, detail = self.verdict()
        return {
            "name": self.name,
            "ok": ok,
            "detail": detail,
            "wal_status": self.wal_status,
            "active": self.active,
            "retained_bytes": self.retained_bytes,
            "safe_wal_bytes": self.safe_wal_bytes,
        }


def read_slot(dsn: str, slot: str) -> SlotState:
    """The slot's state now."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(_SLOT_SQL, (slot,)).fetchone()
    if row is None:
        return SlotState(slot, exists=False)
    wal_status, active, retained, safe = row
    return SlotState(slot, True, wal_status, bool(active), None if wal_status == "lost" else retained, safe)


class SlotMonitor:
    """Reads the slot every `interval_s` from the API process; the last reading is its verdict."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        registry: CollectorRegistry,
        interval_s: float = 10.0,
        failures: BackgroundFailures | None = None,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.interval_s = interval_s
        self.state: SlotState | None = None
        self.failures = failures or BackgroundFailures()
        self.retained = Gauge(
            "ragtide_slot_retained_wal_bytes", "WAL Postgres keeps for the replication slot", registry=registry
        )
        self.safe = Gauge(
            "ragtide_slot_safe_wal_bytes",
            "WAL that may still be written before Postgres invalidates the slot (-1: no max_slot_wal_keep_size)",
            registry=registry,
        )
        self.lost = Gauge("ragtide_slot_lost", "1 when Postgres invalidated the replication slot", registry=registry)

    def check(self) -> SlotState:
        """Read and export once."""
        state = read_slot(self.dsn, self.slot)
        if state.lost and not (self.state and self.state.lost):
            log.error("replication slot lost", extra={"slot": self.slot, "fix": RESYNC_HINT})
        self.state = state
        self.retained.set(state.retained_bytes or 0)
        self.safe.set(-1 if state.safe_wal_bytes is None else state.safe_wal_bytes)
        self.lost.set(1 if state.lost else 0)
        return state

    async def run(self) -> None:
        """Check until cancelled (Postgres unreachable: the last reading stands, counted and logged)."""
        failures = self.failures.loop("reading the replication slot", log)
        while True:
            try:
                await asyncio.to_thread(self.check)
                failures.recovered()
            except Exception as exc:  # Postgres restarting, most likely; the loop must go on whatever it was
                failures.failed(exc)
            await asyncio.sleep(self.interval_s)

    def readiness(self) -> tuple[bool, str]:
        """The last reading's verdict (ok before the first)."""
        return (True, "ok (not read yet)") if self.state is None else self.state.verdict()
