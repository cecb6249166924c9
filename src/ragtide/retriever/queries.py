"""The query path's front: admission and micro-batching.

- **Admission** (`AdmissionEdge`, plain ASGI around the app): at most `api.max_in_progress` searches and
  embeddings requests are in progress; one more is answered a fast 503 with `Retry-After` before any other work
  (no key lookup, no thread): by the edge itself when the bound is full as it arrives, else as soon as its body is
  in, if the bound filled meanwhile. A request takes its place only once its body is in.
  Every request that embeds a query (answers and chat too) gets a deadline,
  `api.queue_timeout_s` after it arrived.
- **Micro-batching** (`QueryBatcher`): query texts that arrive while the model is busy, or within
  `api.query_batch_window_ms` of an idle model, share one forward pass of at most `api.query_batch` texts. Just
  before a pass, a request past its deadline or whose client disconnected is dropped (503), not computed: after
  an overload, the model works only for clients still waiting.

Every request turned away is counted in `ragtide_http_shed_total{reason}`: full, deadline, gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psycopg
from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge

from ragtide.contracts.errors import ClientError, StoreUnavailable
from ragtide.embedder.encoder import Encoder, Vectors
from ragtide.gateway.asgi import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Requests that embed a query: each gets a deadline for reaching the model. The short ones count toward the bound
# on requests in progress; an answer holds its request for the whole generation (seconds), bounded by the
# generator's own concurrency, so it does not take search's places.
QUERY_PATHS = frozenset({"/v1/search", "/v1/embeddings", "/v1/answer", "/v1/chat/completions"})
BOUNDED_PATHS = frozenset({"/v1/search", "/v1/embeddings"})
DEADLINE_KEY = "query_deadline"  # in request.state: time.monotonic() past which the request is not computed
RETRY_AFTER_S = 1


class Overloaded(Exception):
    """A query request turned away without being computed: 503 with Retry-After."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Shed(HTTPException):
    """Admission's fast 503: the bound on query requests in progress is full. An HTTPException because it is raised
    while the route reads the body, where FastAPI turns any other exception into a 400."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)})


REFUSED = (Shed, Overloaded, StoreUnavailable, psycopg.OperationalError)  # what `refusal` maps


def refusal(exc: Exception) -> tuple[str, str, dict[str, str]]:
    """The one mapping of a query turned away "not now" (one of `REFUSED`) to its 503: the detail, a code (OpenAI's
    error shape carries it) and the headers, with the Retry-After a client should honour. Admission and the
    deadline say retry in RETRY_AFTER_S; a store that is down (the index, or Postgres read directly) in
    StoreUnavailable.retry_after_s."""
    if isinstance(exc, Shed):
        return str(exc.detail), "overloaded_full", dict(exc.headers or {})
    if isinstance(exc, Overloaded):
        return str(exc), f"overloaded_{exc.reason}", {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, REFUSED):
        retry = exc.retry_after_s if isinstance(exc, StoreUnavailable) else StoreUnavailable.retry_after_s
        return str(exc), "index_unavailable", {"Retry-After": str(retry)}
    raise TypeError(f"not a refusal: {exc!r}")


class QueryMetrics:
    """The query path's own metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.shed = Counter(
            "ragtide_http_shed",
            "query requests answered 503 without being computed: full (api.max_in_progress were in progress), "
            "deadline (not reached the model within api.queue_timeout_s), gone (the client disconnected)",
            ["reason"],
            registry=registry,
        )
        for reason in ("full", "deadline", "gone"):  # every series exists from the start (0), for alerts and tests
            self.shed.labels(reason)
        self.in_progress = Gauge(
            "ragtide_http_queries_in_progress", "query requests admitted and not yet answered", registry=registry
        )
        self.batch_texts = Counter(
            "ragtide_query_embedded_texts", "query texts embedded (in micro-batches)", registry=registry
        )
        self.batches = Counter("ragtide_query_forward_passes", "forward passes over query texts", registry=registry)


ShedAnswer = Callable[[str, Shed], ASGIApp]  # (path, the refusal) -> its 503, in that path's error shape


def plain_shed(path: str, exc: Shed) -> ASGIApp:
    """What FastAPI answers for the HTTPException: {"detail": ...}, with its headers (Retry-After)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class AdmissionEdge:
    """ASGI middleware: the bound on query requests in progress, and each one's deadline."""

    def __init__(
        self, app: ASGIApp, limit: int, timeout_s: float, metrics: QueryMetrics, answer: ShedAnswer = plain_shed
    ) -> None:
        """`answer` makes the 503 of a request shed on arrival, in its path's error shape (OpenAI's routes have
        their own)."""
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.answer = answer
        self.in_progress = 0

    def _full(self) -> Shed:
        self.metrics.shed.labels("full").inc()
        return Shed(f"overloaded: {self.in_progress} query requests in progress (api.max_in_progress); retry")

    async def _shed_now(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Full on arrival: answer the 503 here, without reading the body (the server discards it, and keeps the
        connection) and without the app's middleware, routing or body parsing: under a flood, a shed answer costs
        little more than HTTP parsing."""
        await self.answer(scope["path"], self._full())(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in QUERY_PATHS:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[DEADLINE_KEY] = time.monotonic() + self.timeout_s
        if scope["path"] not in BOUNDED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit and scope.get("method") == "POST":  # (other methods: 405, not work)
            await self._shed_now(scope, receive, send)
            return
        counted = False

        async def receive_then_count() -> Message:
            nonlocal counted
            message = await receive()
            if not counted and message["type"] == "http.request" and not message.get("more_body", False):
                # The body is in (the app reads it before any other work): only now does the request take a place,
                # so clients that trickle their bodies cannot hold every place.
                if self.in_progress >= self.limit:  # filled up while this body came in
                    raise self._full()
                counted = True
                self.in_progress += 1
                self.metrics.in_progress.inc()
            return message

        try:
            await self.app(scope, receive_then_count, send)
        finally:
            if counted:
                self.in_progress -= 1
                self.metrics.in_progress.dec()


Gone = Callable[[], Awaitable[bool]]


@dataclass
class _Ask:
    encoder: Encoder
    texts: list[str]
    future: asyncio.Future[Vectors]
    deadline: float | None
    gone: Gone | None


class _Queue:
    """One event loop's asks and the task that serves them (a TestClient or a test may bring another loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[_Ask] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class QueryBatcher:
    """Query texts -> vectors, many requests to a forward pass; one pass at a time, on a thread of its own (not the
    default pool, where searches, key lookups and the embedder's writes queue)."""

    def __init__(self, max_texts: int, window_s: float, metrics: QueryMetrics) -> None:
        self.max_texts = max_texts
        self.window_s = window_s
        self.metrics = metrics
        self._queues: dict[asyncio.AbstractEventLoop, _Queue] = {}
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-model")

    async def embed(
        self, encoder: Encoder, texts: Sequence[str], deadline: float | None = None, gone: Gone | None = None
    ) -> Vectors:
        """The vectors of `texts`, in order. Raises Overloaded if the request is dropped before its pass."""
        if not texts:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            self._queues = {lp: q for lp, q in self._queues.items() if not lp.is_closed()}
            queue = self._queues[loop] = _Queue(loop)
        if queue.task is None or queue.task.done():
            queue.task = loop.create_task(self._run(queue), name="query-batcher")
        ask = _Ask(encoder, list(texts), loop.create_future(), deadline, gone)
        queue.pending.append(ask)
        queue.wake.set()
        return await ask.future

    async def close(self) -> None:
        """Stop this loop's batching task; its waiting requests get Overloaded."""
        queue = self._queues.pop(asyncio.get_running_loop(), None)
        if queue is None:
            return
        if queue.task is not None:
            queue.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queue.task
        _fail(queue.pending, Overloaded("closed", "the API is shutting down"))
        queue.pending.clear()

    async def _run(self, queue: _Queue) -> None:
        while True:
            if not queue.pending:
                queue.wake.clear()
                await queue.wake.wait()
                if self.window_s > 0:  # an idle model: let concurrent queries join the first one's pass
                    await asyncio.sleep(self.window_s)
            asks = self._take(queue.pending)
            try:
                await self._pass(asks)
            except Exception as exc:  # never let the batching task die, nor leave an ask without an answer
                log.exception("query batch failed")
                _fail(asks, exc)
            except asyncio.CancelledError:
                _fail(asks, Overloaded("closed", "the API is shutting down"))
                raise

    def _take(self, pending: list[_Ask]) -> list[_Ask]:
        """The oldest asks up to max_texts texts (at least one ask, however many texts it has)."""
        taken: list[_Ask] = []
        n = 0
        while pending and (not taken or n + len(pending[0].texts) <= self.max_texts):
            ask = pending.pop(0)
            taken.append(ask)
            n += len(ask.texts)
        return taken

    async def _admit(self, asks: list[_Ask]) -> list[_Ask]:
        """Drop the asks nobody waits for any more: cancelled, past their deadline, or their client gone."""
        now = time.monotonic()
        live = []
        for ask in asks:
            if ask.future.done():
                continue
            if ask.deadline is not None and now > ask.deadline:
                self._drop(ask, "deadline", "overloaded: the request waited past api.queue_timeout_s; retry")
            else:
                live.append(ask)
        gone = await asyncio.gather(*(a.gone() if a.gone else _false() for a in live), return_exceptions=True)
        kept = []
        for ask, left in zip(live, gone, strict=True):
            if left is True:
                self._drop(ask, "gone", "the client disconnected")
            elif not ask.future.done():  # cancelled while the checks ran
                kept.append(ask)
        return kept

    def _drop(self, ask: _Ask, reason: str, detail: str) -> None:
        if not ask.future.done():
            self.metrics.shed.labels(reason).inc()
            ask.future.set_exception(Overloaded(reason, detail))

    async def _pass(self, asks: list[_Ask]) -> None:
        asks = await self._admit(asks)
        groups: dict[int, list[_Ask]] = {}
        for ask in asks:  # a generation switch can leave asks for two encoders in one batch
            groups.setdefault(id(ask.encoder), []).append(ask)
        loop = asyncio.get_running_loop()
        for group in groups.values():
            texts = [t for ask in group for t in ask.texts]
            try:
                vectors = await loop.run_in_executor(self._model, group[0].encoder.encode, texts)
            except ClientError as exc:  # an input the model refuses (a provider's 422): fail only its own request
                if len(group) == 1:
                    _fail(group, exc)
                    continue
                for ask in group:
                    try:
                        alone = await loop.run_in_executor(self._model, ask.encoder.encode, ask.texts)
                    except Exception as one:
                        _fail([ask], one)
                    else:
                        if not ask.future.done():
                            ask.future.set_result(np.asarray(alone, dtype=np.float32))
                continue
            except Exception as exc:
                _fail(group, exc)
                continue
            self.metrics.batches.inc()
            self.metrics.batch_texts.inc(len(texts))
            start = 0
            for ask in group:
                end = start + len(ask.texts)
                if not ask.future.done():
                    ask.future.set_result(np.asarray(vectors[start:end], dtype=np.float32))
                start = end


def _fail(asks: Sequence[_Ask], exc: BaseException) -> None:
    for ask in asks:
        if not ask.future.done():
            ask.future.set_exception(exc)


async def _false() -> bool:
    return False
