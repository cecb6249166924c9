"""The retrieval API: `create_app(settings, index, encoder, sources)` is its composition root."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.encoder import Encoder
from ragtide.embedder.index.base import ActiveIndex, Filter, FixedIndex, Hit, VectorIndex
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.canary import Canary
from ragtide.retriever.dashboard import DASHBOARD_HTML, counters_from
from ragtide.retriever.schemas import Health, IndexStats, SearchHit, SearchRequest, SearchResponse, TableStats

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class Services:
    """What the routes need, built once by the composition root."""

    def __init__(
        self,
        settings: RagtideSettings,
        active: ActiveIndex,
        sources: SourcesConfig,
        registry: CollectorRegistry,
        tracker: FreshnessTracker,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.active = active
        self.generation_status = status
        self.sources = sources
        self.registry = registry
        self.tracker = tracker
        self.canary: Canary | None = None
        self.user_tables = sources.user_tables
        self.filterable = {"table"} | {m for s in sources.sources for m in s.metadata}
        self.latency = Histogram(
            "ragtide_request_seconds",
            "API request latency",
            ["endpoint"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )


def get_services(request: Request) -> Services:
    """The Services of this app instance."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _iso(ms: Any) -> str | None:
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat() if ms else None


def to_hit(h: Hit, now: float) -> SearchHit:
    """A stored point as an API hit."""
    p = h.payload
    ts = p.get("source_ts_ms")
    return SearchHit(
        id=h.id,
        score=h.score,
        text=str(p.get("text", "")),
        table=str(p.get("table", "")),
        key=p.get("key") or {},
        row_id=str(p.get("row_id", "")),
        chunk_no=int(p.get("chunk_no", 0)),
        chunk_count=int(p.get("chunk_count", 1)),
        metadata=p.get("metadata") or {},
        source_commit_ts=_iso(ts),
        indexed_at=_iso(p.get("indexed_at_ms")),
        age_s=round(now - int(ts) / 1000, 3) if ts else None,
    )


def build_filter(services: Services, requested: dict[str, Any] | None) -> Filter:
    """Map the request's filter onto payload paths; unknown columns are a 422 that names them.

    Searches always stay within the user's source tables (never ragtide's own canary rows).
    """
    flt: dict[str, Any] = {"table": services.user_tables}
    for key, value in (requested or {}).items():
        if key not in services.filterable:
            allowed = ", ".join(sorted(services.filterable))
            raise HTTPException(422, f"filter: unknown field {key!r}; filterable fields are: {allowed}")
        if isinstance(value, list) and not value:
            raise HTTPException(422, f"filter: {key!r} has an empty list")
        if key == "table":
            wanted = value if isinstance(value, list) else [value]
            unknown = [t for t in wanted if t not in services.user_tables]
            if unknown:
                raise HTTPException(422, f"filter: table {unknown[0]!r} is not indexed; tables: {services.user_tables}")
            flt["table"] = wanted
        else:
            flt[f"metadata.{key}"] = value
    return flt


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
) -> FastAPI:
    """Build the API over `active` (a switching view of the live generation) or one fixed index + encoder;
    `lifespan` lets the node run the embedder in the same event loop; `status` reports the generations."""
    if not isinstance(active, ActiveIndex):
        if encoder is None:
            raise TypeError("a fixed index needs its encoder")
        active = FixedIndex(active, encoder)
    registry = registry or CollectorRegistry()
    svc = Services(settings, active, sources, registry, tracker or FreshnessTracker(registry), status)
    if settings.canary.enabled:
        svc.canary = Canary(settings.postgres.dsn(), active, svc.tracker, settings.canary)
    live = active

    @asynccontextmanager
    async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
        index, enc = live.current()
        await asyncio.to_thread(index.ensure_collection, enc.dim)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if lifespan is not None:
                    await stack.enter_async_context(lifespan(app))
                canary_task = asyncio.create_task(svc.canary.run()) if svc.canary else None
                try:
                    yield
                finally:
                    if canary_task is not None:
                        canary_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await canary_task
        finally:
            await asyncio.to_thread(live.close)

    app = FastAPI(
        title="ragtide",
        version="0.1.0",
        lifespan=_lifespan,
        description="Fresh retrieval over a CDC-maintained vector index.",
    )
    app.state.services = svc
    if settings.dashboard.assets_dir.is_dir():
        app.mount("/static", StaticFiles(directory=settings.dashboard.assets_dir), name="static")

    for router in routers:
        app.include_router(router)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.post("/v1/search", response_model=SearchResponse, tags=["retrieval"])
    async def search(body: SearchRequest, svc: ServicesDep) -> SearchResponse:
        """Semantic search over the freshest indexed state of the source tables."""
        t0 = time.perf_counter()
        k = body.k or svc.settings.api.default_k
        if k > svc.settings.api.max_k:
            raise HTTPException(422, f"k: must be at most {svc.settings.api.max_k}")
        if len(body.query) > svc.settings.api.max_query_chars:
            raise HTTPException(422, f"query: longer than {svc.settings.api.max_query_chars} characters")
        flt = build_filter(svc, body.filter)
        index, encoder = svc.active.current()
        vector = (await asyncio.to_thread(encoder.encode, [body.query]))[0]
        hits = await asyncio.to_thread(index.search, vector, k, flt)
        now = time.time()
        took = time.perf_counter() - t0
        svc.latency.labels("search").observe(took)
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
    async def freshness(svc: ServicesDep, window_s: float = 60.0) -> dict[str, Any]:
        """Commit -> searchable now: the canary, per-change percentiles, per-stage breakdown, lag, counters."""
        if not 1 <= window_s <= 3600:
            raise HTTPException(422, "window_s: must be between 1 and 3600")
        snap = svc.tracker.snapshot(window_s=window_s)
        snap["counters"] = counters_from(svc.registry)
        if svc.canary is not None:
            ok, detail = svc.canary.readiness()
            snap["canary"]["ready"], snap["canary"]["detail"] = ok, detail
        return snap

    @app.get("/v1/freshness/changes", tags=["freshness"])
    async def freshness_changes(svc: ServicesDep, since_ms: int = 0, limit: int = 50_000) -> dict[str, Any]:
        """Per-change stage timestamps of changes acknowledged since `since_ms` (for benchmarks)."""
        changes = svc.tracker.changes(since_ms, limit=max(1, min(limit, 50_000)))
        return {"changes": [c.as_dict() for c in changes], "canary": [[t, s] for t, s in svc.tracker.canary(since_ms)]}

    @app.get("/dashboard", response_class=HTMLResponse, tags=["freshness"])
    async def dashboard() -> HTMLResponse:
        """The live freshness dashboard."""
        return HTMLResponse(DASHBOARD_HTML)

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": Health}})
    async def readyz(svc: ServicesDep, response: Response) -> Health:
        """Readiness: the index answers, the encoder is loaded, and the canary is fresh enough."""
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
        ready = all(v.startswith("ok") for v in checks.values())
        if not ready:
            response.status_code = 503
        return Health(status="ready" if ready else "unready", checks=checks)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(svc: ServicesDep) -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    return app
