"""`ragtide resync`: recover from a replication slot that Postgres invalidated (slot.py), or any time the stream can
no longer be trusted to hold every change.

The changes made while the slot was lost are gone from the WAL for good, so the only way back to "index equals
source" is the source itself:
1. stop the connector (Connect's `PUT /connectors/<name>/stop`: its task ends, its config stays);
2. drop the lost slot (ending the backend that still holds it, if any);
3. delete the connector's source offsets (`DELETE /connectors/<name>/offsets`), so Debezium remembers no position;
4. resume it: with no offsets, `snapshot.mode=initial` takes a new consistent snapshot of every table and creates a
   new slot at its position, then streams from there (nothing committed after the snapshot is missed);
5. wait until Debezium streams again.

The command (`ragtide resync`) then waits until the embedder has consumed the topics to their ends (snapshot rows
are upserts: unchanged chunks are not re-embedded, the stored positions are older than the snapshot's), and runs
`verify --repair` (rows deleted while the slot was lost are still indexed, and a snapshot has no deletes) and
`verify`, which must find 0 drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import psycopg

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import RagtideSettings
from ragtide.ingest.connector import connector_state, resume, stop, wait_until


def drop_slot(dsn: str, slot: str) -> bool:
    """Drop the replication slot (ending a backend that still holds it); False when there was none."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            (slot,),
        )
        for _ in range(50):  # the terminated walsender lets go of the slot within moments
            try:
                row = conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
                return row is not None
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
    raise StackError(f"replication slot {slot} is still in use; stop whatever reads it and run resync again")


def _streaming(http: httpx.Client, url: str) -> bool:
    """Debezium's committed source offset is a streaming one (the snapshot is over)."""
    offsets = http.get(f"{url}/offsets").raise_for_status().json().get("offsets", [])
    return bool(offsets) and all(not o.get("offset", {}).get("snapshot") for o in offsets)


def _forget_position(http: httpx.Client, url: str, settings: RagtideSettings, progress: Callable[[str], None]) -> bool:
    """Steps 1-3: stop the connector, drop its slot, delete its offsets; True when a slot was dropped."""
    c = settings.connect
    progress("stopping the connector")
    stop(http, url)
    progress(f"dropping replication slot {c.slot_name}")
    dropped = drop_slot(settings.postgres.dsn(), c.slot_name)
    progress("deleting the connector's offsets")
    http.delete(f"{url}/offsets").raise_for_status()
    return dropped


def resync_source(
    settings: RagtideSettings, progress: Callable[[str], None] = lambda _: None, timeout: float = 3600.0
) -> None:
    """Steps 1-5 above."""
    c = settings.connect
    url = f"{c.url}/connectors/{c.connector_name}"
    with httpx.Client(timeout=30.0) as http:
        try:
            _forget_position(http, url, settings, progress)
            progress("resuming: Debezium snapshots every table into a new slot")
            resume(http, url)
            wait_until(lambda: connector_state(http, url) == ("RUNNING", ["RUNNING"]), "the connector to run", 120)
        except (httpx.HTTPError, psycopg.Error, StackError) as exc:
            state = http.get(f"{url}/status").text[:500] if not isinstance(exc, httpx.TransportError) else "?"
            raise StackError(
                f"resync stopped half way ({exc}); the connector may be stopped (status: {state}); fix the cause and "
                "run `ragtide resync` again: every step is safe to repeat"
            ) from exc
        wait_until(lambda: _streaming(http, url), "the snapshot to finish", timeout)


def detach_source(
    settings: RagtideSettings, progress: Callable[[str], None] = lambda _: None, force: bool = False
) -> list[str]:
    """Leave nothing in the source database that keeps WAL: stop and delete the connector with its offsets (so a
    later `up` starts with a fresh snapshot instead of resuming from a position the dropped slot no longer holds)
    and drop the replication slot. With Connect unreachable its stored offsets cannot be deleted: a later `up`
    would resume from them on a new slot and miss every change in between, so this refuses unless `force` (then
    only the slot is dropped, and `ragtide resync` after the next `up` takes the snapshot). Returns what was
    done."""
    c = settings.connect
    url = f"{c.url}/connectors/{c.connector_name}"
    done: list[str] = []
    with httpx.Client(timeout=30.0) as http:
        try:
            exists = http.get(f"{url}/status").is_success
        except httpx.TransportError as exc:
            if not force:
                raise StackError(
                    f"Connect is not reachable at {c.url}, so the connector's stored offsets cannot be deleted: after "
                    "the slot is dropped, the next `up` would resume from them and miss the changes in between. "
                    "Start Connect (`ragtide up`) and run `ragtide down --drop-slot` again, or pass --force and run "
                    "`ragtide resync` after the next `up`"
                ) from exc
            exists = False
            progress(f"Connect is not reachable at {c.url}: dropping the slot only (--force)")
        if exists:
            if _forget_position(http, url, settings, progress):
                done.append(f"dropped replication slot {c.slot_name}")
            http.delete(url).raise_for_status()
            done.append(f"deleted connector {c.connector_name} and its offsets")
            return done
    if drop_slot(settings.postgres.dsn(), c.slot_name):
        done.append(f"dropped replication slot {c.slot_name}")
    return done
