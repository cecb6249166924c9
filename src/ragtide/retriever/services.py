"""What the routes share: the Services object built by `create_app`, the request dependencies (services,
caller, admin), the tenant-safe filter, and retrieval itself (used by search, answer and chat completions)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Header, HTTPException, Request
from prometheus_client import CollectorRegistry

from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.encoder import Encoder, QueryVectors, Vectors
from ragtide.embedder.index.base import TENANT_FIELD, ActiveIndex, Filter, Hit
from ragtide.gateway.asgi import CALLER_KEY, HEADERS_KEY
from ragtide.gateway.gateway import Caller, Gateway, bearer
from ragtide.generator.client import Generator
from ragtide.generator.metrics import ServingMetrics
from ragtide.ingest.slot import SlotMonitor
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.cache import SemanticCache
from ragtide.retriever.canary import Canary
from ragtide.retriever.queries import DEADLINE_KEY, QueryBatcher, QueryMetrics
from ragtide.retriever.schemas import SearchHit


class Services:
    """What the routes need, built once by the composition root."""

    def __init__(
        self,
        settings: RagtideSettings,
        active: ActiveIndex,
        sources: SourcesConfig,
        registry: CollectorRegistry,
        tracker: FreshnessTracker,
        gateway: Gateway,
        generator: Generator | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        cache: SemanticCache | None = None,
    ) -> None:
        self.settings = settings
        self.active = active
        self.generation_status = status
        self.sources = sources
        self.registry = registry
        self.tracker = tracker
        self.gateway = gateway
        self.generator = generator
        self.cache = cache
        self.canary: Canary | None = None
        self.slot: SlotMonitor | None = None
        self.user_tables = sources.user_tables
        # With more than one source database, {"database": name} selects one database's tables.
        self.databases: dict[str, list[str]] = (
            {
                settings.postgres.database: [t.id for t in sources.sources if t.id in self.user_tables],
                **{name: [t.id for t in db.sources] for name, db in sources.databases.items()},
            }
            if sources.databases
            else {}
        )
        self.filterable = (
            {"table"} | {m for s in sources.all for m in s.metadata} | ({"database"} if self.databases else set())
        )
        self.serving = ServingMetrics(registry)
        self.query_vectors = QueryVectors()
        self.query_metrics = QueryMetrics(registry)
        api = settings.api
        self.batcher = QueryBatcher(api.query_batch, api.query_batch_window_ms / 1000, self.query_metrics)

    async def embed(self, encoder: Encoder, texts: Sequence[str], request: Request | None = None) -> Vectors:
        """Query texts' vectors from `encoder`: recent texts from memory, the others in micro-batched forward
        passes shared with concurrent requests. With `request`, it is dropped (Overloaded) rather than computed
        once past its deadline or once its client has gone."""
        vectors: list[Vectors | None] = [self.query_vectors.get(encoder, t) for t in texts]
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            deadline = getattr(request.state, DEADLINE_KEY, None) if request is not None else None
            receive = request.receive if request is not None else None
            fresh = await self.batcher.embed(encoder, [texts[i] for i in missing], deadline, receive)
            for i, vector in zip(missing, fresh, strict=True):
                vectors[i] = vector
                self.query_vectors.put(encoder, texts[i], vector)
        if not vectors:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        return np.stack([v for v in vectors if v is not None])

    def generator_state(self) -> dict[str, Any]:
        """Which generator answers, and whether its circuit is closed."""
        if self.generator is None:
            return {"configured": False}
        breaker = getattr(self.generator, "breaker", None)
        return {
            "configured": True,
            "model": self.generator.model,
            "url": getattr(self.generator, "url", None),
            "circuit": breaker.state if breaker is not None else "closed",
            "last_error": breaker.last_error if breaker is not None else "",
        }


def get_services(request: Request) -> Services:
    """The Services of this app instance."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_caller(
    request: Request,
    svc: ServicesDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header(description="the API key (instead of Authorization)")] = None,
) -> Caller:
    """Authenticate and admit (rate limit, quota); the gateway headers go on the response."""
    key = bearer(authorization, x_api_key)
    # no key: nothing to look up (dev mode admits it, prod refuses it) and nothing to limit; skip the threads
    caller = svc.gateway.authenticate(None) if key is None else await asyncio.to_thread(svc.gateway.authenticate, key)
    admitted = {} if caller.tenant is None else await asyncio.to_thread(svc.gateway.admit, caller)
    setattr(request.state, HEADERS_KEY, admitted)  # GatewayEdge puts them on the response
    setattr(request.state, CALLER_KEY, caller)
    return caller


async def get_admin(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <admin key>")] = None,
    x_api_key: Annotated[str | None, Header(description="the admin key (instead of Authorization)")] = None,
) -> Caller:
    """Admin endpoints: the admin key (dev mode: also no key). Any app that sets `app.state.gateway` can use it
    (the retrieval API, the embedder's own)."""
    gateway: Gateway = request.app.state.gateway
    return await asyncio.to_thread(gateway.require_admin, bearer(authorization, x_api_key))


CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(get_admin)]


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


def build_filter(services: Services, requested: dict[str, Any] | None, caller: Caller | None = None) -> Filter:
    """Map the request's filter onto payload paths; unknown columns are a 422 that names them.

    Searches always stay within the user's source tables (never ragtide's own canary rows), and a caller with a
    tenant sees only its tenant's rows plus rows of tables without a tenant column (stored with tenant ''),
    whatever the request's filter says: `tenant` is not a filterable field.
    """
    flt: dict[str, Any] = {"table": services.user_tables}
    for key, value in (requested or {}).items():
        if key not in services.filterable:
            allowed = ", ".join(sorted(services.filterable))
            raise HTTPException(422, f"filter: unknown field {key!r}; filterable fields are: {allowed}")
        if isinstance(value, list) and not value:
            raise HTTPException(422, f"filter: {key!r} has an empty list")
        if key in ("table", "database"):
            wanted = value if isinstance(value, list) else [value]
            known = services.user_tables if key == "table" else list(services.databases)
            unknown = [t for t in wanted if t not in known]
            if unknown:
                raise HTTPException(422, f"filter: {key} {unknown[0]!r} is not indexed; {key}s: {known}")
            tables = wanted if key == "table" else [t for name in wanted for t in services.databases[name]]
            flt["table"] = [t for t in flt["table"] if t in tables]
            if not flt["table"]:
                raise HTTPException(422, "filter: the table and database given select no table together")
        else:
            flt[f"metadata.{key}"] = value
    if caller is not None and caller.tenant is not None:
        flt[TENANT_FIELD] = [caller.tenant, ""]
    return flt


def check_query(svc: Services, query: str, k: int | None) -> int:
    """The effective k; 422 for a k or query over the configured limits."""
    k = k or svc.settings.api.default_k
    if k > svc.settings.api.max_k:
        raise HTTPException(422, f"k: must be at most {svc.settings.api.max_k}")
    if len(query) > svc.settings.api.max_query_chars:
        raise HTTPException(422, f"query: longer than {svc.settings.api.max_query_chars} characters")
    return k


async def retrieve(svc: Services, query: str, k: int, flt: Filter, request: Request | None = None) -> list[Hit]:
    """Embed the query with the live generation's encoder (micro-batched) and search its collection."""
    index, encoder = svc.active.current()
    vector = (await svc.embed(encoder, [query], request))[0]
    return await asyncio.to_thread(index.search, vector, k, flt)


def query_tokens(query: str) -> int:
    """What a search costs against the quota: the query's approximate token count (4 characters a token)."""
    return max(1, math.ceil(len(query) / 4))
