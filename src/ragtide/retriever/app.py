"""The retrieval API: `create_app(settings, index, encoder, sources)` is its composition root."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from ragtide.contracts.errors import ClientError, StoreUnavailable
from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.logging import BackgroundFailures
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.encoder import Encoder
from ragtide.embedder.index.base import ActiveIndex, FixedIndex, VectorIndex
from ragtide.embedder.liveness import Verdict
from ragtide.gateway.asgi import GatewayEdge
from ragtide.gateway.gateway import Gateway, check_config
from ragtide.gateway.store import PostgresGatewayStore
from ragtide.generator.client import Generator, OpenAIGenerator
from ragtide.ingest.slot import SlotMonitor
from ragtide.ingest.sources import SourcesConfig, source_dbs
from ragtide.retriever.answer import answer_router
from ragtide.retriever.cache import SemanticCache
from ragtide.retriever.canary import Canary
from ragtide.retriever.dashboard import DASHBOARD_HTML, counters_from
from ragtide.retriever.openai_compat import openai_router, shed_answer
from ragtide.retriever.openapi import tailored_openapi
from ragtide.retriever.queries import REFUSED, AdmissionEdge, refusal
from ragtide.retriever.schemas import (
    QUERY_RESPONSES,
    Health,
    IndexStats,
    SearchRequest,
    SearchResponse,
    TableStats,
    ValidationErrorBody,
)
from ragtide.retriever.services import (
    CallerDep,
    Services,
    ServicesDep,
    build_filter,
    check_query,
    query_tokens,
    retrieve,
    to_hit,
)

log = logging.getLogger(__name__)

WindowS = Annotated[float, Query(ge=1, le=3600, description="seconds of history the percentiles cover")]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def settle_garbage_collector() -> None:
    """Startup is done (torch, the model, Faust: ~550k long-lived objects): move them out of the collector's
    reach. Otherwise every full collection walks them all and stalls the event loop for ~350 ms on this
    machine, which showed up as 300+ ms outliers in search, answer and cache-hit latency."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: RagtideSettings,
    active: ActiveIndex | VectorIndex,
    encoder: Encoder | None,
    sources: SourcesConfig,
    registry: CollectorRegistry | None = None,
    lifespan: Lifespan | None = None,
    tracker: FreshnessTracker | None = None,
    routers: Sequence[APIRouter] = (),
    status: Callable[[], dict[str, Any]] | None = None,
    gateway: Gateway | None = None,
    generator: Generator | None = None,
    cache: SemanticCache | None = None,
    health: Callable[[], Verdict] | None = None,
) -> FastAPI:
    """Build the API over `active` (a switching view of the live generation) or one fixed index + encoder;
    `lifespan` lets the node run the embedder in the same event loop; `status` reports the generations;
    `gateway` and `generator` default to the configured ones (Postgres-backed keys, the OpenAI-compatible URL);
    `health` is the in-process embedder's liveness verdict (the node), reported by /healthz."""
    check_config(settings)
    if not isinstance(active, ActiveIndex):
        if encoder is None:
            raise TypeError("a fixed index needs its encoder")
        active = FixedIndex(active, encoder)
    registry = registry or CollectorRegistry()
    store: PostgresGatewayStore | None = None
    if gateway is None:
        store = PostgresGatewayStore(settings.postgres.state())
        gateway = Gateway(settings.gateway, store, registry=registry)
    if generator is None and settings.generator.endpoint:
        generator = OpenAIGenerator(settings.generator)
    tracker = tracker or FreshnessTracker(registry)
    svc = Services(settings, active, sources, registry, tracker, gateway, generator, status, cache)
    if settings.canary.enabled:
        if settings.postgres.source_writes:  # a read-only source has no canary table
            svc.canary = Canary(settings.postgres.dsn(), active, svc.tracker, settings.canary, svc.query_vectors)
        if settings.connect.slot_check_s > 0:
            slots = [
                (db.settings.postgres.dsn(), db.settings.connect.slot_name) for db in source_dbs(settings, sources)
            ]
            svc.slot = SlotMonitor(
                slots,
                registry,
                settings.connect.slot_check_s,
                BackgroundFailures.of(registry),
            )
    live = active

    @asynccontextmanager
    async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
        index, enc = live.current()
        await asyncio.to_thread(index.ensure_collection, enc.dim)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if lifespan is not None:
                    await stack.enter_async_context(lifespan(app))
                if store is not None:
                    try:
                        await asyncio.to_thread(store.migrate)
                    except StoreUnavailable as exc:  # serve anyway: its tables are made before its first statement
                        log.warning("gateway store unavailable at start-up", extra={"error": str(exc)})
                canary_task = asyncio.create_task(svc.canary.run()) if svc.canary else None
                slot_task = asyncio.create_task(svc.slot.run()) if svc.slot else None
                settle_garbage_collector()
                try:
                    yield
                finally:
                    await svc.batcher.close()
                    if svc.generator is not None:
                        await svc.generator.aclose()
                    if store is not None:
                        store.close()
                    if cache is not None:
                        cache.close()
                    for task in (canary_task, slot_task):
                        if task is not None:
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
        finally:
            await asyncio.to_thread(live.close)

    app = FastAPI(
        title="ragtide",
        version="0.1.0",
        lifespan=_lifespan,
        description="Fresh retrieval over a CDC-maintained vector index.",
        responses={422: {"model": ValidationErrorBody, "description": "the request is invalid; detail says how"}},
    )
    app.state.services = svc
    app.state.gateway = svc.gateway
    metadata = sorted(svc.filterable - {"table"})
    app.openapi = tailored_openapi(app, settings, svc.user_tables, metadata)  # type: ignore[method-assign]
    if settings.dashboard.assets_dir.is_dir():
        app.mount("/static", StaticFiles(directory=settings.dashboard.assets_dir), name="static")

    openai = openai_router()
    for router in (*routers, answer_router(), openai):
        app.include_router(router)

    app.add_middleware(GatewayEdge, gateway=svc.gateway, max_body_bytes=settings.gateway.max_body_bytes)
    # outermost: an overloaded API turns a query request away before any other work
    api = settings.api
    app.add_middleware(
        AdmissionEdge,
        limit=api.max_in_progress,
        timeout_s=api.queue_timeout_s,
        metrics=svc.query_metrics,
        answer=shed_answer({route.path for route in openai.routes if isinstance(route, APIRoute)}),
    )

    internal_errors = Counter(
        "ragtide_http_internal_errors_total",
        "requests that failed on our side (HTTP 500): a bug, alert on it",
        ["exception"],
        registry=registry,
    )

    @app.exception_handler(ClientError)
    async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    async def _refused(_: Request, exc: Exception) -> JSONResponse:
        detail, _code, headers = refusal(exc)
        return JSONResponse(status_code=503, content={"detail": detail}, headers=headers)

    for refused in REFUSED:  # overload, and a store that is down (the index; Postgres read directly by verify)
        if not issubclass(refused, HTTPException):  # those FastAPI's own handler answers, with their headers
            app.add_exception_handler(refused, _refused)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        internal_errors.labels(type(exc).__name__).inc()
        log.error("internal error", exc_info=exc, extra={"path": request.url.path, "exception": type(exc).__name__})
        return JSONResponse(
            status_code=500, content={"detail": f"internal error ({type(exc).__name__}); it was logged"}
        )

    @app.post("/v1/search", response_model=SearchResponse, tags=["retrieval"], responses=QUERY_RESPONSES)
    async def search(body: SearchRequest, request: Request, svc: ServicesDep, caller: CallerDep) -> SearchResponse:
        """Semantic search over the freshest indexed state of the source tables (the caller's tenant only)."""
        t0 = time.perf_counter()
        k = check_query(svc, body.query, body.k)
        flt = build_filter(svc, body.filter, caller)
        hits = await retrieve(svc, body.query, k, flt, request)
        if caller.tenant is not None:  # only tenants have a quota
            await asyncio.to_thread(svc.gateway.charge, caller, query_tokens(body.query))
        now = time.time()
        took = time.perf_counter() - t0
        svc.serving.request("search", took)
        return SearchResponse(query=body.query, k=k, hits=[to_hit(h, now) for h in hits], took_ms=round(took * 1000, 2))

    @app.get("/v1/index/stats", response_model=IndexStats, tags=["retrieval"])
    async def index_stats(svc: ServicesDep) -> IndexStats:
        """How many rows and chunks of each source table are indexed."""
        tables: dict[str, TableStats] = {}
        index, _ = svc.active.current()
        for table in svc.user_tables:
            points = await asyncio.to_thread(index.count, {"table": table})
            rows = await asyncio.to_thread(index.count, {"table": table, "chunk_no": 0})
            tables[table] = TableStats(rows=rows, chunks=points)
        generation = svc.generation_status() if svc.generation_status else None
        return IndexStats(points=sum(t.chunks for t in tables.values()), tables=tables, generation=generation)

    @app.get("/v1/freshness", tags=["freshness"])
    async def freshness(svc: ServicesDep, window_s: WindowS = 60.0) -> dict[str, Any]:
        """Commit -> searchable now: the canary, per-change percentiles, per-stage breakdown, lag, counters."""
        snap = svc.tracker.snapshot(window_s=window_s)
        snap["counters"] = counters_from(svc.registry)
        if svc.canary is not None:
            ok, detail = svc.canary.readiness()
            snap["canary"]["ready"], snap["canary"]["detail"] = ok, detail
        if svc.slot is not None and svc.slot.state is not None:
            snap["slot"] = svc.slot.state.as_dict()
            snap["slots"] = [state.as_dict() for state in svc.slot.states.values()]
        return snap

    @app.get("/v1/freshness/changes", tags=["freshness"])
    async def freshness_changes(
        svc: ServicesDep,
        since_ms: Annotated[int, Query(ge=0, description="epoch ms")] = 0,
        limit: Annotated[int, Query(ge=1, le=50_000)] = 50_000,
    ) -> dict[str, Any]:
        """Per-change stage timestamps of changes acknowledged since `since_ms` (for benchmarks)."""
        changes = svc.tracker.changes(since_ms, limit=limit)
        return {"changes": [c.as_dict() for c in changes], "canary": [[t, s] for t, s in svc.tracker.canary(since_ms)]}

    @app.get("/v1/serving", tags=["ops"])
    async def serving(svc: ServicesDep, window_s: WindowS = 60.0) -> dict[str, Any]:
        """Serving now: request latency p50/p95/p99 and rate per endpoint, time to first token, inter-token
        latency, tokens/s, tokens and cost since start, and the generator's circuit."""
        snap = svc.serving.snapshot(window_s)
        snap["generator"] = svc.generator_state()
        snap["cache"] = svc.cache.stats() if svc.cache is not None else None
        return snap

    @app.get("/dashboard", response_class=HTMLResponse, tags=["freshness"])
    async def dashboard() -> HTMLResponse:
        """The live freshness dashboard."""
        return HTMLResponse(DASHBOARD_HTML)

    @app.get("/healthz", response_model=Health, tags=["ops"], responses={503: {"model": Health}})
    async def healthz(response: Response) -> Health:
        """Liveness: the process answers; in the node, also its embedder's verdict: 503 when stalled or blocked
        (a restart helps), 200 'degraded' when a store has been unavailable for `batch.degraded_after_s`."""
        if health is None:
            return Health(status="ok")
        verdict = health()
        if not verdict.ok:
            response.status_code = 503
        return Health(status=verdict.status, checks={"embedder": verdict.reason})

    @app.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": Health}})
    async def readyz(svc: ServicesDep, response: Response, freshness: bool = True) -> Health:
        """Readiness: the index answers, the encoder is loaded, the canary is fresh enough, and Postgres has not
        invalidated the replication slot (the detail then names the fix: `ragtide resync`).

        `?freshness=false` leaves the canary and the slot out of the verdict (still reported): a load balancer's
        probe, so that a pipeline stall upstream (every replica's canary fails at once) leaves stale search up, not
        an outage.
        """
        checks: dict[str, str] = {}
        try:
            index, encoder = svc.active.current()
            n = await asyncio.to_thread(index.count)
            checks["index"] = f"ok ({n} points)"
            checks["encoder"] = f"ok ({encoder.model_name}, dim {encoder.dim})"
        except Exception as exc:
            checks["index"] = f"unavailable: {exc}"
        if svc.canary is not None:
            ok, detail = svc.canary.readiness()
            checks["canary"] = detail if ok else f"unready: {detail}"
        if svc.slot is not None:
            ok, detail = svc.slot.readiness()
            checks["slot"] = detail if ok else f"unready: {detail}"
        ready = all(v.startswith("ok") for k, v in checks.items() if freshness or k not in ("canary", "slot"))
        if not ready:
            response.status_code = 503
        return Health(status="ready" if ready else "unready", checks=checks)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(svc: ServicesDep) -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    return app
