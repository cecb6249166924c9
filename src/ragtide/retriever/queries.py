"""The query path's front: admission and micro-batching.

- **Admission** (`AdmissionEdge`, plain ASGI around the app): at most `api.max_in_progress` searches and
  embeddings requests are in progress; one more is answered a fast 503 with `Retry-After` before any other work
  (no key lookup, no thread): by the edge itself when the bound is full as it arrives, else as soon as its body is
  in, if the bound filled meanwhile. A request takes its place only once its body is in.
  Every request that embeds a query (answers and chat too) gets a deadline,
  `api.queue_timeout_s` after it arrived.
- **Micro-batching** (`QueryBatcher`): query texts that arrive while the model is busy, or within
  `api.query_batch_window_ms` of an idle model, share one forward pass of at most `api.query_batch` texts. A
  request whose client disconnects while it is queued is dropped (503) the moment it leaves, one past its
  deadline just before its pass: neither is computed, so after an overload the model works only for clients
  still waiting.

Every request turned away is counted in `ragtide_http_shed_total{reason}`: full, deadline, gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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


@dataclass(eq=False)
class _Ask:
    encoder: Encoder
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Vectors]
    deadline: float | None
    queued: bool = True  # False once out of the queue: taken for a pass (computed now), or withdrawn


# What the model thread hands back to an ask's loop: (ask, vectors, error, shed reason or "").
_Outcome = tuple[_Ask, Vectors | None, BaseException | None, str]


class QueryBatcher:
    """Query texts -> vectors, many requests to a forward pass, on a model thread of its own (not the default
    pool, where searches, key lookups and the embedder's writes queue).

    The model thread takes its next batch itself the moment a pass ends: the model never waits for the event loop
    to hand back vectors and collect the next batch (at 32 connections it did, 40% of the time). Requests are
    queued from any event loop and answered on their own loop. A queued request whose client disconnects is
    dropped as it leaves (a watcher on its ASGI `receive`) and takes no room in a batch; one past its deadline is
    dropped by the model thread just before the pass."""

    def __init__(self, max_texts: int, window_s: float, metrics: QueryMetrics) -> None:
        self.max_texts = max_texts
        self.window_s = window_s
        self.metrics = metrics
        self._pending: deque[_Ask] = deque()
        self._pending_texts = 0
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None  # the model thread; None once it stops (or is stopping)
        self._closing = False  # the last loop closed: the thread stops when nothing is pending

    async def embed(
        self,
        encoder: Encoder,
        texts: Sequence[str],
        deadline: float | None = None,
        receive: Receive | None = None,
    ) -> Vectors:
        """The vectors of `texts`, in order. Raises Overloaded if the request is dropped before its pass: past
        `deadline` (time.monotonic()), or its client gone (`receive`, the request's ASGI receive once its body is
        read, says http.disconnect)."""
        if not texts:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        ask = _Ask(encoder, list(texts), loop, loop.create_future(), deadline)
        with self._ready:
            self._closing = False
            if self._thread is None:
                self._start_thread()
            self._pending.append(ask)
            self._pending_texts += len(ask.texts)
            self._ready.notify()
        # Answered while still queued (its client gone, the request cancelled, closed): out of the queue at once,
        # so it takes no room in a batch.
        ask.future.add_done_callback(lambda _: self._withdraw(ask))
        if receive is None:
            return await ask.future
        watcher = loop.create_task(self._watch(ask, receive))
        try:
            return await ask.future
        finally:
            watcher.cancel()

    async def close(self) -> None:
        """Turn away this loop's queued requests (Overloaded): the API is shutting down; one already in a pass gets
        its vectors if its loop still runs. Once the queue is empty the model thread stops (the next request starts
        another)."""
        loop = asyncio.get_running_loop()
        with self._ready:
            mine = [a for a in self._pending if a.loop is loop]
            for ask in mine:
                self._unqueue(ask)
            self._closing = True
            self._ready.notify_all()
        _fail(mine, Overloaded("closed", "the API is shutting down"))

    def _start_thread(self) -> None:
        """Under the lock: start the model thread."""
        self._thread = threading.Thread(target=self._serve, name="query-model", daemon=True)
        self._thread.start()

    def _unqueue(self, ask: _Ask) -> None:
        """Under the lock: take a queued ask out of the queue."""
        self._pending.remove(ask)
        self._pending_texts -= len(ask.texts)
        ask.queued = False

    def _withdraw(self, ask: _Ask) -> bool:
        """Take the ask out of the queue unless the model thread has taken it; whether it was still queued."""
        with self._ready:
            if not ask.queued:
                return False
            self._unqueue(ask)
            return True

    async def _watch(self, ask: _Ask, receive: Receive) -> None:
        """Drop the ask the moment its client disconnects, if it is still queued (once in a pass it is computed).
        Called once the request's body is read: an ASGI server's receive then returns only on a disconnect (or when
        the response is complete, by which time this watcher is cancelled)."""
        try:
            message = await receive()
        except Exception:  # the server's receive failed: no disconnect to act on (the response will tell)
            return
        if message.get("type") == "http.disconnect" and self._withdraw(ask):
            self._drop(ask, "gone", "the client disconnected")

    def _drop(self, ask: _Ask, reason: str, detail: str) -> None:
        """On the ask's loop: answer it Overloaded, counted, unless it was answered meanwhile."""
        if not ask.future.done():
            self.metrics.shed.labels(reason).inc()
            ask.future.set_exception(Overloaded(reason, detail))

    # The model thread --------------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while (asks := self._next()) is not None:
                outcomes: list[_Outcome] = []
                try:
                    self._pass(asks, outcomes)
                except Exception as exc:  # never let the thread die, nor leave an ask without an answer
                    log.exception("query batch failed")
                    self._hand_back(_unanswered(asks, outcomes, exc))
                    continue
                except BaseException:  # dying after all (interpreter exit): answer its asks first
                    self._hand_back(_unanswered(asks, outcomes, Overloaded("closed", "the query model stopped")))
                    raise
                self._hand_back(outcomes)
        finally:
            with self._ready:
                if self._thread is threading.current_thread():  # died: another serves what is queued
                    self._thread = None
                    if self._pending:
                        self._start_thread()

    def _next(self) -> list[_Ask] | None:
        """The oldest asks up to max_texts texts (at least one ask, however many texts it has); waits for one, and
        when the model was idle, `window_s` more for concurrent queries to join it. None: closed, stop."""
        with self._ready:
            idle = False
            while not self._pending:
                if self._closing:
                    self._thread = None  # under the lock: a request from now on starts another thread
                    return None
                idle = True
                self._ready.wait()
            if idle and self.window_s > 0:
                until = time.monotonic() + self.window_s
                while self._pending_texts < self.max_texts and (left := until - time.monotonic()) > 0:
                    self._ready.wait(left)
            taken: list[_Ask] = []
            n = 0
            while self._pending and (not taken or n + len(self._pending[0].texts) <= self.max_texts):
                ask = self._pending[0]
                self._unqueue(ask)
                taken.append(ask)
                n += len(ask.texts)
            return taken

    def _pass(self, asks: list[_Ask], outcomes: list[_Outcome]) -> None:
        """One forward pass per encoder over the asks still waited for; their outcomes appended to `outcomes`."""
        now = time.monotonic()
        groups: dict[int, list[_Ask]] = {}
        for ask in asks:
            if ask.future.done():  # its client left, or its request was cancelled, while it waited
                continue
            if ask.deadline is not None and now > ask.deadline:
                outcomes.append((ask, None, None, "deadline"))
            else:  # a generation switch can leave asks for two encoders in one batch
                groups.setdefault(id(ask.encoder), []).append(ask)
        for group in groups.values():
            texts = [t for ask in group for t in ask.texts]
            try:
                vectors = group[0].encoder.encode(texts)
            except ClientError as exc:  # an input the model refuses (a provider's 422): fail only its own request
                if len(group) == 1:
                    outcomes.append((group[0], None, exc, ""))
                    continue
                for ask in group:
                    try:
                        outcomes.append((ask, np.asarray(ask.encoder.encode(ask.texts), dtype=np.float32), None, ""))
                    except Exception as one:
                        outcomes.append((ask, None, one, ""))
                continue
            except Exception as exc:
                outcomes += [(ask, None, exc, "") for ask in group]
                continue
            self.metrics.batches.inc()
            self.metrics.batch_texts.inc(len(texts))
            start = 0
            for ask in group:
                end = start + len(ask.texts)
                outcomes.append((ask, np.asarray(vectors[start:end], dtype=np.float32), None, ""))
                start = end

    def _hand_back(self, outcomes: list[_Outcome]) -> None:
        """Each loop's outcomes in one call on that loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, mine in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(self._settle, mine)

    def _settle(self, outcomes: list[_Outcome]) -> None:
        for ask, vectors, error, reason in outcomes:
            if reason:
                self._drop(ask, reason, "overloaded: the request waited past api.queue_timeout_s; retry")
            elif ask.future.done():
                continue
            elif error is not None:
                ask.future.set_exception(error)
            else:
                ask.future.set_result(vectors)  # type: ignore[arg-type]


def _unanswered(asks: Sequence[_Ask], outcomes: list[_Outcome], exc: BaseException) -> list[_Outcome]:
    """The outcomes so far, and `exc` for every ask without one."""
    answered = {id(o[0]) for o in outcomes}
    return outcomes + [(a, None, exc, "") for a in asks if id(a) not in answered]


def _fail(asks: Sequence[_Ask], exc: BaseException) -> None:
    for ask in asks:
        if not ask.future.done():
            ask.future.set_exception(exc)
