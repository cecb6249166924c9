"""`ragtide reindex` on the real stack: one table re-embedded in place, and a whole new generation built beside
the live one (blue/green) while the stream goes on, switched in one step, with search never seeing it half-built."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import httpx

from tests.e2e.conftest import LiveStack, poll


def admin(live: LiveStack, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"{live.settings.api.url}/v1/admin/{path}"
    resp = httpx.post(url, json=body, timeout=900) if body is not None else httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def docs_rows(live: LiveStack) -> int:
    return int(live.api("/v1/index/stats").json()["tables"]["public.docs"]["rows"])


def test_reindex_one_table_reembeds_every_row_in_place(live: LiveStack) -> None:
    poll(lambda: admin(live, "verify", {"repair": False})["drift"] == 0, "zero drift before the reindex")
    rows = live.sql("SELECT count(*) FROM public.docs WHERE body IS NOT NULL AND body <> ''")[0][0]
    chunks = live.api("/v1/index/stats").json()["tables"]["public.docs"]["chunks"]

    out = admin(live, "reindex", {"table": "public.docs"})

    assert out["reembedded_rows"] >= rows
    assert out["embedded_chunks"] >= chunks  # every chunk really was embedded again
    assert admin(live, "verify", {"repair": False})["drift"] == 0


def test_reindex_all_builds_a_new_generation_and_switches_when_it_has_caught_up(live: LiveStack) -> None:
    before = admin(live, "generations")
    assert before["building"] is None
    rows = docs_rows(live)

    # The CLI starts the build and returns; the stream goes on while it runs.
    env = {**live.settings.to_env(), "PATH": "/usr/bin:/bin"}
    cli = subprocess.run(
        [sys.executable, "-m", "ragtide.cli", "reindex", "--no-wait"], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    building = admin(live, "generations")["building"]
    assert building is not None and building["revision"] == before["live"]["revision"] + 1
    assert building["fingerprint"] in cli.stderr

    marker = f"reindexmarker{uuid.uuid4().hex[:8]}"
    target, topic = live.sql("SELECT id, topic FROM public.docs ORDER BY id LIMIT 1")[0]
    story = f"A zebra librarian files marmalade recipes by moonlight. {marker}"
    live.sql("UPDATE public.docs SET body = %s WHERE id = %s", (story, target))

    seen_during_build: list[int] = []

    def switched() -> dict[str, Any] | None:
        status = admin(live, "generations")
        if status["building"] is not None:
            seen_during_build.append(docs_rows(live))  # search reads the live generation: always complete
            return None
        return status

    after = poll(switched, "the new generation to go live", timeout=900)
    assert after["live"]["fingerprint"] == building["fingerprint"]
    assert seen_during_build and min(seen_during_build) >= rows

    # The change made during the build reached the new generation (dual write), and nothing else drifted.
    def found() -> bool:
        hits = live.search("zebra librarian marmalade moonlight", k=3, flt={"topic": topic})
        return any(marker in h["text"] for h in hits)

    poll(found, "the change made during the build to be searchable in the new generation")
    assert admin(live, "verify", {"repair": False})["drift"] == 0
    assert docs_rows(live) == rows
    # The old generation's collection is dropped once no request can still be using it (the grace period).
    old = live.settings.index_path / f"{live.settings.index.collection}-{before['live']['fingerprint']}"
    poll(lambda: not old.exists(), "the retired collection to be dropped after its grace period")
    assert live.metric("ragtide_reindex_building") == 0
    stats = live.api("/v1/index/stats").json()
    assert stats["generation"]["live"]["fingerprint"] == building["fingerprint"]


def test_reindex_rejects_unknown_tables(live: LiveStack) -> None:
    resp = httpx.post(f"{live.settings.api.url}/v1/admin/reindex", json={"table": "public.nope"}, timeout=60)
    assert resp.status_code == 422 and "not a source table" in resp.text


def test_backfill_progress_is_exported_per_table(live: LiveStack) -> None:
    def caught_up() -> bool:
        total = live.metric("ragtide_backfill_source_rows", table="public.docs")
        done = live.metric("ragtide_backfill_indexed_rows", table="public.docs")
        in_sql = live.sql("SELECT count(*) FROM public.docs")[0][0]
        return total == in_sql and done == docs_rows(live)

    poll(caught_up, "the backfill gauges to match Postgres and the index")

    def idle() -> bool:  # caught up, nothing more arriving: the rate falls to 0 and the ETA is "done"
        rate = live.metric("ragtide_backfill_rows_per_second", table="public.docs")
        return rate == 0 and live.metric("ragtide_backfill_eta_seconds", table="public.docs") == 0

    poll(idle, "the backfill rate to settle at 0 rows/s with an ETA of 0")
