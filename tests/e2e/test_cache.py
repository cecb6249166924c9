"""The semantic cache on the real stack: a repeated question is answered from the cache without the generator;
after a cited row changes in Postgres, the next identical question is regenerated from the new text, never a
stale hit (the embedder drops the cached answer before the change is searchable)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.e2e.conftest import LiveStack, poll


def ask(live: LiveStack, query: str) -> dict[str, Any]:
    resp = httpx.post(
        f"{live.settings.api.url}/v1/answer", json={"query": query, "k": 2, "max_tokens": 16}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_repeat_is_a_hit_and_a_changed_cited_row_is_never_served_stale(live: LiveStack) -> None:
    marker = f"cq{uuid.uuid4().hex[:6]}"
    row_id = f"cache-{marker}"
    live.sql(
        "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, 'Harbour', %s, 'e2e', 'e2e')",
        (row_id, f"The {marker} harbour master rings the copper bell at dawn."),
    )
    poll(lambda: any(h["row_id"] == row_id for h in live.search(f"{marker} harbour master")), "the new row")
    question = f"What does the {marker} harbour master ring?"

    first = ask(live, question)
    assert first["cache"]["hit"] is False and any(c["row_id"] == row_id for c in first["citations"])
    tokens_before = live.metric("ragtide_answer_tokens_total", kind="completion")
    again = ask(live, question)
    assert again["cache"]["hit"] is True and again["answer"] == first["answer"]
    assert again["usage"]["total_tokens"] == 0 and again["took_ms"] < first["took_ms"]
    assert live.metric("ragtide_answer_tokens_total", kind="completion") == tokens_before  # no generator call
    assert live.metric("ragtide_cache_requests_total", result="hit") >= 1

    new_text = f"The {marker} harbour master now fires a brass cannon at dawn."
    live.sql("UPDATE public.docs SET body = %s WHERE id = %s", (new_text, row_id))
    poll(
        lambda: any(
            "brass cannon" in h["text"] for h in live.search(f"{marker} harbour master") if h["row_id"] == row_id
        ),
        "the update to be searchable",
    )
    after = ask(live, question)  # the change is searchable, so its stale answer is already gone
    assert after["cache"]["hit"] is False
    ours = [c for c in after["citations"] if c["row_id"] == row_id]
    assert ours and "brass cannon" in ours[0]["text"]
    assert live.metric("ragtide_cache_invalidations_total") >= 1
    serving = httpx.get(f"{live.settings.api.url}/v1/serving", timeout=30).json()
    assert serving["cache"]["hits"] >= 1 and serving["cache"]["invalidations"] >= 1


def test_admin_clears_the_cache(live: LiveStack) -> None:
    question = "How do I raise an exception?"
    ask(live, question)
    assert ask(live, question)["cache"]["hit"] is True
    cleared = httpx.post(f"{live.settings.api.url}/v1/admin/cache/clear", timeout=30).json()
    assert cleared["dropped"] >= 1
    assert ask(live, question)["cache"]["hit"] is False
