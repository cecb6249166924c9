"""Answers on the real stack: a row committed in Postgres is cited, fresh, in a streamed answer from the real
local generator (llama.cpp's server with SmolLM2); the OpenAI-compatible façade answers too; and the gateway
(keys made with the CLI, hashed in Postgres) keeps tenants apart, rate-limits keys and enforces daily quotas."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest
from fastapi import HTTPException

from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import PostgresGatewayStore, key_id_of
from tests.e2e.conftest import LiveStack, poll


def sse(resp: httpx.Response) -> list[tuple[str | None, Any]]:
    events: list[tuple[str | None, Any]] = []
    name: str | None = None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            events.append((name, data if data == "[DONE]" else json.loads(data)))
            name = None
    return events


def cli(live: LiveStack, *args: str, output: str = "stdout") -> str:
    env = {**live.settings.to_env(), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "ragtide.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    return str(getattr(done, output))


def new_key(live: LiveStack, tenant: str, *extra: str) -> dict[str, str]:
    key = cli(live, "keys", "create", "--tenant", tenant, *extra).strip().splitlines()[-1]
    assert key_id_of(key), key
    return {"Authorization": f"Bearer {key}"}


def post(live: LiveStack, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{live.settings.api.url}{path}", json=body, headers=headers or {}, timeout=120)


def test_a_fresh_row_is_cited_in_a_streamed_answer_from_the_real_generator(live: LiveStack) -> None:
    marker = f"zq{uuid.uuid4().hex[:6]}"
    fact = f"The {marker} lighthouse keeper repairs the fog horn every Tuesday with brass screws."
    row_id = f"answer-{marker}"
    live.sql(
        "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, 'Lighthouse', %s, 'e2e', 'e2e')",
        (row_id, fact),
    )
    poll(lambda: any(h["row_id"] == row_id for h in live.search(f"{marker} lighthouse keeper")), "the new row")

    body = {"query": f"What does the {marker} lighthouse keeper repair?", "k": 3, "stream": True, "max_tokens": 40}
    with httpx.stream("POST", f"{live.settings.api.url}/v1/answer", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse(resp)
    kinds = [e[0] for e in events]
    assert kinds[0] == "citations" and kinds[-1] == "done" and kinds.count("token") >= 1
    citations = events[0][1]["citations"]
    ours = [c for c in citations if c["table"] == "public.docs" and c["key"] == {"id": row_id}]
    assert ours and ours[0]["n"] == 1 and marker in ours[0]["text"]
    assert ours[0]["age_s"] is not None and 0 <= ours[0]["age_s"] < 120  # the version just committed
    text = "".join(e[1]["text"] for e in events if e[0] == "token")
    done = events[-1][1]
    assert text.strip() and done["usage"]["completion_tokens"] >= 1 and done["finish_reason"] in {"stop", "length"}
    assert done["usage"]["completion_tokens"] <= 40 and done["ttft_ms"] > 0
    assert live.metric("ragtide_answer_ttft_seconds_count", endpoint="answer") >= 1
    assert live.metric("ragtide_answer_tokens_total", kind="completion") >= 1


def test_openai_clients_get_a_retrieval_augmented_chat_completion(live: LiveStack) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "How do I catch an exception in Python?"}]}
    resp = post(live, "/v1/chat/completions", {**body, "max_tokens": 24})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"].strip()
    assert out["usage"]["completion_tokens"] >= 1 and out["citations"]
    with httpx.stream(
        "POST", f"{live.settings.api.url}/v1/chat/completions", json={**body, "stream": True, "max_tokens": 12}
    ) as streamed:
        events = sse(streamed)
    assert events[-1] == (None, "[DONE]") and events[0][1]["choices"][0]["delta"] == {"role": "assistant"}


def test_tenants_are_isolated_and_keys_are_limited_on_the_real_stack(live: LiveStack) -> None:
    acme, globex = new_key(live, "acme"), new_key(live, "globex")
    tickets = {"table": "public.tickets"}

    def ticket_ids(headers: dict[str, str] | None, query: str) -> set[int]:
        resp = post(live, "/v1/search", {"query": query, "k": 20, "filter": tickets}, headers)
        assert resp.status_code == 200, resp.text
        return {h["key"]["id"] for h in resp.json()["hits"]}

    everyone = poll(lambda: ticket_ids(None, "export times out") or None, "the tickets to be indexed")
    assert everyone == set(live.tenant_rows["acme"]) | set(live.tenant_rows["globex"])  # dev mode, no key: all
    for query in ("export to the ledger times out", "badge readers stopped syncing", "payroll"):
        assert ticket_ids(acme, query) == set(live.tenant_rows["acme"])
        assert ticket_ids(globex, query) == set(live.tenant_rows["globex"])
    answer = post(live, "/v1/answer", {"query": "Why does the payroll export time out?", "max_tokens": 8}, acme)
    assert answer.status_code == 200, answer.text
    cited_tickets = {c["key"]["id"] for c in answer.json()["citations"] if c["table"] == "public.tickets"}
    assert cited_tickets and cited_tickets <= set(live.tenant_rows["acme"])
    assert int(answer.headers["X-Quota-Remaining"]) < int(answer.headers["X-Quota-Limit"])
    used = live.sql("SELECT tokens FROM ragtide_gateway.usage WHERE tenant = 'acme' AND day = current_date")
    assert used and used[0][0] >= answer.json()["usage"]["total_tokens"]  # persisted in Postgres

    assert (
        post(live, "/v1/search", {"query": "x"}, {"Authorization": "Bearer rtk_000000000000_" + "A" * 43}).status_code
        == 401
    )
    limited = new_key(live, "acme", "--rate", "0.01", "--burst", "2")
    statuses = [post(live, "/v1/search", {"query": "ledger"}, limited).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]

    cli(live, "keys", "quota", "initech", "--daily-tokens", "3")
    initech = new_key(live, "initech")
    first = post(live, "/v1/search", {"query": "the ledger export times out"}, initech)
    assert first.status_code == 200 and first.headers["X-Quota-Remaining"] == "0"
    over = post(live, "/v1/search", {"query": "ledger"}, initech)
    assert over.status_code == 429 and "quota" in over.json()["detail"] and int(over.headers["Retry-After"]) > 0

    key_id = key_id_of(globex["Authorization"].split()[1])
    assert key_id and key_id in cli(live, "keys", "list", "--tenant", "globex", output="stderr")  # rich table
    cli(live, "keys", "revoke", key_id)
    poll(lambda: post(live, "/v1/search", {"query": "x"}, globex).status_code == 401, "the revoked key to be refused")


def test_a_keys_rate_limit_is_shared_by_every_replica(live: LiveStack) -> None:
    """A second API replica (its gateway on the same Postgres, in this process) and the node's API spend one
    bucket: burst 4 means 4 requests in all, not 4 per replica."""
    replica = Gateway(live.settings.gateway, PostgresGatewayStore(live.settings.postgres.dsn()))
    headers = new_key(live, "acme", "--rate", "0.01", "--burst", "4")
    caller = replica.authenticate(headers["Authorization"].split()[1])

    def via_api() -> str:
        resp = post(live, "/v1/search", {"query": "ledger"}, headers)
        assert resp.status_code == 200, resp.text
        return resp.headers["X-RateLimit-Remaining"]

    def via_replica() -> str:
        return replica.admit(caller)["X-RateLimit-Remaining"]

    assert [via_api(), via_replica(), via_api(), via_replica()] == ["3", "2", "1", "0"]
    refused = post(live, "/v1/search", {"query": "ledger"}, headers)
    assert refused.status_code == 429 and 90 <= int(refused.headers["Retry-After"]) <= 100  # one token at 0.01/s
    with pytest.raises(HTTPException) as limited:
        replica.admit(caller)
    assert limited.value.status_code == 429 and replica.local_rate_limits == 0
    assert live.sql("SELECT count(*) FROM ragtide_gateway.rate_limits WHERE bucket = %s", (caller.key_id,)) == [(1,)]


def test_bench_serve_runs_from_a_separate_process(live: LiveStack, tmp_path: Any) -> None:
    out = cli(
        live,
        "bench",
        "serve",
        "--duration",
        "2",
        "--clients",
        "2",
        "--answers",
        "1",
        "--max-tokens",
        "4",
        "--out",
        str(tmp_path),
    )
    assert "search ×1" in out and "search ×2" in out and "answer (stream)" in out
    (result,) = tmp_path.glob("serve-*.json")
    phases = json.loads(result.read_text())["phases"]
    assert [p["clients"] for p in phases] == [1, 2, 1]
    assert phases[0]["requests"] > 0 and phases[0]["errors"] == 0 and phases[0]["latency_ms"]["p99"] > 0
    assert phases[2]["requests"] == 1 and phases[2]["extra"]["ttft_ms"]["p50"] > 0
