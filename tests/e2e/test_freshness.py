"""Freshness on the real stack: the canary, per-stage timings, and the live dashboard in headless Chromium."""

from __future__ import annotations

import shutil
import uuid

from ragtide.contracts.settings import REPO_ROOT
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
