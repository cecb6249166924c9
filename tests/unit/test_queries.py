"""The query path's front: micro-batched query embedding, and admission (a bound, a deadline, clients that left)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import numpy as np
from prometheus_client import CollectorRegistry

from ragtide.contracts.errors import ClientError
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.embedder.encoder import Vectors
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.writer import IndexWriter
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import MemoryGatewayStore
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from ragtide.retriever.queries import AdmissionEdge, Overloaded, QueryBatcher, QueryMetrics, Shed
from tests.doubles import HashEncoder, word_chunker
from tests.serving import serve


class CountingEncoder(HashEncoder):
    """The hash encoder, recording each forward pass's texts; `hold` makes a pass wait (a busy model)."""

    def __init__(self, pause_s: float = 0.0) -> None:
        super().__init__()
        self.passes: list[list[str]] = []
        self.pause_s = pause_s
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def encode(self, texts: Sequence[str]) -> Vectors:
        self.passes.append(list(texts))
        self.entered.set()
        self.hold.wait(10)
        time.sleep(self.pause_s)
        return super().encode(texts)


def batcher(max_texts: int = 32, window_s: float = 0.0) -> tuple[QueryBatcher, QueryMetrics]:
    metrics = QueryMetrics(CollectorRegistry())
    return QueryBatcher(max_texts, window_s, metrics), metrics


def shed(metrics: QueryMetrics, reason: str) -> float:
    return float(metrics.shed.labels(reason)._value.get())


def test_queries_that_arrive_while_the_model_is_busy_share_one_forward_pass() -> None:
    enc = CountingEncoder()
    b, metrics = batcher()

    async def main() -> list[Vectors]:
        enc.hold.clear()
        first = asyncio.create_task(b.embed(enc, ["query 0"]))
        await asyncio.to_thread(enc.entered.wait, 5)  # the model is busy with the first query
        rest = [asyncio.create_task(b.embed(enc, [f"query {i}"])) for i in range(1, 16)]
        await asyncio.sleep(0.05)
        enc.hold.set()
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    out = asyncio.run(main())
    assert enc.passes == [["query 0"], [f"query {i}" for i in range(1, 16)]]
    alone = HashEncoder()
    for i, vectors in enumerate(out):  # each request gets its own text's vector
        np.testing.assert_allclose(vectors, alone.encode([f"query {i}"]), rtol=1e-6)
    assert metrics.batches._value.get() == 2 and metrics.batch_texts._value.get() == 16


def test_a_pass_takes_at_most_max_texts_and_a_larger_request_goes_whole() -> None:
    enc = CountingEncoder()
    b, _ = batcher(max_texts=4)

    async def main() -> None:
        enc.hold.clear()
        first = asyncio.create_task(b.embed(enc, ["a"]))
        await asyncio.to_thread(enc.entered.wait, 5)
        asks = [asyncio.create_task(b.embed(enc, [f"q{i}"])) for i in range(6)]
        big = asyncio.create_task(b.embed(enc, [f"big{i}" for i in range(6)]))
        await asyncio.sleep(0.05)
        enc.hold.set()
        await asyncio.gather(first, *asks, big)
        await b.close()

    asyncio.run(main())
    assert [len(p) for p in enc.passes] == [1, 4, 2, 6]


def test_requests_past_their_deadline_or_whose_client_left_are_dropped_not_computed() -> None:
    enc = CountingEncoder()
    b, metrics = batcher()

    async def gone() -> dict[str, Any]:  # the request's ASGI receive once its client has left
        return {"type": "http.disconnect"}

    async def here() -> dict[str, Any]:  # ... while its client waits: nothing arrives
        await asyncio.Event().wait()
        return {}

    async def main() -> list[Any]:
        enc.hold.clear()
        first = asyncio.create_task(b.embed(enc, ["busy"]))
        await asyncio.to_thread(enc.entered.wait, 5)
        late = asyncio.create_task(b.embed(enc, ["late"], deadline=time.monotonic() + 0.01))
        left = asyncio.create_task(b.embed(enc, ["left"], receive=gone))
        kept = asyncio.create_task(b.embed(enc, ["kept"], deadline=time.monotonic() + 60, receive=here))
        await asyncio.sleep(0.1)  # past the first one's deadline
        enc.hold.set()
        out = await asyncio.gather(first, late, left, kept, return_exceptions=True)
        await b.close()
        return list(out)

    _, late, left, kept = asyncio.run(main())
    assert isinstance(late, Overloaded) and late.reason == "deadline"
    assert isinstance(left, Overloaded) and left.reason == "gone"
    assert isinstance(kept, np.ndarray)
    assert enc.passes == [["busy"], ["kept"]]
    assert (shed(metrics, "deadline"), shed(metrics, "gone")) == (1, 1)


def blocking_wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` without yielding to the event loop (the caller's loop stays blocked)."""
    until = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < until:
        time.sleep(0.001)
    return condition()


async def busy_model(b: QueryBatcher, enc: CountingEncoder, text: str) -> asyncio.Task[Vectors]:
    """A first request whose pass holds the model (until the test sets `enc.hold`), once it is in that pass."""
    enc.hold.clear()
    first = asyncio.create_task(b.embed(enc, [text]))
    await asyncio.to_thread(enc.entered.wait, 5)
    return first


def test_the_model_thread_takes_its_next_pass_without_the_event_loop() -> None:
    """The vectors of one pass go back to the loop while the next pass already runs: the model never waits for the
    loop to collect its next batch (under load it did, 40% of the time)."""
    enc = CountingEncoder()
    b, _ = batcher()

    async def main() -> bool:
        first = await busy_model(b, enc, "first")
        second = asyncio.create_task(b.embed(enc, ["second"]))
        await asyncio.sleep(0.05)  # queued behind the first pass
        enc.hold.set()
        started_alone = blocking_wait(lambda: len(enc.passes) == 2, 5)  # the loop is blocked, not at an await
        await asyncio.gather(first, second)
        await b.close()
        return started_alone

    assert asyncio.run(main()), enc.passes


def test_a_client_that_leaves_while_its_pass_waits_is_not_computed() -> None:
    """Noticed as it leaves, not only when a batch is formed: a request queued behind a long pass whose client
    disconnects meanwhile is skipped by the model thread."""
    enc = CountingEncoder()
    b, metrics = batcher()

    async def main() -> Any:
        first = await busy_model(b, enc, "busy")
        leaves = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await leaves.wait()
            return {"type": "http.disconnect"}

        left = asyncio.create_task(b.embed(enc, ["left"], receive=receive))
        await asyncio.sleep(0.05)  # queued while the model is busy
        leaves.set()
        await asyncio.sleep(0.05)
        assert left.done(), "answered as its client left, while the model is still busy"
        enc.hold.set()
        out = await asyncio.gather(first, left, return_exceptions=True)
        await b.close()
        return out[1]

    left = asyncio.run(main())
    assert isinstance(left, Overloaded) and left.reason == "gone"
    assert enc.passes == [["busy"]] and shed(metrics, "gone") == 1


def test_requests_whose_clients_left_take_no_room_in_the_next_batch() -> None:
    """After an overload the queue holds requests whose clients have gone: they leave it as their clients do, so the
    next pass is full of live queries, not cut short by dead ones."""
    enc = CountingEncoder()
    b, metrics = batcher(max_texts=4)

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def main() -> None:
        first = await busy_model(b, enc, "busy")
        dead = [asyncio.create_task(b.embed(enc, [f"dead {i}"], receive=gone)) for i in range(3)]
        live = [asyncio.create_task(b.embed(enc, [f"live {i}"])) for i in range(4)]
        await asyncio.sleep(0.05)
        enc.hold.set()
        await asyncio.gather(first, *dead, *live, return_exceptions=True)
        await b.close()

    asyncio.run(main())
    assert enc.passes == [["busy"], [f"live {i}" for i in range(4)]]
    assert shed(metrics, "gone") == 3


def test_the_model_thread_stops_when_the_api_closes_and_the_next_request_starts_another() -> None:
    enc = CountingEncoder()
    b, _ = batcher()

    async def one(text: str) -> Vectors:
        out = await b.embed(enc, [text])
        await b.close()
        return out

    def model_threads() -> int:
        return sum(t.name == "query-model" and t.is_alive() for t in threading.enumerate())

    before = model_threads()
    asyncio.run(one("first"))
    assert blocking_wait(lambda: model_threads() == before, 5)
    second = asyncio.run(one("second"))  # another loop, as a new app instance's
    np.testing.assert_allclose(second, HashEncoder().encode(["second"]), rtol=1e-6)
    assert blocking_wait(lambda: model_threads() == before, 5)


def test_a_failing_pass_fails_its_requests_and_the_next_pass_works() -> None:
    class Flaky(HashEncoder):
        failures = 1

        def encode(self, texts: Sequence[str]) -> Vectors:
            if Flaky.failures:
                Flaky.failures -= 1
                raise RuntimeError("device lost")
            return super().encode(texts)

    b, _ = batcher()

    async def main() -> tuple[Any, Any]:
        enc = Flaky()
        failed = await asyncio.gather(b.embed(enc, ["x"]), return_exceptions=True)
        ok = await b.embed(enc, ["y"])
        await b.close()
        return failed[0], ok

    failed, ok = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and ok.shape == (1, HashEncoder().dim)


def test_an_input_the_model_refuses_fails_only_its_own_request_not_the_ones_sharing_its_pass() -> None:
    class Refusing(CountingEncoder):
        def encode(self, texts: Sequence[str]) -> Vectors:
            if any("REFUSED" in t for t in texts):
                self.passes.append(list(texts))
                raise ClientError("embeddings provider refused the input (422)")
            return super().encode(texts)

    enc = Refusing()
    b, _ = batcher()

    async def main() -> list[Any]:
        enc.hold.clear()
        first = asyncio.create_task(b.embed(enc, ["query 0"]))
        await asyncio.to_thread(enc.entered.wait, 5)
        rest = [asyncio.create_task(b.embed(enc, [t])) for t in ("query 1", "REFUSED query", "query 3")]
        await asyncio.sleep(0.05)
        enc.hold.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(main())
    assert [isinstance(o, ClientError) for o in out] == [False, False, True, False]
    assert ["query 1", "REFUSED query", "query 3"] in enc.passes  # tried together first, then alone
    np.testing.assert_allclose(out[3], HashEncoder().encode(["query 3"]), rtol=1e-6)


# --- admission over real HTTP (uvicorn): a burst beyond the bound ----------------------------------------------

SOURCES = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})


@contextlib.contextmanager
def slow_api(**api: Any) -> Iterator[tuple[str, CollectorRegistry, CountingEncoder]]:
    """The API over doubles, served by uvicorn; its model takes 0.3 s a pass of at most 2 texts."""
    index, enc = MemoryIndex(), CountingEncoder(pause_s=0.3)
    index.ensure_collection(enc.dim)
    writer = IndexWriter(index, HashEncoder(), word_chunker(50, 5), SOURCES)
    rows = [(i, f"row {i} about loops and exceptions") for i in range(20)]
    writer.apply(
        [
            ChangeEvent("public.docs", Op.CREATE, {"id": i}, {"id": i, "body": b}, SourcePosition(i, 1_700_000_000_000))
            for i, b in rows
        ]
    )
    settings = load_settings(
        RagtideSettings,
        api={"query_batch": 2, "query_batch_window_ms": 0, **api},
        canary={"enabled": False},
    )
    registry = CollectorRegistry()
    app = create_app(
        settings, index, enc, SOURCES, registry=registry, gateway=Gateway(settings.gateway, MemoryGatewayStore())
    )
    with serve(app) as url:
        yield url, registry, enc


def burst(url: str, n: int, timeout_s: float, embeddings: bool = False) -> list[int | str]:
    """`n` searches (or embeddings requests) at once, each on its own connection; a client gives up after
    `timeout_s`."""

    async def one(http: httpx.AsyncClient, i: int) -> int | str:
        try:
            if embeddings:
                ask = {"model": "hash-bow", "input": f"burst query {i}"}
                resp = await http.post("/v1/embeddings", json=ask)
            else:
                resp = await http.post("/v1/search", json={"query": f"burst query {i}"})
        except httpx.TimeoutException:
            return "timeout"
        if resp.status_code == 503:
            assert resp.headers["retry-after"] == "1", resp.headers
            if embeddings:  # OpenAI's error shape, which its SDK parses (and retries after Retry-After)
                error = resp.json()["error"]
                assert error["type"] == "server_error" and error["code"] in ("overloaded_full", "overloaded_deadline")
                assert "overloaded" in error["message"] or "deadline" in error["message"], error
        return resp.status_code

    async def main() -> list[int | str]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(n)))

    return asyncio.run(main())


def shed_http(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("ragtide_http_shed_total", {"reason": reason}) or 0.0


def computed(enc: CountingEncoder) -> list[str]:
    return [t for p in enc.passes for t in p if t.startswith("burst")]


def settled(registry: CollectorRegistry) -> None:
    """Wait (bounded) until the server has finished with every request of the burst."""
    deadline = time.monotonic() + 20
    while registry.get_sample_value("ragtide_http_queries_in_progress"):
        assert time.monotonic() < deadline, "requests still in progress after 20 s"
        time.sleep(0.05)


def answered_afterwards(url: str) -> None:
    """A new request after the burst is answered: nothing is left queued for clients that left."""
    with httpx.Client(base_url=url, timeout=5) as http:
        resp = http.post("/v1/search", json={"query": "loops"})
    assert resp.status_code == 200 and resp.json()["hits"]


def test_a_burst_beyond_the_bound_is_shed_at_once_and_requests_past_the_deadline_are_not_computed() -> None:
    with slow_api(max_in_progress=8, queue_timeout_s=0.4) as (url, registry, enc):
        outcomes = burst(url, 64, timeout_s=5.0)
        settled(registry)
        # 8 admitted, the rest turned away at the edge. Of the 8, the model (2 texts a pass of 0.3 s or more) cannot
        # reach the last ones within the 0.4 s deadline: they are answered 503 without being computed.
        full, late = shed_http(registry, "full"), shed_http(registry, "deadline")
        assert set(outcomes) <= {200, 503}, outcomes
        assert full >= 1 and late >= 1, (full, late)
        assert outcomes.count(503) == full + late
        assert outcomes.count(200) == len(computed(enc))  # every 200 computed; nothing computed for a 503
        answered_afterwards(url)


def test_embeddings_requests_are_shed_in_openais_error_shape() -> None:
    with slow_api(max_in_progress=8, queue_timeout_s=0.4) as (url, registry, enc):
        outcomes = burst(url, 64, timeout_s=5.0, embeddings=True)
        settled(registry)
        full, late = shed_http(registry, "full"), shed_http(registry, "deadline")
        assert set(outcomes) <= {200, 503} and full >= 1 and late >= 1, (outcomes, full, late)
        assert outcomes.count(503) == full + late
        assert outcomes.count(200) == len(computed(enc))


def test_requests_whose_clients_left_are_not_computed() -> None:
    with slow_api(max_in_progress=8, queue_timeout_s=30) as (url, registry, enc):
        enc.hold.clear()  # the model is busy with the first pass until every client has left
        outcomes = burst(url, 8, timeout_s=0.5)
        assert outcomes == ["timeout"] * 8, outcomes
        enc.hold.set()
        settled(registry)
        gone = shed_http(registry, "gone")
        # the first pass (1 or 2 texts) had started; the others were dropped, not computed
        assert len(computed(enc)) <= 2 and len(computed(enc)) + gone == 8, (computed(enc), gone)
        answered_afterwards(url)


def test_clients_that_trickle_their_bodies_hold_no_place() -> None:
    """A place is taken once the body is in: clients that send headers and part of a body (slowly, or never
    finishing) cannot fill the bound and turn every search away."""
    with slow_api(max_in_progress=2, queue_timeout_s=30) as (url, _registry, _enc):
        host, port = url.removeprefix("http://").split(":")
        slow = []
        for _ in range(6):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            s.sendall(b"Content-Length: 100\r\n\r\n" + b'{"query": "')
            slow.append(s)
        try:
            time.sleep(0.3)
            answered_afterwards(url)
        finally:
            for s in slow:
                s.close()


def test_wrk_drives_distinct_queries_and_counts_shed_requests_apart() -> None:
    from ragtide.bench.load import best_qps_within, run_level

    with slow_api(max_in_progress=4, queue_timeout_s=1.0) as (url, registry, enc):
        level = run_level(url, connections=16, seconds=2, timeout_s=5)
        settled(registry)
    texts = [t for p in enc.passes for t in p if "(request " in t]
    assert level.ok > 0 and level.shed > 0 and level.clean, level
    assert level.ok <= len(texts)  # every 200 was a computed query
    assert len(set(texts)) == len(texts)  # every request its own query: no query-vector cache hit
    assert best_qps_within([level]) == 0.0  # a level that sheds does not count toward the goal


def test_admission_admits_exactly_max_in_progress_and_sheds_the_next() -> None:
    """Two places: the third request is answered 503 by the edge itself, its body read, without reaching the app;
    one that arrived while a place was free but found them all taken once its body was in is shed too."""
    entered: list[str] = []

    async def main() -> list[int]:
        release = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            entered.append(scope["path"])
            while (await receive()).get("more_body"):  # the whole body, as a route reads it
                pass
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        edge = AdmissionEdge(app, limit=2, timeout_s=5, metrics=QueryMetrics(CollectorRegistry()))

        async def call(parts: int = 1) -> int:
            chunks = [{"type": "http.request", "body": b"{", "more_body": True}] * (parts - 1)
            chunks.append({"type": "http.request", "body": b"}", "more_body": False})
            status: list[int] = []

            async def receive() -> dict[str, Any]:
                await asyncio.sleep(0)
                return chunks.pop(0)

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])

            try:
                await edge({"type": "http", "path": "/v1/search"}, receive, send)
            except Shed:
                return -503  # raised while the body came in (FastAPI answers it)
            return status[0]

        tasks = [asyncio.create_task(call(parts)) for parts in (1, 3, 1)]  # the second one's body comes slowly
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [200, -503, 200]
    assert len(entered) == 3  # every one arrived while a place was free

    async def full() -> list[int]:
        release = asyncio.Event()
        reached: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            reached.append(scope["path"])
            if scope.get("method", "POST") == "POST":  # the router answers another method 405, body unread
                await receive()
                await release.wait()

        metrics = QueryMetrics(CollectorRegistry())
        edge = AdmissionEdge(app, limit=1, timeout_s=5, metrics=metrics)
        held = asyncio.create_task(edge({"type": "http", "path": "/v1/search"}, body_once, ignore))
        await asyncio.sleep(0.01)
        sent: list[dict[str, Any]] = []

        async def record(message: dict[str, Any]) -> None:
            sent.append(message)

        async def unread() -> dict[str, Any]:
            raise AssertionError("a request shed on arrival is answered without reading its body")

        await edge({"type": "http", "method": "POST", "path": "/v1/search", "headers": []}, unread, record)
        await edge({"type": "http", "method": "GET", "path": "/v1/search", "headers": []}, body_once, ignore)
        release.set()
        await held
        assert reached == ["/v1/search", "/v1/search"]  # the GET went to the app (its 405), not counted as shed
        assert metrics.shed.labels("full")._value.get() == 1
        assert dict(sent[0]["headers"])[b"retry-after"] == b"1"
        assert json.loads(sent[1]["body"])["detail"].startswith("overloaded: 1 query requests in progress")
        return [sent[0]["status"]]

    assert asyncio.run(full()) == [503]


async def body_once() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def ignore(_: Any) -> None:
    pass
