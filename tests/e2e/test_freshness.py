"""Freshness on the real stack: the canary, per-stage timings, and the live dashboard in headless Chromium."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from typing import Any, cast

from ragtide.contracts.settings import REPO_ROOT
from ragtide.ingest.sources import CANARY_TABLE
from ragtide.retriever.canary import Canary, canary_slot
from tests.e2e.conftest import LiveStack, poll

ARTIFACTS = REPO_ROOT / ".test-artifacts"


def test_canary_and_stage_timings_are_reported(live: LiveStack) -> None:
    topic = f"e2e-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        live.sql(
            "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, %s, %s, %s, 'e2e')",
            (f"{topic}/{i}", "Fresh", f"freshness probe number {i} about tidal currents", topic),
        )
    poll(
        lambda: len(live.search("tidal currents freshness probe", k=10, flt={"topic": topic})) == 3,
        "the three rows to be searchable",
    )
    snap = live.api("/v1/freshness").json()
    assert snap["canary"]["ready"] is True and snap["canary"]["last_s"] > 0
    assert snap["canary"]["count"] >= 1
    assert snap["changes"]["count"] >= 3 and snap["changes"]["p50"] > 0
    assert set(snap["stages"]) == {"debezium", "kafka", "consume", "embed", "store"}
    newest = {n["row_id"] for n in snap["newest"]}
    assert {f"{topic}/{i}" for i in range(3)} <= newest | {
        n["row_id"] for n in live.api("/v1/freshness/changes").json()["changes"]
    }
    metrics = live.api("/metrics").text
    assert 'ragtide_stage_seconds_bucket{le="0.5",stage="embed"}' in metrics
    assert "ragtide_canary_freshness_seconds_count" in metrics
    # the canary's rows never leak into user searches
    assert all(h["table"] == "public.docs" for h in live.search("ragtide canary", k=10))


def test_replicas_canaries_do_not_disturb_each_other(live: LiveStack) -> None:
    """A second API replica (here: a Canary in this process, on another host name) writes its own canary row
    every 0.2 s; the node's canary keeps finding its own row and stays ready. With one shared row (or a search
    that took any canary row) the two overwrote each other's probes and timed out in turn."""
    other = Canary(
        live.settings.postgres.dsn(), cast(Any, None), cast(Any, None), live.settings.canary, slot=canary_slot("pod-b")
    )
    assert other.slot != canary_slot()
    # A row of a replica gone for an hour is swept by the next canary that connects; a live one is kept.
    live.sql(f"INSERT INTO {CANARY_TABLE} (id, body, ts) VALUES (777, 'gone', now() - interval '1 hour')")
    live.sql(f"INSERT INTO {CANARY_TABLE} (id, body, ts) VALUES (778, 'alive', now()) ON CONFLICT (id) DO NOTHING")
    stop = threading.Event()

    def replica_b() -> None:
        while not stop.is_set():
            other.commit(uuid.uuid4().hex)
            time.sleep(0.2)

    before = live.metric("ragtide_canary_freshness_seconds_count")
    writer = threading.Thread(target=replica_b, daemon=True)
    writer.start()
    try:
        poll(lambda: live.metric("ragtide_canary_freshness_seconds_count") >= before + 3, "three more node probes", 60)
        assert live.api("/readyz").status_code == 200
    finally:
        stop.set()
        writer.join()
        other.close()
    ids = {r[0] for r in live.sql(f"SELECT id FROM {CANARY_TABLE}")}
    assert 777 not in ids and {778, other.slot} <= ids
    live.sql(f"DELETE FROM {CANARY_TABLE} WHERE id IN (778, %s)", (other.slot,))


def test_dashboard_renders_live_data_in_headless_chromium(live: LiveStack) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is required (infra/scripts/system-deps.sh installs it)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{live.settings.api.url}/dashboard")
            page.wait_for_function(
                "window.ragtideDashboard && window.ragtideDashboard.points >= 2"
                " && document.querySelector('#chart canvas') !== null",
                timeout=120_000,
            )
            assert page.inner_text("#k-canary").endswith(("ms", " s"))
            assert page.locator("#stages tbody tr").count() == 5
            assert "live" in page.inner_text("#status")
            # serving beside freshness: a search shows up in the per-endpoint table within a poll or two
            live.search("how do exceptions work")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#serving tbody td')).some(td => td.textContent === 'search')",
                timeout=30_000,
            )
            assert page.inner_text("#k-search").endswith(("ms", " s"))
            assert page.inner_text("#k-gen").startswith("ok")  # the local llama.cpp server, circuit closed
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
