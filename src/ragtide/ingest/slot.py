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
from collections.abc import Sequence
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
    """Reads each source database's slot every `interval_s` from the API process; the last readings are its
    verdict. Gauges are labelled by slot name."""

    def __init__(
        self,
        slots: Sequence[tuple[str, str]],
        registry: CollectorRegistry,
        interval_s: float = 10.0,
        failures: BackgroundFailures | None = None,
    ) -> None:
        self.slots = list(slots)  # (dsn, slot name), the source database's first
        self.interval_s = interval_s
        self.states: dict[str, SlotState] = {}
        self.failures = failures or BackgroundFailures()
        self.retained = Gauge(
            "ragtide_slot_retained_wal_bytes",
            "WAL Postgres keeps for the replication slot",
            ["slot"],
            registry=registry,
        )
        self.safe = Gauge(
            "ragtide_slot_safe_wal_bytes",
            "WAL that may still be written before Postgres invalidates the slot (-1: no max_slot_wal_keep_size)",
            ["slot"],
            registry=registry,
        )
        self.lost = Gauge(
            "ragtide_slot_lost", "1 when Postgres invalidated the replication slot", ["slot"], registry=registry
        )

    @property
    def state(self) -> SlotState | None:
        """The source database's slot, as last read."""
        return self.states.get(self.slots[0][1]) if self.slots else None

    def check(self) -> list[SlotState]:
        """Read and export every slot once."""
        states = []
        errors: list[Exception] = []
        for dsn, slot in self.slots:
            try:
                state = read_slot(dsn, slot)
            except Exception as exc:  # one database unreachable: the others are still read
                errors.append(exc)
                continue
            before = self.states.get(slot)
            if state.lost and not (before and before.lost):
                log.error("replication slot lost", extra={"slot": slot, "fix": RESYNC_HINT})
            self.states[slot] = state
            self.retained.labels(slot).set(state.retained_bytes or 0)
            self.safe.labels(slot).set(-1 if state.safe_wal_bytes is None else state.safe_wal_bytes)
            self.lost.labels(slot).set(1 if state.lost else 0)
            states.append(state)
        if errors:
            raise errors[0]
        return states

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
        """The last readings' verdict (ok before the first): the first slot that is not ok, else the first."""
        if not self.states:
            return True, "ok (not read yet)"
        verdicts = [s.verdict() for s in self.states.values()]
        return next((v for v in verdicts if not v[0]), verdicts[0])
