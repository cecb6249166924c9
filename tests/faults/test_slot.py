"""The classic CDC failure, end to end: with Connect down, a small `max_slot_wal_keep_size` and forced WAL switches
make Postgres invalidate the replication slot. ragtide says so (/readyz, /v1/freshness for the dashboard, a
metric) with the fix, and `ragtide resync` recreates the slot, re-snapshots, and ends with `verify` at 0 drift:
the rows inserted, changed and deleted while the slot was lost are all right in search."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import psycopg

from ragtide.bench.faults import audit
from ragtide.ingest.slot import read_slot
from ragtide.stack.jvm import ConnectWorker
from ragtide.stack.stack import Stack
from tests.e2e.conftest import poll

BASE = 5_000_000  # this test's rows


def sql(dsn: str, *statements: tuple[str, Any]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement, params in statements:
            conn.execute(statement, params)


def test_an_invalidated_slot_is_reported_and_resync_repairs_it(stack: Stack) -> None:
    s = stack.settings
    dsn, api, slot = s.postgres.dsn(), s.api.url, s.connect.slot_name
    rows = [(BASE + i, f"slot row {i} before the loss") for i in range(6)]
    sql(
        dsn,
        *[("INSERT INTO public.faults (id, rid, body, label) VALUES (%s, %s, %s, 'slot')", (i, i, b)) for i, b in rows],
    )
    poll(lambda: audit(api, dsn, [i for i, _ in rows]).lost == [], "the first rows to be searchable")

    stack.daemon("connect").stop()  # nothing reads the slot now: the WAL it holds grows
    sql(dsn, ("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", None), ("SELECT pg_reload_conf()", None))
    try:
        sql(
            dsn,  # lost from the stream: an insert, a text update and a delete
            (
                "INSERT INTO public.faults (id, rid, body, label) VALUES (%s, %s, 'slot row added while lost', 'slot')",
                (BASE + 100, BASE + 100),
            ),
            ("UPDATE public.faults SET body = 'slot row changed while lost' WHERE id = %s", (BASE + 1,)),
            ("DELETE FROM public.faults WHERE id = %s", (BASE + 2,)),
        )

        def force_wal() -> bool:
            sql(
                dsn,
                ("CREATE TABLE IF NOT EXISTS public.wal_filler (n int, pad text)", None),
                ("INSERT INTO public.wal_filler SELECT g, repeat('x', 500) FROM generate_series(1, 2000) g", None),
                ("SELECT pg_switch_wal()", None),
                ("CHECKPOINT", None),
            )
            return read_slot(dsn, slot).lost

        poll(force_wal, "Postgres to invalidate the slot", timeout=120)
    finally:
        sql(dsn, ("ALTER SYSTEM RESET max_slot_wal_keep_size", None), ("SELECT pg_reload_conf()", None))
    ConnectWorker(s, stack.daemon("connect")).start()  # the connector's task fails on the lost slot

    def reported() -> dict[str, Any] | None:
        ready = httpx.get(f"{api}/readyz", timeout=10)
        return ready.json() if ready.status_code == 503 and "lost" in ready.json()["checks"].get("slot", "") else None

    checks = poll(reported, "/readyz to report the lost slot", timeout=60)["checks"]
    assert "ragtide resync" in checks["slot"] and "max_slot_wal_keep_size" in checks["slot"]
    assert httpx.get(f"{api}/readyz?freshness=false", timeout=10).status_code == 200  # search itself is fine
    assert httpx.get(f"{api}/v1/freshness", timeout=10).json()["slot"]["ok"] is False
    assert f'ragtide_slot_lost{{slot="{slot}"}} 1.0' in httpx.get(f"{api}/metrics", timeout=10).text

    done = subprocess.run(
        [sys.executable, "-m", "ragtide", "resync", "--yes", "--timeout", "600"],
        env={**os.environ, **s.to_env()},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: 0 drift" in done.stderr
    assert read_slot(dsn, slot).wal_status in ("reserved", "extended")

    result = audit(api, dsn, [*(i for i, _ in rows), BASE + 100])
    assert (result.lost, result.stale, result.ghosts) == ([], [], [])
    hits = httpx.post(
        f"{api}/v1/search", json={"query": "slot row", "k": 5, "filter": {"rid": BASE + 100}}, timeout=10
    ).json()["hits"]
    assert [h["text"] for h in hits] == ["slot row added while lost"]
    poll(lambda: httpx.get(f"{api}/readyz", timeout=10).status_code == 200, "/readyz to be ready again", 120)
