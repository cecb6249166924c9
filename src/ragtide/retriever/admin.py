"""The operator's endpoints (/v1/admin: verify, reindex, optimize, cache clear, generations), served where the
writes happen: by the node, or by the embedder that holds the lease. The retrievers forward them there
(`retriever.forward.admin_proxy`), so they answer from any retriever under compose and Kubernetes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.generations import Generations, NotLeading, verify_generation
from ragtide.embedder.lease import Lease
from ragtide.ingest.connector import signal_snapshots
from ragtide.ingest.sources import SourcesConfig, dsn_of
from ragtide.retriever.cache import SemanticCache
from ragtide.retriever.services import get_admin


class VerifyRequest(BaseModel):
    """POST /v1/admin/verify."""

    model_config = ConfigDict(extra="forbid")

    table: str | None = Field(None, description="one source table (schema.table); default: all")
    repair: bool = Field(False, description="fix exactly the drift that was found")


class ReindexRequest(BaseModel):
    """POST /v1/admin/reindex."""

    model_config = ConfigDict(extra="forbid")

    table: str | None = Field(
        None,
        description="re-embed one table's rows in place; default: build a new generation of every table "
        "beside the live one and switch when it has caught up",
    )


def admin_router(
    settings: RagtideSettings,
    generations: Generations,
    sources: SourcesConfig,
    lease: Lease,
    cache: SemanticCache | None = None,
) -> APIRouter:
    """Operator endpoints where the writes happen: the node, or the embedder that leads (the retrievers forward
    them there: `admin_proxy`). An embedder that does not lead refuses them and names the one that does."""

    def leading() -> None:
        if not generations.leading:
            leader = lease.leader() or "the leader (none right now)"
            raise HTTPException(409, f"this embedder does not lead; send it to {leader} or to any retriever")

    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(get_admin), Depends(leading)])
    dsn = dsn_of(settings, sources)

    def check_table(table: str | None) -> list[str]:
        if table is not None and table not in sources.user_tables:
            raise HTTPException(422, f"table: {table!r} is not a source table; tables: {sources.user_tables}")
        return [table] if table else sources.user_tables

    def run_verify(table: str, repair: bool, reembed: bool) -> dict[str, Any]:
        report, embedded = verify_generation(dsn, generations, sources, generations.live, table, repair, reembed)
        return {**report.as_dict(), "embedded_chunks": embedded}

    @router.post("/verify")
    async def verify(body: VerifyRequest) -> dict[str, Any]:
        """Compare the source tables with the live index (missing, stale, orphaned rows); optionally repair."""
        reports = [await asyncio.to_thread(run_verify, t, body.repair, False) for t in check_table(body.table)]
        return {"drift": sum(r["drift"] for r in reports), "repair": body.repair, "tables": reports}

    @router.post("/reindex")
    async def reindex(body: ReindexRequest) -> dict[str, Any]:
        """Re-embed one table in place, or build a new generation of the whole index (blue/green)."""
        if body.table is not None:
            report = await asyncio.to_thread(run_verify, check_table(body.table)[0], True, True)
            return {
                "table": body.table,
                "reembedded_rows": report["repaired"],
                "embedded_chunks": report["embedded_chunks"],
                "report": report,
            }
        try:
            spec = await asyncio.to_thread(generations.rebuild)
        except NotLeading as exc:  # the lease was lost, or could not be confirmed, since the check above
            raise HTTPException(409, f"{exc}; send it to {lease.leader() or 'the leader'} or to any retriever") from exc
        await asyncio.to_thread(signal_snapshots, settings, sources, sources.user_tables)
        return {"building": spec.as_dict(), **generations.status()}

    @router.post("/optimize")
    async def optimize() -> dict[str, Any]:
        """Build the live generation's search index (HNSW) after a large backfill: search at 100k chunks goes
        from a brute-force scan to a graph walk. With the embedded engine the node pauses while it runs."""
        index, _ = generations.current()
        t0 = time.perf_counter()
        report = await asyncio.to_thread(index.optimize)
        return {**report, "seconds": round(time.perf_counter() - t0, 2)}

    @router.post("/cache/clear")
    async def cache_clear() -> dict[str, Any]:
        """Drop every cached answer (benchmarks start from an empty cache; also after editing prompts)."""
        if cache is None:
            raise HTTPException(409, "the answer cache is off (cache.enabled)")
        return {"dropped": await asyncio.to_thread(cache.clear)}

    @router.get("/generations")
    async def generations_status() -> dict[str, Any]:
        """The live generation and the build in progress, with rows done / total, rate and ETA."""
        return generations.status()

    return router
