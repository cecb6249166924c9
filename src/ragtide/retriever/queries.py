"""The query path's front: admission and micro-batching.

- **Admission** (`AdmissionEdge`, plain ASGI around the app): at most `api.max_in_progress` searches and
  embeddings requests are in progress; one more is answered a fast 503 with `Retry-After` before any work (no key
  lookup, no thread). Every request that embeds a query (answers and chat too) gets a deadline,
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
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from ragtide.embedder.encoder import Encoder, Vectors
from ragtide.gateway.asgi import ASGIApp, Receive, Scope, Send, refuse

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
        self.in_progress = Gauge(
            "ragtide_http_queries_in_progress", "query requests admitted and not yet answered", registry=registry
        )
        self.batch_texts = Counter(
            "ragtide_query_embedded_texts", "query texts embedded (in micro-batches)", registry=registry
        )
        self.batches = Counter("ragtide_query_forward_passes", "forward passes over query texts", registry=registry)


class AdmissionEdge:
    """ASGI middleware: the bound on query requests in progress, and each one's deadline."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float, metrics: QueryMetrics) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in QUERY_PATHS:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[DEADLINE_KEY] = time.monotonic() + self.timeout_s
        if scope["path"] not in BOUNDED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            self.metrics.shed.labels("full").inc()
            detail = f"overloaded: {self.in_progress} query requests in progress (api.max_in_progress); retry"
            await refuse(send, 503, detail, retry_after=RETRY_AFTER_S)
            return
        self.in_progress += 1
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send)
        finally:
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


class QueryBatcher:
    """Query texts -> vectors, many requests to a forward pass; one pass at a time, on a worker thread."""

    def __init__(self, max_texts: int, window_s: float, metrics: QueryMetrics) -> None:
        self.max_texts = max_texts
        self.window_s = window_s
        self.metrics = metrics
        self._pending: list[_Ask] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def embed(
        self, encoder: Encoder, texts: Sequence[str], deadline: float | None = None, gone: Gone | None = None
    ) -> Vectors:
        """The vectors of `texts`, in order. Raises Overloaded if the request is dropped before its pass."""
        if not texts:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._wake = loop, asyncio.Event()
            self._task = loop.create_task(self._run(), name="query-batcher")
        ask = _Ask(encoder, list(texts), loop.create_future(), deadline, gone)
        self._pending.append(ask)
        assert self._wake is not None
        self._wake.set()
        return await ask.future

    async def close(self) -> None:
        """Stop the batching task; waiting requests get Overloaded."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for ask in self._pending:
            if not ask.future.done():
                ask.future.set_exception(Overloaded("closed", "the API is shutting down"))
        self._pending.clear()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                if self.window_s > 0:  # an idle model: let concurrent queries join the first one's pass
                    await asyncio.sleep(self.window_s)
            try:
                await self._pass(self._take())
            except Exception:  # never let the batching task die: each ask has its outcome already
                log.exception("query batch failed")

    def _take(self) -> list[_Ask]:
        """The oldest asks up to max_texts texts (at least one ask, however many texts it has)."""
        taken: list[_Ask] = []
        n = 0
        while self._pending and (not taken or n + len(self._pending[0].texts) <= self.max_texts):
            ask = self._pending.pop(0)
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
            else:
                kept.append(ask)
        return kept

    def _drop(self, ask: _Ask, reason: str, detail: str) -> None:
        self.metrics.shed.labels(reason).inc()
        ask.future.set_exception(Overloaded(reason, detail))

    async def _pass(self, asks: list[_Ask]) -> None:
        asks = await self._admit(asks)
        groups: dict[int, list[_Ask]] = {}
        for ask in asks:  # a generation switch can leave asks for two encoders in one batch
            groups.setdefault(id(ask.encoder), []).append(ask)
        for group in groups.values():
            texts = [t for ask in group for t in ask.texts]
            try:
                vectors = await asyncio.to_thread(group[0].encoder.encode, texts)
            except Exception as exc:
                for ask in group:
                    if not ask.future.done():
                        ask.future.set_exception(exc)
                continue
            self.metrics.batches.inc()
            self.metrics.batch_texts.inc(len(texts))
            start = 0
            for ask in group:
                end = start + len(ask.texts)
                if not ask.future.done():
                    ask.future.set_result(np.asarray(vectors[start:end], dtype=np.float32))
                start = end


async def _false() -> bool:
    return False
