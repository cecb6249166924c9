"""`ragtide verify`: zero drift after the other tests; injected drift is found exactly and repaired.

Named to run last: it also proves invariant 8 (verify finds zero drift after tests that change data).
"""

from __future__ import annotations

import uuid

import httpx
import numpy as np

from ragtide.contracts.chunks import point_id
from ragtide.embedder.index.base import IndexPoint
from tests.e2e.conftest import LiveStack, live_index, poll


def verify(live: LiveStack, repair: bool = False) -> dict:
    resp = httpx.post(f"{live.settings.api.url}/v1/admin/verify", json={"repair": repair}, timeout=600)
    assert resp.status_code == 200, resp.text
    return resp.json()


def zero_drift(live: LiveStack) -> dict | None:
    report = verify(live)
    return report if report["drift"] == 0 else None


def test_verify_finds_and_repairs_exactly_the_injected_drift(live: LiveStack) -> None:
    report = poll(lambda: zero_drift(live), "zero drift after the tests that changed data")
    docs = report["tables"][0]
    assert docs["table"] == "public.docs" and docs["rows"] == live.sql("SELECT count(*) FROM public.docs")[0][0]

    # Take the index away from the node and damage it the way a bug or a lost event would.
    node = live.stack.daemon("node")
    assert node.stop(timeout=60)
    try:
        idx = live_index(live.settings)
        idx.delete_where({"row_key": "public.docs:try/0"})  # missing
        idx.set_payload([point_id("public.docs", "for/0", 0)], {"hash": "tampered"})  # stale
        ghost = f"ghost-{uuid.uuid4().hex[:6]}"  # a row whose delete event was lost: orphaned
        idx.upsert(
            [
                IndexPoint(
                    point_id("public.docs", ghost, 0),
                    np.ones(384, dtype=np.float32),
                    {
                        "table": "public.docs",
                        "row_key": f"public.docs:{ghost}",
                        "row_id": ghost,
                        "chunk_no": 0,
                        "chunk_count": 1,
                        "text": "ghost",
                        "hash": "x",
                        "tenant": "",
                        "metadata": {},
                        "lsn": 1,
                    },
                )
            ]
        )
        idx.close()
    finally:
        live.stack.start_node()
    live.stack.wait_ready()

    drift = verify(live)["tables"][0]
    assert (drift["missing"], drift["stale"], drift["orphaned"]) == (1, 1, 1)
    assert drift["examples"] == {"missing": ["try/0"], "stale": ["for/0"], "orphaned": [ghost]}

    repaired = verify(live, repair=True)["tables"][0]
    assert repaired["repaired"] == 3
    assert verify(live)["drift"] == 0
    assert "try" in {h["metadata"]["topic"] for h in live.search("catching exceptions with try and except", k=5)}


def test_verify_rejects_unknown_tables(live: LiveStack) -> None:
    resp = httpx.post(f"{live.settings.api.url}/v1/admin/verify", json={"table": "public.nope"}, timeout=60)
    assert resp.status_code == 422 and "not a source table" in resp.text


def test_optimize_builds_the_search_index_and_search_keeps_answering(live: LiveStack) -> None:
    resp = httpx.post(f"{live.settings.api.url}/v1/admin/optimize", json={}, timeout=600)
    assert resp.status_code == 200, resp.text
    report = resp.json()
    # The live stack's index.indexing_threshold_kb is 100 (~65 vectors): the demo corpus is large enough for a graph.
    assert report["optimized"] is True and report["points"] >= live.demo_rows
    assert report["indexed_vectors"] > 0, report
    assert live.search("catching exceptions with try and except", k=3)
